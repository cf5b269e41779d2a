"""DLP engine: Hyperscan stream-mode triggers, Python confirmation on a bounded window.

How a value is found (and why it is fast):

1. Every enabled rule contributes short, bounded *trigger* expressions (see
   ``dlp_rules``).  All triggers are compiled into ONE stream-mode Hyperscan
   database.  Fixed-width triggers are compiled without start-of-match tracking
   (Hyperscan reports "a trigger ends at offset t", which is what it does fastest);
   variable-width triggers up to ``SOM_MAX_WIDTH`` bytes ask for the leftmost start
   too, which costs nothing measurable on them and saves a Python regex search per
   candidate.  One Hyperscan stream per connection direction is opened on the first
   byte and closed with the flow, so a value split across TCP segments is seen like
   any other.  On text the scan itself is most of the cost, and it depends on how
   the triggers are written more than on how many there are: the card and SSN
   shapes share one factored trigger (see ``payment_cards.yaml``).
2. Each stream keeps a look-back window of the last ``holdback + 66`` bytes.  A
   trigger hit becomes a *candidate* (rule, start).  The rules to try there come
   from a per-trigger table indexed by the candidate's first byte (a rule's
   ``prefix`` such as a card brand's IIN is decided by the table or one regex
   call); the rule's value regexes are matched at that start on the window (several
   values as one alternation) and the validator (Luhn, mod-97, SSN rules, entropy
   ...) runs on the exact matched bytes.  Python work is proportional to the number
   of candidates, never to the number of bytes, and nothing is allocated for a
   candidate that does not validate.
3. **The blocking contract**: every value whose last byte has been passed to
   ``scan()`` is reported no later than that call.  Triggers carry no trailing
   ``\\b``/``$`` (which Hyperscan could only report on the next write); the right
   boundary is a Python look-ahead, which at the end of the data seen so far
   succeeds - end-of-data semantics.  A value at the very end of a chunk is
   therefore reported at once even if the next chunk could still extend it.
4. A candidate stays *pending* until ``max_length + 1`` bytes after its start have
   been seen (or the stream closes); then it is evaluated for the last time.  An
   earlier report that the final evaluation does not confirm (the number went on
   with more digits) is *retracted*: blocking already acted on it, which is the
   safe side, and offline tools (``dlp scan``) drop it, so their output does not
   depend on how the input was chunked.

Findings carry only masked values (``dlp_mask``).  ``confidence`` is a number in
(0, 1]: the rule's base confidence, plus 0.15 (capped at 0.99) when one of the
rule's context keywords appears in the 48 bytes before the value.

Engines are immutable: reloading builds a new engine (``DlpEngine.load``) and the
caller swaps its reference atomically; open streams finish on the engine they
started with.  The compiled database is cached on disk keyed by the triggers'
hash, so start-up after the first run is a file read; a read-only file system
only costs a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import hyperscan

from firewall.dlp.mask import context_snippet, mask_card, mask_hint, mask_shape
from firewall.dlp.rules import (
    DlpRuleError,
    Pack,
    Rule,
    Trigger,
    default_rules_dir,
    load_packs,
    offset_sets,
    pack_files,
    prefix_dispatch,
    rules_hash,
)
from firewall.observe.signature import signature_id

__all__ = ["DlpEngine", "DlpRuleError", "DlpStream", "Finding"]

log = logging.getLogger("palisade.dlp")

CACHE_FORMAT = b"palisade-dlp-hsdb-2"
KEYWORD_LOOKBACK = 48
CONTEXT_CHARS = 32
KEYWORD_BOOST = 0.15


class Finding(NamedTuple):
    """One sensitive value in a stream; ``start``/``end`` are absolute stream offsets (end exclusive).

    Immutable.  A named tuple rather than a frozen dataclass because one is built per
    finding on the hot path (tens of thousands per GB of PII-rich text), and a frozen
    dataclass's ``__init__`` costs one ``object.__setattr__`` per field (~3 us for these 11).
    """

    rule_id: str
    rule_name: str
    pack: str
    type: str
    severity: str
    start: int
    end: int
    masked: str
    confidence: float
    context: str
    default_action: str

    def to_json(self) -> dict[str, Any]:
        """The ``dlp scan`` line."""
        return {"rule": self.rule_id, "type": self.type, "start": self.start, "end": self.end,
                "masked": self.masked, "confidence": self.confidence}

    def eve(self) -> dict[str, Any]:
        """The ``dlp`` object of an EVE alert (the session adds direction and peers)."""
        return {"rule": self.rule_id, "rule_name": self.rule_name, "pack": self.pack,
                "type": self.type, "severity": self.severity, "masked": self.masked,
                "offset": self.start, "length": self.end - self.start,
                "confidence": self.confidence, "context": self.context}

    def alert(self, blocked: bool, direction: str) -> dict[str, Any]:
        """An EVE ``alert`` event body (category ``dlp``); the session adds addresses,
        workloads, ``flow_id`` and ``mode``.  ``direction`` is ``toserver``/``toclient``."""
        dlp = self.eve()
        dlp["direction"] = direction
        signature = f"DLP {self.rule_name}"
        return {
            "event_type": "alert",
            "alert": {"action": "blocked" if blocked else "allowed",
                      "signature": signature,
                      "signature_id": signature_id(signature),
                      "category": "dlp", "severity": SEVERITY_EVE[self.severity]},
            "dlp": dlp,
        }


# EVE severities are 1 (highest) .. 4, as in Suricata.
SEVERITY_EVE = {"critical": 1, "high": 2, "medium": 3, "low": 4}


def default_cache_dir() -> str:
    explicit = os.environ.get("PALISADE_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cand = os.path.join(base, "palisade")
    try:
        os.makedirs(cand, exist_ok=True)
        if os.access(cand, os.W_OK):
            return cand
    except OSError:
        pass
    return os.path.join(tempfile.gettempdir(), "palisade-cache")


@dataclass(slots=True)
class _Candidate:
    rule: int
    start: int
    reported: dict[tuple[int, int], Finding]


class DlpEngine:
    """All enabled rules of a set of packs, compiled into one stream-mode database."""

    def __init__(self, packs: dict[str, Pack], enabled: list[str], rules: list[Rule],
                 triggers: list[Trigger], trigger_rules: list[tuple[int, ...]],
                 db: hyperscan.Database | None, rules_hash_: str, cache_path: str | None) -> None:
        self._packs = packs
        self.enabled = enabled
        self.rules = rules
        self.triggers = triggers
        self._trigger_rules = trigger_rules
        self._db = db
        self.rules_hash = rules_hash_
        self.cache_path = cache_path
        self._order = {r.id: r.order for r in rules}
        # Keywords are stored lower-case and searched case-sensitively in the lowered look-back:
        # bytes.lower() and IGNORECASE fold the same (ASCII) letters, and a case-insensitive
        # alternation costs ~3x more than lowering 48 bytes and matching exactly (per finding).
        self._keywords = [re.compile(b"|".join(re.escape(k) for k in r.context))
                          if r.context else None for r in rules]
        self.holdback = max((r.max_length for r in rules), default=0)
        self.window = self.holdback + KEYWORD_LOOKBACK + CONTEXT_CHARS + 2
        self._tls = threading.local()
        self._close_lock = threading.RLock()  # re-entrant: a finaliser may run inside close()
        # Where a trigger's value starts: Hyperscan reports where a trigger ends (and, with SOM, starts).
        self._trigger_som = _som_flags(triggers)
        self._trigger_skip: list[int] = []  # start = from + skip (the consumed boundary byte)
        self._trigger_width: list[int] = []  # start = to - width (fixed width, no SOM)
        self._trigger_rx: list[re.Pattern[bytes]] = []  # otherwise: the trigger in Python, ending at \Z
        for t in triggers:
            self._trigger_skip.append(1 if t.boundary else 0)
            self._trigger_width.append(t.min_width if t.min_width == t.max_width else -1)
            body = f"(?:{t.pattern})\\Z"
            if t.boundary:
                body = f"(?<!{t.boundary})" + body
            self._trigger_rx.append(re.compile(body.encode()))
        # Which owners of a trigger to try at a candidate, by the candidate's first byte: a
        # table of 256 entries (rule, prefix regex still to check, or None) per trigger.  A rule
        # without 'prefix' is always tried; one whose prefix is a single character class is
        # decided by the table alone (Visa '4', SSN '[0-8]'); the others are listed under the
        # bytes their prefix can start with and checked with one regex call there.  Where the
        # rules left for a first byte want different bytes at some later offset inside the
        # trigger (an SSN a dash or space 4th, a card a digit), the entry is a second table
        # [offset, 256 rows] instead, so a candidate is only tried by rules that can match it.
        self._trigger_dispatch: list[list[Any]] = []
        interned: dict[Any, Any] = {}
        rule_sets: dict[int, list[frozenset[int]]] = {}
        for tid, owners in enumerate(trigger_rules):
            # Probing inside the trigger pays where one trigger serves rules of different shapes
            # (cards and SSNs); a rule's own trigger already has its value's shape.
            probe_max = min(8, triggers[tid].min_width) if len(owners) > 1 else 1
            trig_sets = offset_sets([triggers[tid].pattern], probe_max)
            plans = []
            for ri in owners:
                prefix = rules[ri].prefix
                if ri not in rule_sets and probe_max > 1:
                    rule_sets[ri] = _rule_offset_sets(rules[ri], 8)
                if prefix is None:
                    plans.append((ri, None, None))
                    continue
                first, one = prefix_dispatch(prefix.pattern.decode("ascii"))
                plans.append((ri, first, None if one else prefix))
            memo: dict[Any, Any] = {}
            by_admitted: dict[tuple[bool, ...], Any] = {}  # most bytes admit the same rules
            table = []
            for byte in range(256):
                admitted = tuple(first is None or byte in first for _, first, _ in plans)
                entry = by_admitted.get(admitted)
                if entry is None:
                    row = tuple((ri, check) for (ri, _, check), ok in zip(plans, admitted, strict=True) if ok)
                    entry = by_admitted[admitted] = _split_row(row, frozenset(), PROBE_DEPTH, trig_sets,
                                                               rule_sets, memo, interned)
                table.append(entry)
            self._trigger_dispatch.append(table)
        # Per rule, what the evaluation needs: the validator, the value regexes, and - when there
        # are several without groups of their own (the card shapes) - the alternation of
        # values[j:] for every j, so "the first value that matches" is one regex call instead
        # of one per value (the alternation tries them in order, exactly like the loop).
        self._rule_values: list[tuple[Any, tuple[tuple[re.Pattern[bytes], bool], ...],
                                      tuple[re.Pattern[bytes], ...] | None]] = []
        # The same for _process's inlined common cases: (max_length, validator, kind, regexes),
        # kind 1 = alternations as above, 2 = one value regex without a 'secret' group,
        # 0 = anything else (DlpStream._evaluate).
        self._rule_fast: list[tuple[int, Any, int, tuple[re.Pattern[bytes], ...]]] = []
        for r in rules:
            values = tuple((rx, "secret" in rx.groupindex) for rx in r.values)
            combos = None
            if len(r.values) > 1 and all(rx.groups == 0 for rx in r.values):
                try:
                    combos = tuple(re.compile(b"|".join(b"(" + rx.pattern + b")" for rx in r.values[j:]))
                                   for j in range(len(r.values)))
                except re.error:  # e.g. a value with inline global flags: keep the loop
                    combos = None
            self._rule_values.append((r.validator, values, combos))
            if combos is not None:
                self._rule_fast.append((r.max_length, r.validator, 1, combos))
            elif len(values) == 1 and not values[0][1]:
                self._rule_fast.append((r.max_length, r.validator, 2, r.values))
            else:
                self._rule_fast.append((r.max_length, r.validator, 0, ()))
        # Confidence with and without a context keyword before the value, rounded once.
        self._confidence = [(round(r.confidence, 2), round(min(0.99, r.confidence + KEYWORD_BOOST), 2))
                            for r in rules]
        self._load_args: tuple[Any, ...] = ()

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, rules_dirs: str | list[str] | None = None, enable: list[str] | None = None,
             cache_dir: str | None = None) -> DlpEngine:
        """Load, check and compile rule packs; raises ``DlpRuleError("path: message")``.

        ``enable=None`` enables every pack whose ``enabled_by_default`` is true.
        """
        if rules_dirs is None:
            dirs = [default_rules_dir()]
        elif isinstance(rules_dirs, (str, os.PathLike)):
            dirs = [str(rules_dirs)]
        else:
            dirs = [str(d) for d in rules_dirs]
        files = pack_files(dirs)
        if not files:
            raise DlpRuleError(f"{', '.join(dirs)}: no rule packs (*.yaml)")
        loaded = load_packs(dirs)
        packs = {name: p for name, (p, _) in loaded.items()}
        if enable is None:
            enabled = [n for n, p in packs.items() if p.enabled_by_default]
        else:
            enabled = []
            for name in enable:
                if name not in packs:
                    known = ", ".join(sorted(packs))
                    raise DlpRuleError(f"enable: unknown pack {name!r} (known: {known})")
                if name not in enabled:
                    enabled.append(name)
        rules: list[Rule] = []
        triggers: list[Trigger] = []
        trig_index: dict[tuple[str, str | None], int] = {}
        trig_rules: list[list[int]] = []
        for name in sorted(enabled, key=lambda n: list(packs).index(n)):
            for rule, rule_triggers in loaded[name][1]:
                if not rule.enabled:
                    continue
                ri = len(rules)
                rules.append(dataclasses.replace(rule, order=ri))
                for trig in rule_triggers:
                    key = (trig.pattern, trig.boundary)
                    if key not in trig_index:
                        trig_index[key] = len(triggers)
                        triggers.append(trig)
                        trig_rules.append([])
                    if ri not in trig_rules[trig_index[key]]:
                        trig_rules[trig_index[key]].append(ri)
        db, cache_path = _database(triggers, rules, trig_rules, cache_dir)
        engine = cls(packs, enabled, rules, triggers, [tuple(x) for x in trig_rules], db,
                     rules_hash(files, enable), cache_path)
        engine._load_args = (dirs, enable, cache_dir)
        return engine

    def reload(self) -> DlpEngine:
        """A new engine from the same sources (this one stays valid for open streams)."""
        dirs, enable, cache_dir = self._load_args
        return DlpEngine.load(dirs, enable, cache_dir)

    @property
    def packs(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, pack in self._packs.items():
            info = pack.info()
            info["enabled"] = name in self.enabled
            out[name] = info
        return out

    # ---------------------------------------------------------------- scanning
    def stream(self, track_retractions: bool = False) -> DlpStream:
        return DlpStream(self, track_retractions)

    def scan_bytes(self, data: bytes, chunk_size: int = 65536) -> list[Finding]:
        """Whole-buffer convenience: one stream, fed in chunks, closed; retractions dropped."""
        s = self.stream(track_retractions=True)
        found: list[Finding] = []
        view = memoryview(data)
        for off in range(0, len(data), max(1, chunk_size)):
            found.extend(s.scan(view[off:off + chunk_size]))
        found.extend(s.close())
        gone = {(f.rule_id, f.start, f.end) for f in s.retracted}
        return sorted((f for f in found if (f.rule_id, f.start, f.end) not in gone),
                      key=lambda f: (f.start, f.end, f.rule_id))

    def _scratch(self) -> hyperscan.Scratch:
        scratch = getattr(self._tls, "scratch", None)
        if scratch is None:
            scratch = hyperscan.Scratch(self._db)
            self._tls.scratch = scratch
        return scratch


# Start-of-match tracking is asked for variable-width triggers up to this width: Hyperscan then
# reports where the trigger started at no measurable cost (a digit-shape union on text: same
# MB/s with and without), which saves a Python regex search per candidate.  For long, loose
# triggers (an e-mail local part of 1-64 characters) it halves the scan speed, so those are
# located in Python instead (they are rare and off by default).
SOM_MAX_WIDTH = 32
# How many bytes inside a trigger (after the first) the rule dispatch may look at.
PROBE_DEPTH = 2


def _rule_offset_sets(rule: Rule, k_max: int) -> list[frozenset[int]]:
    """Bytes a rule's value can have at offsets 0 .. k_max-1: its values' and its prefix's."""
    sets = offset_sets([rx.pattern.decode("ascii") for rx in rule.values], k_max)
    if rule.prefix is not None:
        pre = offset_sets([rule.prefix.pattern.decode("ascii")], k_max)
        sets = [a & b for a, b in zip(sets, pre, strict=True)]
    return sets


