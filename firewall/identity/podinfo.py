"""The pod's own annotations and labels, read from a downward-API volume.

Why a file and not the Kubernetes API: the sidecar then needs no credentials to
learn about ``palisade.dev/pcap``, ``palisade.dev/quarantine`` or
``palisade.dev/mode``. The price is the kubelet's update mechanism, which this
module hides:

* The files (``annotations``, ``labels``) hold one ``key="value"`` line per
  entry, sorted by key, the value quoted like Go's ``strconv.Quote``
  (``\\"``, ``\\\\``, ``\\n``, ``\\t``, ``\\xNN``, ``\\uNNNN`` ...), no trailing newline.
* The kubelet never rewrites a file in place. It writes a new timestamped
  directory (``..2026_11_28_12_00_00.123456789``), points a temporary symlink at
  it, renames that over ``..data`` (atomic) and removes the old directory. The
  visible files are symlinks through ``..data``. An inotify watch on the file
  would follow the old inode and miss the swap, so :class:`PodinfoWatcher`
  watches the *directory* and re-reads on any entry change, and falls back to
  polling when inotify is unavailable (seccomp, exhausted watches, odd
  filesystems).

``write_podinfo`` reproduces the kubelet's writes exactly so tests and the
demo exercise the same swap the sidecar sees in a cluster.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import random
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations"
LABELS_FILE = "labels"
DATA_LINK = "..data"


class PodinfoError(ValueError):
    """A downward-API file that is not in the kubelet's format (message names the line)."""


# --------------------------------------------------------------------------- parsing

_SIMPLE_ESCAPES = {
    "a": b"\a", "b": b"\b", "f": b"\f", "n": b"\n", "r": b"\r", "t": b"\t", "v": b"\v",
    "\\": b"\\", '"': b'"',
}
_HEX = set("0123456789abcdefABCDEF")


def _unquote(quoted: str, lineno: int) -> str:
    """Decode one Go double-quoted string literal (``strconv.Unquote`` rules).

    Go strings are bytes: ``\\xNN`` and octal escapes yield raw bytes, so the
    value is assembled as bytes and decoded as UTF-8 at the end (invalid
    sequences become U+FFFD rather than an error - the kubelet writes what the
    API server stored, and one odd byte must not hide every other annotation).
    """
    if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
        raise PodinfoError(f"line {lineno}: value must be a double-quoted string")
    body = quoted[1:-1]
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c == '"':
            raise PodinfoError(f"line {lineno}: unescaped '\"' inside the value")
        if c != "\\":
            j = body.find("\\", i)
            j = n if j < 0 else j
            chunk = body[i:j]
            if '"' in chunk:
                raise PodinfoError(f"line {lineno}: unescaped '\"' inside the value")
            out += chunk.encode("utf-8", "surrogatepass")
            i = j
            continue
        if i + 1 >= n:
            raise PodinfoError(f"line {lineno}: value is not terminated (its closing quote is escaped)")
        e = body[i + 1]
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e]
            i += 2
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i + 2:i + 2 + width]
            if len(digits) != width or not set(digits) <= _HEX:
                raise PodinfoError(f"line {lineno}: bad \\{e} escape (needs {width} hex digits)")
            value = int(digits, 16)
            if e == "x":
                out.append(value)
            else:
                if value > 0x10FFFF or 0xD800 <= value <= 0xDFFF:
                    raise PodinfoError(f"line {lineno}: \\{e}{digits} is not a valid code point")
                out += chr(value).encode("utf-8")
            i += 2 + width
        elif e in "01234567":
            digits = body[i + 1:i + 4]
            if len(digits) != 3 or not set(digits) <= set("01234567") or int(digits, 8) > 255:
                raise PodinfoError(f"line {lineno}: bad octal escape \\{digits}")
            out.append(int(digits, 8))
            i += 4
        else:
            raise PodinfoError(f"line {lineno}: unknown escape \\{e}")
    return out.decode("utf-8", "replace")


def parse_downward(text: str) -> dict[str, str]:
    """Parse a downward-API ``annotations``/``labels`` file into a dict.

    Blank lines are ignored; anything else must be ``key="value"``.
    Raises :class:`PodinfoError` ("line N: ...") on the first malformed line.
    """
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise PodinfoError(f"line {lineno}: expected key=\"value\", found no '='")
        if not key or key != key.strip() or any(ch.isspace() for ch in key):
            raise PodinfoError(f"line {lineno}: bad key {key!r}")
        result[key] = _unquote(value, lineno)
    return result


def go_quote(value: str) -> str:
    """Quote like Go's ``%q`` / ``strconv.Quote`` (what the kubelet writes)."""
    out = ['"']
    for ch in value:
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == " " or (ch.isprintable() and not 0xD800 <= cp <= 0xDFFF):
            out.append(ch)
        elif ch in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                        "\t": "\\t", "\v": "\\v"}[ch])
        elif cp < 0x20 or cp == 0x7F:
            out.append(f"\\x{cp:02x}")
        elif cp < 0x10000:
            out.append(f"\\u{cp:04x}")
        else:
            out.append(f"\\U{cp:08x}")
    out.append('"')
    return "".join(out)


