"""Pcap files on disk: the writer (0600, O_EXCL|O_NOFOLLOW, exact sizes and SHA-256), rotation
names, and the retention that keeps the pcap directory within its disk budget."""

from __future__ import annotations

import hashlib
import os
import re
import struct
from dataclasses import dataclass

from firewall.capture.bpf import DLT_EN10MB
from firewall.capture.spec import KiB

PCAP_SUFFIX = ".pcap"


class PcapWriter:
    """Nanosecond-resolution pcap (magic a1b23c4d), Ethernet link type.

    Own writer rather than dpkt's so byte counts and the SHA-256 are exact and
    computed while writing (the file is never re-read). Created mode 0600.
    """

    HEADER = struct.Struct("<IHHiIII")
    RECORD = struct.Struct("<IIII")

    def __init__(self, path: str, snaplen: int, linktype: int = DLT_EN10MB) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            self._fh = os.fdopen(fd, "wb", buffering=256 * KiB)
        except BaseException:
            os.close(fd)
            raise
        self.path = path
        self.packets = 0
        self.size = 0
        self._sha = hashlib.sha256()
        self._write(self.HEADER.pack(0xA1B23C4D, 2, 4, 0, 0, snaplen, linktype))

    def _write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._sha.update(data)
        self.size += len(data)

    def record_size(self, caplen: int) -> int:
        return self.RECORD.size + caplen

    def write(self, ts_ns: int, data: bytes | memoryview, orig_len: int) -> None:
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        self._write(self.RECORD.pack(sec & 0xFFFFFFFF, nsec, len(data), orig_len))
        self._write(data)
        self.packets += 1

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> str:
        """Flush and close (raises OSError, e.g. ENOSPC); returns the hex SHA-256 of the file."""
        self._fh.close()
        return self._sha.hexdigest()

    def abort(self) -> str:
        """Close after a write error without raising; hash of the bytes handed to write()."""
        try:
            self._fh.close()
        except OSError:
            pass
        return self._sha.hexdigest()


# --------------------------------------------------------------------------- names and retention


def file_name(capture_id: str, index: int, rotating: bool) -> str:
    """``<id>.pcap``, or ``<id>.NNN.pcap`` for the NNNth file of a rotating capture."""
    return f"{capture_id}.{index:03d}{PCAP_SUFFIX}" if rotating else f"{capture_id}{PCAP_SUFFIX}"


def id_of(filename: str) -> str:
    """The capture id a pcap file name belongs to (the inverse of ``file_name``)."""
    base = filename[: -len(PCAP_SUFFIX)] if filename.endswith(PCAP_SUFFIX) else filename
    m = re.match(r"^(.*)\.\d{3}$", base)
    return m.group(1) if m else base


@dataclass
class Retention:
    """What ``make_room`` did: the files it removed (name, size) and the bytes left in the budget."""

    removed: list[tuple[str, int]]
    available: int


def finished_files(pcap_dir: str, exclude: set[str]) -> list[tuple[float, str, int]]:
    """(mtime, name, size) of the regular pcap files not in ``exclude``, oldest first.

    Symlinks and other non-regular entries are never counted nor removed."""
    found = []
    for name in os.listdir(pcap_dir):
        if not name.endswith(PCAP_SUFFIX) or name in exclude:
            continue
        path = os.path.join(pcap_dir, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        found.append((st.st_mtime, name, st.st_size))
    found.sort()
    return found


def make_room(pcap_dir: str, exclude: set[str], reserved: int, want: int, budget: int) -> Retention:
    """Remove the oldest finished files until ``reserved`` + what is on disk + ``want`` fits ``budget``.

    ``exclude`` are the files of running captures (they may still grow; ``reserved`` covers them)."""
    finished = finished_files(pcap_dir, exclude)
    used = reserved + sum(size for _m, _n, size in finished)
    removed: list[tuple[str, int]] = []
    while finished and used + want > budget:
        _mtime, name, size = finished.pop(0)
        try:
            os.unlink(os.path.join(pcap_dir, name))
        except FileNotFoundError:
            pass
        used -= size
        removed.append((name, size))
    return Retention(removed, budget - used)