def _split_row(row: Any, used: frozenset[int], depth: int, trig_sets: list[frozenset[int]],
               rule_sets: dict[int, list[frozenset[int]]], memo: dict[Any, Any], interned: dict[Any, Any]) -> Any:
    """A dispatch entry: the rules to try (a tuple), or - when the rules left want different
    bytes at some offset inside the trigger - ``[offset, 256 entries]`` on the most selective
    offset, up to ``depth`` levels.  Identical rows and sub-tables are shared."""
    key = (row, used, depth)
    if key in memo:
        return memo[key]
    best = None
    for k in range(1, len(trig_sets)):
        if k in used:
            continue
        allowed = trig_sets[k]
        kept = sum(len(rule_sets[ri][k] & allowed) for ri, _ in row)
        if kept < len(row) * len(allowed) and (best is None or kept < best[0]):
            best = (kept, k)
    entry: Any = interned.setdefault(row, row)
    if row and best is not None and depth > 0:
        k = best[1]
        entry = [k, [_split_row(tuple(x for x in row if b in rule_sets[x[0]][k]), used | {k}, depth - 1,
                                trig_sets, rule_sets, memo, interned) for b in range(256)]]
    memo[key] = entry
    return entry


def _som_flags(triggers: list[Trigger]) -> list[bool]:
    return [t.min_width != t.max_width and t.max_width <= SOM_MAX_WIDTH for t in triggers]


