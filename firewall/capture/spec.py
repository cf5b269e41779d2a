"""A capture's options: the ``palisade.dev/pcap`` value (``duration=60s,filter=tcp port 5432``) parsed
and bounded, and the limits every capture lives within. See ``firewall.capture.manager`` for the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_DURATION_S = 60.0
MAX_DURATION_S = 3600.0
DEFAULT_MAX_BYTES = 50 * MiB
MAX_MAX_BYTES = 10 * GiB
DEFAULT_SNAPLEN = 65535
MAX_SNAPLEN = 262144
MIN_ROTATE_BYTES = 1 * KiB
MAX_ROTATE_FILES = 1000
MIN_CAPTURE_BYTES = 64 * KiB   # below this a budget-clamped capture is refused instead


class CaptureSpecError(ValueError):
    """A capture option string or filter that cannot be used (the message says why)."""


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What to capture and when to stop. ``iface=None`` means every interface but ``lo``."""

    duration_s: float = DEFAULT_DURATION_S
    filter: str = ""
    max_bytes: int = DEFAULT_MAX_BYTES
    max_packets: int | None = None
    snaplen: int = DEFAULT_SNAPLEN
    rotate_bytes: int | None = None
    iface: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "duration": self.duration_s, "filter": self.filter, "max-bytes": self.max_bytes,
            "max-packets": self.max_packets, "snaplen": self.snaplen, "rotate": self.rotate_bytes,
            "iface": self.iface or "all-but-lo",
        }


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_KEY_RE = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*=(?!=)(.*)$", re.DOTALL)
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_KEYS = ("duration", "filter", "max-bytes", "max-packets", "snaplen", "rotate", "iface")


def parse_duration(text: str) -> float:
    """``60``/``60s``/``500ms``/``5m``/``1h`` -> seconds (a bare number is seconds)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise CaptureSpecError(f"duration: {text!r} is not a duration (e.g. 30s, 5m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "s").lower()]


def parse_size(text: str) -> int:
    """``1024``/``64KiB``/``10MiB``/``1GiB`` (binary), ``10MB`` (decimal), ``10M``/``10k`` (binary)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise CaptureSpecError(f"{text!r} is not a size (e.g. 50MiB, 512KiB, 1000000)")
    unit = (m.group(2) or "b").lower()
    if unit == "b":
        mult = 1
    else:
        power = "kmg".index(unit[0]) + 1
        decimal = unit.endswith("b") and not unit.endswith("ib")
        mult = (1000 if decimal else 1024) ** power
    return int(float(m.group(1)) * mult)


def parse_spec(value: str) -> CaptureSpec:
    """Parse ``key=value,key=value`` (the ``palisade.dev/pcap`` annotation).

    Keys: ``duration`` (default 60s, at most 1h), ``filter`` (tcpdump syntax,
    compiled here so a bad filter is refused up front), ``max-bytes`` (default
    50MiB), ``max-packets``, ``snaplen`` (default 65535), ``rotate`` (file size;
    numbered files), ``iface``. A comma inside the filter is kept when what
    follows it is not ``key=``. Raises :class:`CaptureSpecError`.
    """
    if not isinstance(value, str):
        raise CaptureSpecError("capture spec must be a string")
    pairs: list[list[str]] = []
    for part in value.split(","):
        m = _KEY_RE.match(part)
        if m:
            pairs.append([m.group(1).strip().lower(), m.group(2)])
        elif pairs and pairs[-1][0] == "filter":
            pairs[-1][1] += "," + part
        elif part.strip():
            raise CaptureSpecError(f"expected key=value, got {part.strip()!r}")
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for key, raw in pairs:
        raw = raw.strip()
        if key not in _KEYS:
            raise CaptureSpecError(f"unknown key {key!r} (known: {', '.join(_KEYS)})")
        if key in seen:
            raise CaptureSpecError(f"{key} given twice")
        seen.add(key)
        if key == "duration":
            d = parse_duration(raw)
            if not 0 < d <= MAX_DURATION_S:
                raise CaptureSpecError(f"duration: must be > 0 and at most 1h, got {raw!r}")
            fields["duration_s"] = d
        elif key == "filter":
            fields["filter"] = raw
        elif key == "max-bytes":
            n = _size_field(key, raw)
            if not 1 * KiB <= n <= MAX_MAX_BYTES:
                raise CaptureSpecError(f"max-bytes: must be between 1KiB and 10GiB, got {raw!r}")
            fields["max_bytes"] = n
        elif key == "max-packets":
            if not raw.isdigit() or int(raw) <= 0:
                raise CaptureSpecError(f"max-packets: must be a positive integer, got {raw!r}")
            fields["max_packets"] = int(raw)
        elif key == "snaplen":
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_SNAPLEN:
                raise CaptureSpecError(f"snaplen: must be an integer 1..{MAX_SNAPLEN}, got {raw!r}")
            fields["snaplen"] = int(raw)
        elif key == "rotate":
            n = _size_field(key, raw)
            if n < MIN_ROTATE_BYTES:
                raise CaptureSpecError(f"rotate: must be at least 1KiB, got {raw!r}")
            fields["rotate_bytes"] = n
        elif key == "iface":
            if raw.lower() in ("", "any", "all"):
                fields["iface"] = None
            elif not _IFACE_RE.fullmatch(raw):
                raise CaptureSpecError(f"iface: {raw!r} is not an interface name")
            else:
                fields["iface"] = raw
    spec = CaptureSpec(**fields)
    if spec.rotate_bytes and spec.max_bytes // spec.rotate_bytes > MAX_ROTATE_FILES:
        raise CaptureSpecError(f"rotate: {spec.rotate_bytes} bytes per file would make more than "
                               f"{MAX_ROTATE_FILES} files for max-bytes {spec.max_bytes}")
    if spec.filter:
        from firewall.capture.bpf import compile_filter  # bpf imports this module for its errors

        compile_filter(spec.filter, spec.snaplen)
    return spec


def _size_field(key: str, raw: str) -> int:
    try:
        return parse_size(raw)
    except CaptureSpecError as exc:
        raise CaptureSpecError(f"{key}: {exc}") from None
