"""The import contract of the ``firewall`` packages (issue 18): one room per concern, no cycles.

Parsed with ``ast`` (nothing is imported), so the contract holds for every module, also those a
test never loads:

- the data path (``firewall.datapath``) and the parsers (``firewall.protocols``) never import the
  auditor tooling (``firewall.audit``), the lab (``firewall.lab``), the sidecar process
  (``firewall.sidecar``) or any command-line module - not even lazily;
- the parsers never import ``firewall.policy``;
- the packages' module-level imports form no cycle.  An import inside a function runs only when
  called, so it may point "backwards"; every such import is listed in ``LAZY_BACK_EDGES`` so a
  new one is a reviewed decision, not an accident.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "firewall"

#: Lazy (function-level) imports between packages that are not allowed at module level, because
#: they would close a package cycle: (importing module, imported module) -> why it is lazy.
LAZY_BACK_EDGES: dict[tuple[str, str], str] = {
    ("firewall.identity.identity", "firewall.policy.yaml"):
        "an identity file is read with the policy's line-numbered YAML reader only when one is loaded; "
        "the policy package imports identity (Identity) at module level",
    ("firewall.observe.alertsink", "firewall.datapath.redirect"):
        "the webhook socket takes the sidecar's own mark (redirect.mark_own) when it connects; "
        "the data path imports observe (metrics, events) at module level",
}

FORBIDDEN_FOR_DATA_PATH = ("firewall.audit", "firewall.lab", "firewall.sidecar")


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a module of the ``firewall`` tree."""

    source: str
    target: str
    lazy: bool  # inside a function body, or under ``if TYPE_CHECKING``
    line: int


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def known_modules(root: Path) -> set[str]:
    return {module_name(p, root) for p in root.rglob("*.py")}


def package_of(module: str) -> str:
    """``firewall.policy.engine`` -> ``firewall.policy``; modules at the top stay ``firewall``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and _is_pkg(module)) else parts[0]


def _is_pkg(module: str) -> bool:
    return (ROOT.parent / module.replace(".", "/") / "__init__.py").exists()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path, modules: set[str]) -> list[Import]:
    """Every ``firewall`` import of one file, marked lazy when it does not run at import time."""
    source = module_name(path, root)
    tree = ast.parse(path.read_text(), str(path))
    found: list[Import] = []

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
                continue
            if isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, True)
                continue
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # ``from firewall.datapath import splice`` imports the module firewall.datapath.splice
                targets = [f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in modules
                           else child.module for a in child.names]
            for t in targets:
                if t.split(".")[0] == "firewall" and (mod := resolve(t)) and mod != source:
                    found.append(Import(source, mod, lazy, child.lineno))
            visit(child, lazy)

    visit(tree, False)
    return found


def all_imports(root: Path = ROOT) -> list[Import]:
    modules = known_modules(root)
    return [i for p in sorted(root.rglob("*.py")) for i in imports_of(p, root, modules)]


def _is_cli(module: str) -> bool:
    return module.rpartition(".")[2].endswith("cli")


def contract_violations(imports: list[Import]) -> list[str]:
    """Rules (a) and (b): what the data path and the parsers must never import."""
    bad = []
    for i in imports:
        src_pkg = package_of(i.source)
        if src_pkg in ("firewall.datapath", "firewall.protocols"):
            if _is_cli(i.target) or any(i.target == f or i.target.startswith(f + ".")
                                        for f in FORBIDDEN_FOR_DATA_PATH):
                bad.append(f"{i.source}:{i.line} imports {i.target}")
        if src_pkg == "firewall.protocols" and package_of(i.target) == "firewall.policy":
            bad.append(f"{i.source}:{i.line} imports {i.target} (parsers never import policy)")
    return bad


def package_cycles(imports: list[Import]) -> list[list[str]]:
    """Cycles in the graph of module-level imports between packages (Tarjan's SCCs of size > 1)."""
    graph: dict[str, set[str]] = {}
    for i in imports:
        a, b = package_of(i.source), package_of(i.target)
        if not i.lazy and a != b:
            graph.setdefault(a, set()).add(b)
            graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sccs


def lazy_back_edges(imports: list[Import]) -> set[tuple[str, str]]:
    """Lazy cross-package imports that would close a cycle if they ran at module level."""
    eager = [i for i in imports if not i.lazy]
    back = set()
    for i in imports:
        if i.lazy and package_of(i.source) != package_of(i.target):
            if package_cycles([*eager, Import(i.source, i.target, False, i.line)]):
                back.add((i.source, i.target))
    return back


def test_package_tree_is_what_the_contract_names() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert {"sidecar", "datapath", "protocols", "policy", "identity", "dlp", "observe", "capture",
            "audit", "lab"} <= packages
    # one room per concept: no module left flat beside the packages but the CLI entry point
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]
    for pkg in packages:
        doc = ast.get_docstring(ast.parse((ROOT / pkg / "__init__.py").read_text()))
        assert doc, f"firewall/{pkg}/__init__.py says what the package owns"


def test_data_path_and_parsers_keep_out_of_tooling() -> None:
    assert contract_violations(all_imports()) == []


def test_no_package_cycle_at_module_level() -> None:
    assert package_cycles(all_imports()) == []


def test_lazy_back_edges_are_the_listed_ones() -> None:
    """A new function-level import that only works because it is lazy is a design decision:
    list it in LAZY_BACK_EDGES with the reason."""
    assert lazy_back_edges(all_imports()) == set(LAZY_BACK_EDGES)


# The checks themselves must be able to fail: plant each violation in a copy of the tree.
@pytest.mark.parametrize("planted, rule", [
    ("firewall/datapath/splice.py", "from firewall.audit.report import build_report\n"),
    ("firewall/datapath/splice.py", "from firewall.policy.cli import register\n"),
    ("firewall/protocols/dns.py", "def f():\n    from firewall.lab import demo\n"),
    ("firewall/protocols/dns.py", "from firewall.policy.model import L\n"),
])
def test_planted_contract_violation_is_caught(tmp_path: Path, planted: str, rule: str) -> None:
    tree = _copy_tree(tmp_path)
    target = tmp_path / planted
    target.write_text(target.read_text() + "\n" + rule)
    assert contract_violations(all_imports(tree))


def test_planted_package_cycle_is_caught(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    # observe is imported by policy at module level; the reverse closes a cycle
    target = tree / "observe" / "signature.py"
    target.write_text(target.read_text() + "\nfrom firewall.policy.engine import PolicySet\n")
    assert package_cycles(all_imports(tree))
    # the same import inside a function is no cycle, but is a back edge to be listed
    target.write_text(target.read_text().replace(
        "\nfrom firewall.policy.engine import PolicySet\n",
        "\ndef _late():\n    from firewall.policy.engine import PolicySet\n    return PolicySet\n"))
    imports = all_imports(tree)
    assert package_cycles(imports) == []
    assert ("firewall.observe.signature", "firewall.policy.engine") in lazy_back_edges(imports)


def _copy_tree(tmp_path: Path) -> Path:
    for p in ROOT.rglob("*.py"):
        dst = tmp_path / p.relative_to(ROOT.parent)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(p.read_text())
    return tmp_path / "firewall"