def _hs_compile(expressions: list[bytes], som: list[bool]) -> hyperscan.Database:
    mode = hyperscan.HS_MODE_STREAM
    if any(som):
        mode |= hyperscan.HS_MODE_SOM_HORIZON_SMALL  # triggers are short: 2^16 bytes is plenty
    db = hyperscan.Database(mode=mode)
    db.compile(expressions=expressions, ids=list(range(len(expressions))), elements=len(expressions),
               flags=[hyperscan.HS_FLAG_SOM_LEFTMOST if x else 0 for x in som])
    return db


def _database(triggers: list[Trigger], rules: list[Rule], trig_rules: list[list[int]],
              cache_dir: str | None) -> tuple[hyperscan.Database | None, str | None]:
    """Load the compiled database from the cache, or compile (and try to cache) it."""
    if not triggers:
        return None, None
    expressions = [t.expression for t in triggers]
    som = _som_flags(triggers)
    version = getattr(hyperscan, "__version__", "?")
    flags = bytes(int(x) for x in som)
    key = hashlib.sha256(CACHE_FORMAT + version.encode() + b"\0" + flags + b"\0"
                         + b"\0".join(expressions)).hexdigest()
    directory = cache_dir or default_cache_dir()
    path = os.path.join(directory, f"dlp-{key[:32]}.hsdb")
    db = _read_cache(path, any(som))
    if db is not None:
        return db, path
    try:
        db = _hs_compile(expressions, som)
    except hyperscan.error:
        # Name the culprit: compile one trigger at a time.
        for i, expr in enumerate(expressions):
            try:
                _hs_compile([expr], [som[i]])
            except hyperscan.error as exc:
                rule = rules[trig_rules[i][0]]
                raise DlpRuleError(
                    f"{rule.source}: {rule.id}: pattern {triggers[i].pattern!r}: hyperscan: {exc}") from None
        raise DlpRuleError("dlp_rules: hyperscan could not compile the combined database") from None
    _write_cache(path, hyperscan.dumpb(db))
    return db, path


