"""Shared plumbing for the fuzz harnesses.

Every harness module defines ``TestOneInput(data: bytes) -> None`` (atheris' entry
point) and ``SEEDS`` (a few valid inputs to start from), and ends with
``if __name__ == "__main__": main(TestOneInput, SEEDS, "<name>")``.

``TestOneInput`` raises only on a real bug: an exception the target promised not
to raise, or a broken invariant (``FuzzFailure``). The same function is what the
short in-suite run (``tests/robustness/test_fuzz_short.py``) drives with
hypothesis, so a harness never depends on atheris being installed.

Input decoding does not use atheris' ``FuzzedDataProvider`` for the same reason:
``Bytes`` is a tiny stand-in that takes integers and slices from the front.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent
CORPUS = FUZZ_DIR / "corpus"
REGRESSIONS = FUZZ_DIR / "regressions"


class FuzzFailure(AssertionError):
    """An invariant of the target does not hold for this input."""


def check(cond: object, msg: str) -> None:
    if not cond:
        raise FuzzFailure(msg)


def have_atheris() -> bool:
    return importlib.util.find_spec("atheris") is not None


def instrumented(active: bool):
    """``atheris.instrument_imports()`` when running as a fuzzer, else a no-op context."""
    if active and have_atheris():
        import atheris

        return atheris.instrument_imports(include=["firewall", "injector"])
    return contextlib.nullcontext()


class Bytes:
    """Consume a fuzzer's bytes from the front: small integers, then the rest as payload."""

    __slots__ = ("data", "i")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.i = 0

    def byte(self) -> int:
        if self.i >= len(self.data):
            return 0
        b = self.data[self.i]
        self.i += 1
        return b

    def take(self, n: int) -> bytes:
        out = self.data[self.i:self.i + n]
        self.i += len(out)
        return out

    def rest(self) -> bytes:
        out = self.data[self.i:]
        self.i = len(self.data)
        return out


def split_points(spec: bytes, total: int) -> list[int]:
    """Segment sizes (1..64, cycling through ``spec``) covering ``total`` bytes."""
    sizes = [(b % 64) + 1 for b in spec] or [total or 1]
    out, done, k = [], 0, 0
    while done < total:
        n = min(sizes[k % len(sizes)], total - done)
        out.append(n)
        done += n
        k += 1
    return out


def segments(payload: bytes, spec: bytes) -> Iterator[bytes]:
    off = 0
    for n in split_points(spec, len(payload)):
        yield payload[off:off + n]
        off += n


def write_seeds(name: str, seeds: list[bytes], base: Path | None = None) -> Path:
    """The seed corpus directory for ``name`` (created from ``SEEDS`` on first use)."""
    d = (base or CORPUS) / name
    d.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds):
        p = d / f"seed-{i:03d}"
        if not p.exists():
            p.write_bytes(s)
    return d


def regression_inputs(name: str) -> list[tuple[str, bytes]]:
    """Inputs that once crashed a harness (``fuzz/regressions/<name>/``), replayed by the suite."""
    d = REGRESSIONS / name
    if not d.is_dir():
        return []
    return [(p.name, p.read_bytes()) for p in sorted(d.iterdir()) if p.is_file()]


def main(target: Callable[[bytes], None], seeds: list[bytes], name: str) -> None:
    """Run under atheris (libFuzzer flags pass through); a seed corpus dir is added when none is given."""
    if not have_atheris():
        sys.exit("atheris is not installed: pip install atheris (see fuzz/README.md)")
    import atheris

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(str(write_seeds(name, seeds)))
    if not any(a.startswith("-artifact_prefix=") for a in argv):
        art = FUZZ_DIR / "artifacts" / name
        art.mkdir(parents=True, exist_ok=True)
        argv.insert(1, f"-artifact_prefix={art}/")
    os.environ.setdefault("PALISADE_FUZZING", "1")
    atheris.Setup(argv, target)
    atheris.Fuzz()
