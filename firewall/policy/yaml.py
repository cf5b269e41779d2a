"""YAML with line numbers: every value keeps the line it came from.

Reviewers fix policies from CI output, so every problem must point at a line
(``policy.yaml:14: spec.ingress[0].frm: unknown field``).  PyYAML's plain
loaders drop positions, so documents are composed into nodes and turned into
Python values here while a side table records ``path -> line`` (1-based).
Scalars are still typed by PyYAML's safe resolver (ints, bools, nulls), so a
file means the same thing here as with ``yaml.safe_load``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


class YamlSourceError(Exception):
    """A file that is not valid YAML; ``str()`` is ``file:line: message``."""


@dataclass(slots=True)
class SourceDoc:
    """One YAML document: its value, where it starts and where each path is."""

    file: str
    index: int
    value: Any
    line: int
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int:
        """Line of ``path`` or of its nearest ancestor that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.line


def format_path(path: Path) -> str:
    """``('spec', 'ingress', 0, 'frm')`` -> ``spec.ingress[0].frm``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _scalar_loader() -> yaml.SafeLoader:
    return yaml.SafeLoader("")


def _convert(node: yaml.Node, path: Path, lines: dict[Path, int], file: str,
             loader: yaml.SafeLoader, depth: int = 0) -> Any:
    if depth > 64:
        raise YamlSourceError(f"{file}:{node.start_mark.line + 1}: nesting too deep")
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise YamlSourceError(f"{file}:{key_node.start_mark.line + 1}: "
                                      f"{format_path(path) or '(document)'}: mapping keys must be scalars")
            if key in out:
                raise YamlSourceError(f"{file}:{key_node.start_mark.line + 1}: "
                                      f"{format_path((*path, str(key)))}: duplicate key")
            child = (*path, str(key))
            lines[child] = key_node.start_mark.line + 1
            out[key] = _convert(value_node, child, lines, file, loader, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), lines, file, loader, depth + 1)
                for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def load_documents(text: str, file: str) -> Iterator[SourceDoc]:
    """Yield the non-empty documents of a (multi-document) YAML text."""
    loader = _scalar_loader()
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        msg = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise YamlSourceError(f"{file}:{line}: invalid YAML: {msg}") from None
    except yaml.YAMLError as exc:
        raise YamlSourceError(f"{file}:1: invalid YAML: {exc}") from None
    for index, node in enumerate(nodes):
        if node is None:
            continue
        lines: dict[Path, int] = {}
        try:
            value = _convert(node, (), lines, file, loader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else node.start_mark.line + 1
            raise YamlSourceError(f"{file}:{line}: invalid YAML: {exc.problem}") from None
        if value is None:
            continue
        yield SourceDoc(file, index, value, node.start_mark.line + 1, lines)


def load_file(path: str) -> list[SourceDoc]:
    """Read one file; OS and decoding errors become ``YamlSourceError``."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise YamlSourceError(f"{path}:0: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise YamlSourceError(f"{path}:0: not UTF-8 text") from None
    return list(load_documents(text, path))