def format_downward(values: dict[str, str]) -> str:
    """The kubelet's ``formatMap``: sorted ``key="value"`` lines, no trailing newline."""
    return "\n".join(f"{k}={go_quote(v)}" for k, v in sorted(values.items()))


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class PodInfo:
    """One consistent snapshot of the pod's annotations and labels."""

    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


def _read_raw(directory: str) -> tuple[bytes, bytes]:
    """Both files' bytes from one generation of the volume.

    Resolving ``..data`` once and reading both files through the resolved
    directory gives a consistent pair even if the kubelet swaps in between.
    If the old generation is removed while we read, retry on the new one.
    Missing files read as empty (a volume may project only one of them).
    """
    if not os.path.isdir(directory):
        raise PodinfoError(f"{directory}: podinfo directory does not exist")
    last_exc: OSError | None = None
    for _ in range(5):
        data_link = os.path.join(directory, DATA_LINK)
        base = os.path.realpath(data_link) if os.path.lexists(data_link) else directory
        try:
            return (_read_optional(os.path.join(base, ANNOTATIONS_FILE)),
                    _read_optional(os.path.join(base, LABELS_FILE)))
        except FileNotFoundError as exc:  # generation removed under us
            last_exc = exc
            time.sleep(0.01)
    raise PodinfoError(f"{directory}: files keep disappearing while read ({last_exc})")


