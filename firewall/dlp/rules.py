"""DLP rule packs: YAML files in ``dlp_rules/`` turned into checked, compiled rules.

The schema is documented in ``dlp_rules/README.md``.  The split that keeps the
engine fast is between a rule's **patterns** and its **values**:

* ``patterns`` are Hyperscan *triggers*: short, bounded expressions that match a
  prefix of a sensitive value and start where it starts (e.g. twelve digits after
  a non-digit).  They run over every byte, in one stream-mode database, without
  start-of-match tracking, so they must be cheap.
* ``values`` are Python regular expressions matched at the trigger's start on a
  bounded look-back window.  They run only on candidates, may use look-arounds,
  back-references and the named groups ``secret`` (the sensitive part, when the
  match also covers a keyword) and ``hint`` (kept visible when masking).

Everything is checked at load time - unknown fields, unknown validators, regexes
that Python or Hyperscan reject, unbounded triggers - and reported as one
``DlpRuleError("path: message")`` line, so a bad pack never reaches traffic.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from firewall.dlp.validators import Validator, combine, parse_validator


class DlpRuleError(ValueError):
    """A rule pack is invalid; the message is ``path: what is wrong``."""


# Characters that may not touch a value on either side, per boundary name.
BOUNDARIES: dict[str, str | None] = {
    "none": None,
    "digit": "[0-9]",
    "alnum": "[A-Za-z0-9]",
    "word": "[A-Za-z0-9_]",
    "token": "[A-Za-z0-9_-]",
    "base64": "[A-Za-z0-9+/=_-]",
}
SEVERITIES = ("low", "medium", "high", "critical")
ACTIONS = ("alert", "block")
MASKS = ("hint", "card", "shape")
PACK_FIELDS = {"pack", "description", "enabled_by_default", "rules"}
RULE_FIELDS = {
    "id", "name", "type", "patterns", "prefix", "values", "boundary", "validator", "severity",
    "confidence", "context", "action", "mask", "max_length", "enabled", "description",
}
_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_PACK = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_MAX_REPEAT = int(re.MAXREPEAT) if hasattr(re, "MAXREPEAT") else 2**32 - 1
MAX_VALUE_LENGTH = 8192  # look-back window per stream is bounded by the longest value


def _width(pattern: str) -> tuple[int, int]:
    """(min, max) length a regex can match, from the stdlib parser (max may be 'unbounded')."""
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - older Pythons
        import sre_parse  # type: ignore[no-redef]
    lo, hi = sre_parse.parse(pattern).getwidth()
    return int(lo), int(hi)


def _parsed(pattern: str) -> Any:
    try:
        from re import _parser as sre_parse  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - older Pythons
        import sre_parse  # type: ignore[no-redef]
    return sre_parse.parse(pattern)


def _has_assertion(items: Any) -> bool:
    """Whether a parsed regex looks around or anchors anywhere (then its first byte does not
    decide a match on its own)."""
    from re import _constants as c  # type: ignore[attr-defined]

    for op, av in items:
        if op in (c.ASSERT, c.ASSERT_NOT, c.AT, c.GROUPREF, c.GROUPREF_EXISTS):
            return True
        if op is c.SUBPATTERN and _has_assertion(av[-1]):
            return True
        if op is c.BRANCH and any(_has_assertion(alt) for alt in av[1]):
            return True
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)) and _has_assertion(av[2]):
            return True
        if op is getattr(c, "ATOMIC_GROUP", None) and _has_assertion(av):
            return True
    return False


def _class_set(items: Any) -> set[int] | None:
    """The bytes a parsed character class ``[...]`` matches; None when that is not simple to
    say (categories other than \\d, case folding)."""
    from re import _constants as c  # type: ignore[attr-defined]

    out: set[int] = set()
    negate = False
    for op, av in items:
        if op is c.NEGATE:
            negate = True
        elif op is c.LITERAL:
            out.add(av)
        elif op is c.RANGE:
            out.update(range(av[0], min(av[1], 255) + 1))
        elif op is c.CATEGORY and av is c.CATEGORY_DIGIT:
            out.update(range(48, 58))
        else:
            return None
    return set(range(256)) - out if negate else out


def _first_set(items: Any) -> set[int] | None:
    """The bytes a match of a parsed regex can begin with; None when that is not simple to say
    (case-insensitive parts, categories, an optional first element, look-arounds)."""
    from re import _constants as c  # type: ignore[attr-defined]

    if not items:
        return None
    op, av = items[0]
    if op is c.LITERAL:
        return {av}
    if op is c.IN:
        return _class_set(av)
    if op is c.BRANCH:
        out: set[int] = set()
        for alt in av[1]:
            first = _first_set(alt)
            if first is None:
                return None
            out |= first
        return out
    if op is c.SUBPATTERN:
        if av[1] or av[2]:  # local flags (?i:...) change what a byte means
            return None
        return _first_set(av[-1])
    if op in (c.MAX_REPEAT, c.MIN_REPEAT) and av[0] >= 1:
        return _first_set(av[2])
    return None


def prefix_dispatch(pattern: str) -> tuple[frozenset[int] | None, bool]:
    """For a rule's ``prefix``: the bytes it can start with (None: any) and whether the first
    byte alone decides it (a one-character class without look-arounds), so the engine can pick
    the rules to try at a candidate from one table look-up instead of a regex call each."""
    import re as _re

    tree = _parsed(pattern)
    if tree.state.flags & _re.IGNORECASE:
        return None, False
    first = _first_set(tree.data)
    lo, hi = tree.getwidth()
    one = first is not None and lo == hi == 1 and not _has_assertion(tree.data)
    return (frozenset(first) if first is not None else None), one


_ANY = frozenset(range(256))


def offset_sets(patterns: list[str], k_max: int) -> list[frozenset[int]]:
    """See ``_offset_sets``; cached, since rules sharing values (the card brands) ask alike."""
    return _offset_sets(tuple(patterns), k_max)


@functools.lru_cache(maxsize=256)
def _offset_sets(patterns: tuple[str, ...], k_max: int) -> list[frozenset[int]]:
    """For offsets 0 .. k_max-1 from a match's start, the bytes a match of any of ``patterns``
    can have there (every byte where a pattern can end earlier or is not simple to follow).

    Conservative: look-arounds are ignored (they only narrow a match), and anything beyond
    plain characters, classes, groups, alternations and repeats - case-insensitive parts,
    back-references - allows every byte from that point on.  The engine uses it to skip rules
    whose values cannot match a candidate (an SSN needs a dash or space as 4th byte, a card
    a digit) with one table look-up instead of a regex call."""
    from re import _constants as c  # type: ignore[attr-defined]

    sets: list[set[int]] = [set() for _ in range(k_max)]

    def wild(cur: set[int]) -> set[int]:
        for o in range(min(cur, default=k_max), k_max):
            sets[o] = set(_ANY)
        return set()

    def chars(op: Any, av: Any) -> set[int] | None:
        if op is c.LITERAL:
            return {av}
        if op is c.NOT_LITERAL:
            return set(_ANY) - {av}
        if op is c.ANY:
            return set(_ANY)
        if op is c.IN:
            out = _class_set(av)
            return set(_ANY) if out is None else out
        return None

    def seq(items: Any, cur: set[int]) -> set[int]:
        for op, av in items:
            cur = {o for o in cur if o < k_max}
            if not cur:
                return cur
            one = chars(op, av)
            if one is not None:
                for o in cur:
                    sets[o] |= one
                cur = {o + 1 for o in cur}
            elif op in (c.ASSERT, c.ASSERT_NOT, c.AT):
                continue  # zero width; ignoring a look-around only widens the sets
            elif op is c.SUBPATTERN:
                if av[1] or av[2]:  # local flags such as (?i:...)
                    return wild(cur)
                cur = seq(av[-1], cur)
            elif op is c.BRANCH:
                nxt: set[int] = set()
                for alt in av[1]:
                    nxt |= seq(alt, set(cur))
                cur = nxt
            elif op in (c.MAX_REPEAT, c.MIN_REPEAT):
                lo, hi, sub = av
                ends = set(cur) if lo == 0 else set()
                step = set(cur)
                for i in range(1, min(hi, k_max + 1) + 1):
                    step = seq(sub, step)
                    step = {o for o in step if o < k_max} if i < hi else step
                    if i >= lo:
                        ends |= step
                    if not step:
                        break
                cur = ends
            else:
                return wild(cur)
        return cur

    for pattern in patterns:
        tree = _parsed(pattern)
        import re as _re

        if tree.state.flags & _re.IGNORECASE:
            return [_ANY] * k_max
        for end in seq(tree.data, {0}):
            if end < k_max:
                wild({end})  # a match may stop here: any byte may follow
    return [frozenset(x) for x in sets]


@dataclass(frozen=True, slots=True)
class Trigger:
    """One Hyperscan expression; identical triggers of several rules are compiled once."""

    pattern: str
    boundary: str | None
    min_width: int
    max_width: int

    @property
    def expression(self) -> bytes:
        """What Hyperscan compiles: the boundary as a consumed left context, then the trigger."""
        if self.boundary is None:
            return self.pattern.encode()
        negated = "[^" + self.boundary[1:]
        return f"(?:^|{negated})(?:{self.pattern})".encode()


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    name: str
    pack: str
    type: str
    patterns: tuple[str, ...]
    values: tuple[re.Pattern[bytes], ...]
    prefix: re.Pattern[bytes] | None
    boundary: str | None
    validator: Validator = field(compare=False, repr=False)
    validator_spec: tuple[str, ...]
    severity: str
    confidence: float
    context: tuple[bytes, ...]
    action: str
    mask: str
    max_length: int
    enabled: bool
    source: str
    order: int = 0


@dataclass(frozen=True, slots=True)
class Pack:
    name: str
    description: str
    enabled_by_default: bool
    rules: tuple[Rule, ...]
    path: str

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "enabled_by_default": self.enabled_by_default,
            "rules": [r.id for r in self.rules],
            "path": self.path,
        }


def default_rules_dir() -> str:
    """The repo's ``dlp_rules/`` in a checkout, else the installed copies."""
    candidates = [
        os.environ.get("PALISADE_DLP_RULES", ""),
        str(Path(__file__).resolve().parents[2] / "dlp_rules"),
        "/etc/palisade/dlp",
        os.path.join(sys.prefix, "share", "palisade", "dlp_rules"),
    ]
    for cand in candidates:
        if cand and os.path.isdir(cand):
            return cand
    raise DlpRuleError("dlp_rules: no rule directory found (pass --rules or set PALISADE_DLP_RULES)")