def _read_cache(path: str, som: bool) -> hyperscan.Database | None:
    try:
        blob = Path(path).read_bytes()
    except OSError:
        return None
    head = len(CACHE_FORMAT)
    if blob[:head] != CACHE_FORMAT or hashlib.sha256(blob[head + 32:]).digest() != blob[head:head + 32]:
        log.warning("dlp: ignoring corrupt database cache %s", path)
        return None
    try:
        mode = hyperscan.HS_MODE_STREAM | (hyperscan.HS_MODE_SOM_HORIZON_SMALL if som else 0)
        db = hyperscan.loadb(blob[head + 32:], mode)
        db.scratch = hyperscan.Scratch(db)
    except hyperscan.error:
        log.warning("dlp: ignoring incompatible database cache %s", path)
        return None
    return db


def _write_cache(path: str, payload: bytes) -> None:
    blob = CACHE_FORMAT + hashlib.sha256(payload).digest() + payload
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dlp-", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("dlp: cannot write database cache %s: %s (start-up will recompile)", path, exc.strerror)


class DlpStream:
    """One direction of one connection.  Not thread-safe; one thread drives one stream."""

    __slots__ = ("_engine", "_hs", "_seen", "_tail", "_tail_base", "_hits", "_cb", "_ctx",
                 "_pending", "_spans", "_closed", "_track", "retracted")

    def __init__(self, engine: DlpEngine, track_retractions: bool = False) -> None:
        self._engine = engine
        self._hs: Any = None
        self._seen = 0
        self._tail = b""
        self._tail_base = 0
        self._hits: list[tuple[int, int, int]] = []
        hits = self._hits.append

        def on_match(tid: int, frm: int, to: int, _flags: int, _ctx: object) -> None:
            hits((frm, to, tid))

        # The hyperscan binding keeps borrowed references: hold them for the stream's life.
        self._cb = on_match
        self._ctx = (self,)
        self._pending: dict[tuple[int, int], _Candidate] = {}
        self._spans: dict[tuple[int, int], int] = {}
        self._closed = False
        self._track = track_retractions
        self.retracted: list[Finding] = []

    @property
    def offset(self) -> int:
        """Bytes scanned so far."""
        return self._seen

    def __del__(self) -> None:
        # A flow torn down without close() must not leak the Hyperscan stream state.
        hs = getattr(self, "_hs", None)
        if hs is not None:
            self._hs = None
            try:
                with self._engine._close_lock:
                    hs.close(match_event_handler=self._cb, context=self._ctx)
            except Exception:  # noqa: BLE001 - nothing useful to do in a finaliser
                pass

    def scan(self, data: bytes | bytearray | memoryview) -> list[Finding]:
        """Scan the next bytes of the stream; returns every value completed by them (see module doc)."""
        if self._closed:
            raise ValueError("scan() on a closed DlpStream")
        n = len(data)
        if n == 0 or self._engine._db is None:
            self._seen += n
            return []
        eng = self._engine
        if self._hs is None:
            self._hs = eng._db.stream(match_event_handler=self._cb, context=self._ctx)
            self._hs.__enter__()
        self._hs.scan(data, scratch=eng._scratch(), match_event_handler=self._cb, context=self._ctx)
        self._seen += n
        width = eng.window
        if not self._hits and not self._pending:
            if n >= width:
                self._tail = bytes(data[n - width:])
            else:
                self._tail = (self._tail + bytes(data))[-width:]
            self._tail_base = self._seen - len(self._tail)
            return []
        window = b"".join((self._tail, data))  # one copy (tail + bytes(data) would be two)
        base = self._tail_base
        out = self._process(window, base, final=False)
        self._tail = window[-width:]
        self._tail_base = self._seen - len(self._tail)
        return out

    def close(self) -> list[Finding]:
        """End of stream: flush Hyperscan and settle pending candidates (idempotent)."""
        if self._closed:
            return []
        self._closed = True
        if self._hs is None:
            return []
        eng = self._engine
        with eng._close_lock:  # close uses the database's own scratch
            self._hs.close(match_event_handler=self._cb, context=self._ctx)
        self._hs = None
        out = self._process(self._tail, self._tail_base, final=True)
        self._pending.clear()
        self._spans.clear()
        return out

    # ------------------------------------------------------------------ internals
    def _process(self, window: bytes, base: int, final: bool) -> list[Finding]:
        """Turn this call's trigger hits into candidates; settle those whose span is complete.

        The hot loop of the engine on text (one pass per hit, a few regex calls each): the
        common rule shapes are evaluated inline, and nothing is allocated for a candidate
        that does not validate."""
        eng = self._engine
        pending = self._pending
        spans = self._spans
        skip = eng._trigger_skip
        width = eng._trigger_width
        som = eng._trigger_som
        dispatch = eng._trigger_dispatch
        fast = eng._rule_fast
        seen = self._seen
        out: list[Finding] = []
        for frm, t, tid in self._hits:
            w = width[tid]
            if w >= 0:
                start = t - w
            elif som[tid] and (frm or not skip[tid]):
                start = frm + skip[tid]  # SOM: past the consumed boundary byte, if any
            else:
                start = self._locate(tid, window, base, frm, t)
                if start < 0:
                    continue
            pos = start - base
            if pos < 0:  # cannot happen (the window outlasts every trigger); never index from the end
                continue
            row = dispatch[tid][window[pos]]
            while row.__class__ is list:  # next table by the byte at offset row[0] (< trigger width)
                row = row[1][window[pos + row[0]]]
            for ri, check in row:
                if check is not None and check.match(window, pos) is None:
                    continue
                if pending and (ri, start) in pending:
                    continue
                max_length, validator, kind, rxs = fast[ri]
                if not final and seen <= start + max_length:
                    pending[(ri, start)] = _Candidate(ri, start, {})  # may still grow: settle later
                    continue
                # Everything the value can span is here: settle it now.
                res = None
                if kind == 1:
                    j, n = 0, len(rxs)
                    while j < n:
                        m = rxs[j].match(window, pos)
                        if m is None:
                            break
                        vs, ve = m.span()
                        if validator(window[vs:ve]):
                            res = (vs, ve, m)
                            break
                        j += m.lastindex  # type: ignore[operator] - group k of rxs[j] is value j + k - 1
                elif kind == 2:
                    m = rxs[0].match(window, pos)
                    if m is not None:
                        vs, ve = m.span()
                        if validator(window[vs:ve]):
                            res = (vs, ve, m)
                else:
                    res = self._evaluate(ri, window, pos)
                if res is not None:
                    span = (res[0] + base, res[1] + base)
                    if span not in spans:
                        spans[span] = ri
                        out.append(self._finding(eng.rules[ri], window, base, *span, res[2]))
        self._hits.clear()
        if pending:
            self._settle_pending(window, base, final, out)
        if len(spans) > 256:
            horizon = seen - eng.window
            self._spans = {k: v for k, v in spans.items() if k[1] >= horizon}
        if len(out) > 1:
            out.sort(key=lambda f: (f.start, eng._order[f.rule_id]))
        return out

    def _locate(self, tid: int, window: bytes, base: int, frm: int, t: int) -> int:
        """Start of a trigger's value when Hyperscan's report does not give it: a long
        variable-width trigger without SOM, or a boundary trigger reported from stream offset 0
        (``^`` and a consumed boundary byte both start there).  -1 if out of the window."""
        eng = self._engine
        lo = max(0, t - eng.triggers[tid].max_width - base, frm - base)
        m = eng._trigger_rx[tid].search(window, lo, t - base)  # leftmost start ending at t
        return -1 if m is None else m.start() + base

    def _settle_pending(self, window: bytes, base: int, final: bool, out: list[Finding]) -> None:
        """Candidates near the end of the data: report what matches now, settle when complete."""
        rules = self._engine.rules
        seen = self._seen
        done = []
        for key, cand in self._pending.items():
            rule = rules[cand.rule]
            complete = final or seen > cand.start + rule.max_length
            pos = cand.start - base
            res = None
            if pos >= 0 and (rule.prefix is None or rule.prefix.match(window, pos) is not None):
                res = self._evaluate(cand.rule, window, pos)
            span = None
            if res is not None:
                span = (res[0] + base, res[1] + base)
                if span not in cand.reported and span not in self._spans:
                    finding = self._finding(rule, window, base, *span, res[2])
                    self._spans[span] = cand.rule
                    cand.reported[span] = finding
                    out.append(finding)
            if complete:
                for sp, f in cand.reported.items():
                    if sp != span:
                        self._spans.pop(sp, None)
                        if self._track:
                            self.retracted.append(f)
                done.append(key)
        for key in done:
            del self._pending[key]

    def _evaluate(self, ri: int, window: bytes, pos: int) -> tuple[int, int, re.Match[bytes]] | None:
        """The first of the rule's value regexes that matches at ``pos`` and validates
        (window-relative span).  The rule's prefix has already been checked."""
        validator, values, combos = self._engine._rule_values[ri]
        if combos is not None:
            j, n = 0, len(combos)
            while j < n:
                m = combos[j].match(window, pos)
                if m is None:
                    return None
                vs, ve = m.span()
                if validator(window[vs:ve]):
                    return vs, ve, m
                j += m.lastindex  # type: ignore[operator] - group k of combos[j] is values[j + k - 1]
            return None
        for rx, has_secret in values:
            m = rx.match(window, pos)
            if m is None:
                continue
            if has_secret and m.start("secret") >= 0:
                vs, ve = m.span("secret")
            else:
                vs, ve = m.span()
            if validator(window[vs:ve]):
                return vs, ve, m
        return None

    def _finding(self, rule: Rule, window: bytes, base: int, start: int, end: int,
                 m: re.Match[bytes]) -> Finding:
        vs, ve = start - base, end - base
        value = window[vs:ve]
        if rule.mask == "card":
            masked = mask_card(value)
        elif rule.mask == "shape":
            masked = mask_shape(value)
        else:
            hint = None
            inside = False
            if "hint" in m.re.groupindex and m.start("hint") >= 0:
                hint = m.group("hint")
                inside = vs <= m.start("hint") < ve
            masked = mask_hint(value, hint, inside)
        plain, boosted = self._engine._confidence[rule.order]
        keywords = self._engine._keywords[rule.order]
        confidence = plain
        if keywords is not None and keywords.search(window[max(0, vs - KEYWORD_LOOKBACK):vs].lower()):
            confidence = boosted
        ctx = context_snippet(window[max(0, vs - CONTEXT_CHARS):vs], masked,
                              window[ve:ve + CONTEXT_CHARS])
        return Finding(rule.id, rule.name, rule.pack, rule.type, rule.severity, start, end,
                       masked, confidence, ctx, rule.action)