def _read_optional(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        if os.path.isdir(os.path.dirname(path)):
            return b""
        raise


def _decode(raw: tuple[bytes, bytes], directory: str) -> PodInfo:
    parsed = []
    for name, data in zip((ANNOTATIONS_FILE, LABELS_FILE), raw, strict=True):
        try:
            parsed.append(parse_downward(data.decode("utf-8", "replace")))
        except PodinfoError as exc:
            raise PodinfoError(f"{os.path.join(directory, name)}: {exc}") from None
    return PodInfo(annotations=parsed[0], labels=parsed[1])


def read_podinfo(directory: str) -> PodInfo:
    """Read and parse ``annotations`` and ``labels`` from a downward-API directory."""
    try:
        return _decode(_read_raw(directory), directory)
    except PodinfoError:
        raise
    except OSError as exc:
        raise PodinfoError(f"{directory}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- writing (kubelet emulation)

def write_podinfo(directory: str, annotations: dict[str, str], labels: dict[str, str]) -> None:
    """Write the files exactly as the kubelet's AtomicWriter does.

    1. a new timestamped directory ``..YYYY_MM_DD_HH_MM_SS.<digits>`` holding the files;
    2. a symlink ``..data_tmp`` to it, renamed over ``..data`` (the atomic step);
    3. the visible ``annotations``/``labels`` symlinks to ``..data/<name>`` (created once);
    4. the previous timestamped directory removed.
    """
    write_podinfo_files(directory, {ANNOTATIONS_FILE: format_downward(annotations),
                                    LABELS_FILE: format_downward(labels)})


def write_podinfo_files(directory: str, files: dict[str, str]) -> None:
    """The kubelet's swap with arbitrary file contents (tests feed malformed files this way)."""
    os.makedirs(directory, exist_ok=True)
    data_link = os.path.join(directory, DATA_LINK)
    old = os.readlink(data_link) if os.path.islink(data_link) else None
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    while True:
        name = stamp + "".join(random.choices("0123456789", k=9))
        try:
            os.mkdir(os.path.join(directory, name), 0o755)
            break
        except FileExistsError:
            continue
    for fname, text in files.items():
        path = os.path.join(directory, name, fname)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, 0o644)
    tmp_link = os.path.join(directory, "..data_tmp")
    if os.path.lexists(tmp_link):
        os.unlink(tmp_link)
    os.symlink(name, tmp_link)
    os.rename(tmp_link, data_link)
    for fname in files:
        visible = os.path.join(directory, fname)
        if not os.path.lexists(visible):
            os.symlink(os.path.join(DATA_LINK, fname), visible)
    if old and old != name:
        old_path = os.path.join(directory, old)
        for entry in os.listdir(old_path):
            os.unlink(os.path.join(old_path, entry))
        os.rmdir(old_path)


# --------------------------------------------------------------------------- inotify (ctypes, no dependency)

_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_IGNORED = 0x8000
_IN_ONLYDIR = 0x01000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_DIR_MASK = (_IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
             | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR)
_EVENT_HEADER = struct.Struct("iIII")


class _Inotify:
    """Minimal inotify over libc via ctypes: one fd, one directory watch."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc soname: no ldconfig spawn
        fd = self._libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd = fd
        self.wd = -1

    def watch(self, directory: str) -> bool:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), _DIR_MASK)
        if wd < 0:
            self.wd = -1
            return False
        self.wd = wd
        return True

    def drain(self) -> bool:
        """Consume pending events; False when the watch went away (dir removed/moved)."""
        alive = True
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return alive
            except OSError:
                return alive
            off = 0
            while off + _EVENT_HEADER.size <= len(buf):
                _wd, mask, _cookie, length = _EVENT_HEADER.unpack_from(buf, off)
                if mask & (_IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF):
                    alive = False
                off += _EVENT_HEADER.size + length

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


# --------------------------------------------------------------------------- watcher

class PodinfoWatcher:
    """Calls ``on_change(PodInfo)`` at start and whenever the content changes.

    The first call happens inside :meth:`start` (caller's thread) when the files
    are readable then; later calls come from the watcher thread.

    A daemon thread waits on an inotify watch of the directory (reacting within
    ``settle_s`` of the kubelet's swap, well inside the 1 s quarantine needs);
    every ``resync_s`` it re-reads anyway, so a lost watch can never freeze the
    state. Without inotify (``use_inotify=False`` or init failure) it polls every
    ``poll_interval`` seconds. Callbacks run on the watcher thread; no-op
    rewrites (same bytes) are not reported. A malformed or unreadable file keeps
    the last good state and is reported once per distinct error through
    ``on_error(message)``.
    """

    def __init__(self, directory: str, on_change: Callable[[PodInfo], None],
                 poll_interval: float = 1.0, *, on_error: Callable[[str], None] | None = None,
                 use_inotify: bool | None = None, settle_s: float = 0.02,
                 resync_s: float = 10.0) -> None:
        self.directory = directory
        self.on_change = on_change
        self.on_error = on_error
        self.poll_interval = poll_interval
        self.settle_s = settle_s
        self.resync_s = resync_s
        self._want_inotify = use_inotify is not False
        self._require_inotify = use_inotify is True
        self.mode = "stopped"  # "inotify" | "polling" once started
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._fd_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last_raw: tuple[bytes, bytes] | None = None
        self._last_error: str | None = None
        self.current: PodInfo | None = None
        self.changes = 0

    # -- lifecycle
    def start(self) -> PodinfoWatcher:
        if self._thread is not None:
            return self
        self._wake_r, self._wake_w = os.pipe()
        ino = None
        if self._want_inotify:
            try:
                ino = _Inotify()
            except (OSError, AttributeError) as exc:
                if self._require_inotify:
                    raise
                log.info("inotify unavailable (%s); polling %s", exc, self.directory)
        self.mode = "inotify" if ino else "polling"
        if ino is not None:
            ino.watch(self.directory)  # before the first read, so no swap can fall in between
        # The first read happens here, on the caller's thread: when start() returns, the
        # sidecar already knows its mode/quarantine state (or on_error was told why not).
        self._check()
        self._thread = threading.Thread(target=self._run, args=(ino,), name="podinfo-watcher",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the thread (safe to call from inside a callback: it then does not wait)."""
        self._stop.set()
        with self._fd_lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"x")
                except OSError:
                    pass
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            self._close_pipe()
        self.mode = "stopped"

    def _close_pipe(self) -> None:
        with self._fd_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._wake_r = self._wake_w = -1

    def __enter__(self) -> PodinfoWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals
    def _check(self) -> None:
        try:
            raw = _read_raw(self.directory)
            if raw == self._last_raw:
                return
            info = _decode(raw, self.directory)
        except (PodinfoError, OSError) as exc:
            msg = str(exc) if isinstance(exc, PodinfoError) else f"{self.directory}: {exc}"
            if msg != self._last_error:
                self._last_error = msg
                self._report_error(msg)
            return
        self._last_raw = raw
        self._last_error = None
        self.current = info
        self.changes += 1
        try:
            self.on_change(info)
        except Exception as exc:  # noqa: BLE001 - a consumer bug must not kill the watcher
            self._report_error(f"on_change callback failed: {exc!r}")

    def _report_error(self, msg: str) -> None:
        log.warning("podinfo: %s", msg)
        if self.on_error is not None:
            try:
                self.on_error(msg)
            except Exception:  # noqa: BLE001
                log.exception("podinfo on_error callback failed")

    def _run(self, ino: _Inotify | None) -> None:
        try:
            # (a missing directory has no watch yet: it is re-added on each poll tick)
            next_resync = time.monotonic() + (self.resync_s if ino else self.poll_interval)
            while not self._stop.is_set():
                fds = [self._wake_r]
                if ino is not None and ino.wd >= 0:
                    fds.append(ino.fd)
                timeout = max(0.0, next_resync - time.monotonic())
                if ino is not None and ino.wd < 0:
                    timeout = min(timeout, self.poll_interval)
                try:
                    ready, _, _ = select.select(fds, [], [], timeout)
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                if self._stop.is_set():
                    break
                if ino is not None and ino.fd in ready:
                    # let a burst of entry changes (mkdir, symlink, rename, rmdir) settle
                    self._stop.wait(self.settle_s)
                    if not ino.drain():
                        ino.wd = -1
                    self._check()
                    continue
                # timeout: periodic poll / resync
                if ino is not None and ino.wd < 0:
                    ino.watch(self.directory)
                self._check()
                next_resync = time.monotonic() + (self.resync_s if ino else self.poll_interval)
        finally:
            if ino is not None:
                ino.close()
            if self._thread is None:  # stop() was called from a callback and did not wait
                self._close_pipe()