def pack_files(rules_dirs: list[str]) -> list[Path]:
    files: list[Path] = []
    for d in rules_dirs:
        p = Path(d)
        if p.is_file():
            files.append(p)
            continue
        if not p.exists():
            raise DlpRuleError(f"{d}: no such file or directory")
        if not p.is_dir():
            raise DlpRuleError(f"{d}: not a rule directory or .yaml file")
        files.extend(sorted(list(p.glob("*.yaml")) + list(p.glob("*.yml"))))
    return files


def rules_hash(files: list[Path], enable: list[str] | None) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    h.update(repr(sorted(enable) if enable is not None else None).encode())
    return h.hexdigest()


def _bad(path: str, where: str, msg: str) -> DlpRuleError:
    return DlpRuleError(f"{path}: {where}{msg}")


def _str_list(value: Any, path: str, where: str, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise _bad(path, where, f"'{name}' must be a non-empty string or list of strings")
    return value


def _compile_value(pattern: str, boundary: str | None, path: str, where: str) -> re.Pattern[bytes]:
    try:
        pattern.encode("ascii")
    except UnicodeEncodeError:
        raise _bad(path, where, f"value regex must be ASCII: {pattern!r}") from None
    body = f"(?:{pattern})"
    if boundary is not None:
        body = f"(?<!{boundary}){body}(?!{boundary})"
    try:
        return re.compile(body.encode())
    except re.error as exc:
        raise _bad(path, where, f"bad value regex {pattern!r}: {exc}") from None


def _parse_rule(raw: Any, pack: str, path: str, index: int) -> tuple[Rule, list[Trigger]]:
    where = f"rules[{index}]: "
    if not isinstance(raw, dict):
        raise _bad(path, where, "must be a mapping")
    rid = raw.get("id")
    if not isinstance(rid, str) or not _ID.fullmatch(rid):
        raise _bad(path, where, "'id' must be lowercase letters, digits, '.', '_' or '-'")
    where = f"rules[{index}] ({rid}): "
    unknown = sorted(set(raw) - RULE_FIELDS)
    if unknown:
        raise _bad(path, where, f"unknown field(s) {', '.join(unknown)}")
    for req in ("name", "type", "patterns"):
        if req not in raw:
            raise _bad(path, where, f"missing '{req}'")
    boundary_name = raw.get("boundary", "none")
    if boundary_name in BOUNDARIES:
        boundary = BOUNDARIES[boundary_name]
    elif isinstance(boundary_name, str) and re.fullmatch(r"\[[^\[\]^][^\[\]]*\]", boundary_name):
        boundary = boundary_name
    else:
        raise _bad(path, where, f"'boundary' must be one of {', '.join(BOUNDARIES)} or a class like '[A-Z0-9]'")
    patterns = _str_list(raw["patterns"], path, where, "patterns")
    triggers = []
    for p in patterns:
        try:
            p.encode("ascii")
            re.compile(p.encode())
        except (UnicodeEncodeError, re.error) as exc:
            raise _bad(path, where, f"bad pattern {p!r}: {exc}") from None
        lo, hi = _width(p)
        if hi >= _MAX_REPEAT or hi > MAX_VALUE_LENGTH:
            raise _bad(path, where, f"pattern {p!r} is unbounded; triggers need a maximum length")
        if lo == 0:
            raise _bad(path, where, f"pattern {p!r} can match the empty string")
        triggers.append(Trigger(p, boundary, lo, hi))
    values_raw = _str_list(raw.get("values", patterns), path, where, "values")
    values = tuple(_compile_value(v, boundary, path, where) for v in values_raw)
    prefix = None
    if "prefix" in raw:
        if not isinstance(raw["prefix"], str) or not raw["prefix"]:
            raise _bad(path, where, "'prefix' must be a regex string")
        try:
            prefix = re.compile(raw["prefix"].encode("ascii"))
        except (UnicodeEncodeError, re.error) as exc:
            raise _bad(path, where, f"bad prefix regex {raw['prefix']!r}: {exc}") from None
        if prefix.groupindex:
            raise _bad(path, where, "'prefix' must not contain named groups")
    max_length = raw.get("max_length")
    if max_length is None:
        widths = [_width(v)[1] for v in values_raw]
        if max(widths) >= _MAX_REPEAT or max(widths) > MAX_VALUE_LENGTH:
            raise _bad(path, where, f"a value regex is unbounded (or over {MAX_VALUE_LENGTH}); set 'max_length'")
        max_length = max(max(widths), max(t.max_width for t in triggers))
    elif not isinstance(max_length, int) or not 1 <= max_length <= MAX_VALUE_LENGTH:
        raise _bad(path, where, f"'max_length' must be an integer 1..{MAX_VALUE_LENGTH}")
    specs = _str_list(raw.get("validator", "none"), path, where, "validator")
    try:
        validator = combine([parse_validator(s) for s in specs])
    except ValueError as exc:
        raise _bad(path, where, str(exc)) from None
    severity = raw.get("severity", "medium")
    if severity not in SEVERITIES:
        raise _bad(path, where, f"'severity' must be one of {', '.join(SEVERITIES)}")
    action = raw.get("action", "alert")
    if action not in ACTIONS:
        raise _bad(path, where, f"'action' must be one of {', '.join(ACTIONS)}")
    mask = raw.get("mask", "hint")
    if mask not in MASKS:
        raise _bad(path, where, f"'mask' must be one of {', '.join(MASKS)}")
    confidence = raw.get("confidence", 0.5)
    if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0 < confidence <= 1:
        raise _bad(path, where, "'confidence' must be a number in (0, 1]")
    context = raw.get("context", [])
    if not isinstance(context, list) or not all(isinstance(c, str) and c for c in context):
        raise _bad(path, where, "'context' must be a list of keywords")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _bad(path, where, "'enabled' must be true or false")
    for key in ("name", "type"):
        if not isinstance(raw[key], str) or not raw[key]:
            raise _bad(path, where, f"'{key}' must be a non-empty string")
    rule = Rule(
        id=rid, name=raw["name"], pack=pack, type=raw["type"], patterns=tuple(patterns),
        values=values, prefix=prefix, boundary=boundary, validator=validator, validator_spec=tuple(specs),
        severity=severity, confidence=float(confidence),
        context=tuple(c.lower().encode() for c in context), action=action, mask=mask,
        max_length=int(max_length), enabled=enabled, source=path,
    )
    return rule, triggers


def parse_pack(path: Path) -> tuple[Pack, list[tuple[Rule, list[Trigger]]]]:
    sp = str(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DlpRuleError(f"{sp}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise DlpRuleError(f"{sp}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"{mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DlpRuleError(f"{sp}:{line}YAML error: {problem}") from None
    if not isinstance(doc, dict):
        raise DlpRuleError(f"{sp}: a rule pack must be a mapping with 'pack' and 'rules'")
    unknown = sorted(k for k in set(doc) - PACK_FIELDS if not (isinstance(k, str) and k.startswith("x-")))
    if unknown:
        raise DlpRuleError(f"{sp}: unknown field(s) {', '.join(unknown)}")
    name = doc.get("pack")
    if not isinstance(name, str) or not _PACK.fullmatch(name):
        raise DlpRuleError(f"{sp}: 'pack' must be a lowercase name like payment_cards")
    enabled_by_default = doc.get("enabled_by_default", True)
    if not isinstance(enabled_by_default, bool):
        raise DlpRuleError(f"{sp}: 'enabled_by_default' must be true or false")
    rules_raw = doc.get("rules")
    if not isinstance(rules_raw, list) or not rules_raw:
        raise DlpRuleError(f"{sp}: 'rules' must be a non-empty list")
    parsed = [_parse_rule(r, name, sp, i) for i, r in enumerate(rules_raw)]
    seen: set[str] = set()
    for rule, _ in parsed:
        if rule.id in seen:
            raise DlpRuleError(f"{sp}: duplicate rule id {rule.id}")
        seen.add(rule.id)
    pack = Pack(name, str(doc.get("description", "")), enabled_by_default,
                tuple(r for r, _ in parsed), sp)
    return pack, parsed


def load_packs(rules_dirs: list[str]) -> dict[str, tuple[Pack, list[tuple[Rule, list[Trigger]]]]]:
    """All packs of the directories; a later directory's pack replaces one of the same name."""
    packs: dict[str, tuple[Pack, list[tuple[Rule, list[Trigger]]]]] = {}
    for f in pack_files(rules_dirs):
        pack, parsed = parse_pack(f)
        packs[pack.name] = (pack, parsed)
    owner: dict[str, str] = {}
    for pack, _ in packs.values():
        for rule in pack.rules:
            if rule.id in owner:
                raise DlpRuleError(f"{pack.path}: rule id {rule.id} already defined in {owner[rule.id]}")
            owner[rule.id] = pack.path
    return packs
