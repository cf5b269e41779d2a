"""tcpdump-style filters compiled to classic BPF by libpcap (ctypes) and attached to a packet socket.

Non-matching packets never leave the kernel; ``exclude_ifindex`` drops loopback there too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
import threading

from firewall.capture.spec import DEFAULT_SNAPLEN, CaptureSpecError

DLT_EN10MB = 1
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
BPF_MAXINSNS = 4096


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


_libpcap: ctypes.CDLL | None = None
_pcap_lock = threading.Lock()  # pcap_compile was not reentrant before libpcap 1.8; be safe


def _pcap() -> ctypes.CDLL:
    global _libpcap
    if _libpcap is None:
        # Known sonames first (Debian: libpcap.so.0.8): find_library() spawns ldconfig.
        lib = None
        last: OSError | None = None
        for cand in ("libpcap.so.0.8", "libpcap.so.1", None):
            try:
                lib = ctypes.CDLL(cand or ctypes.util.find_library("pcap") or "libpcap.so")
                break
            except OSError as exc:
                last = exc
        if lib is None:
            raise CaptureSpecError(f"filter: libpcap is not installed ({last})")
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                     ctypes.c_int, ctypes.c_uint32]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        _libpcap = lib
    return _libpcap


Insn = tuple[int, int, int, int]  # (code, jt, jf, k), the `tcpdump -dd` layout


def compile_filter(expr: str, snaplen: int = DEFAULT_SNAPLEN) -> list[Insn]:
    """Compile a tcpdump filter for Ethernet frames to classic BPF instructions.

    An empty filter compiles to "accept ``snaplen`` bytes of everything".
    Raises :class:`CaptureSpecError` with libpcap's message for a bad filter.
    """
    if "\x00" in expr:
        raise CaptureSpecError("filter: contains a NUL byte")
    lib = _pcap()
    with _pcap_lock:
        handle = lib.pcap_open_dead(DLT_EN10MB, snaplen)
        if not handle:
            raise CaptureSpecError("filter: pcap_open_dead failed")
        try:
            prog = _BpfProgram()
            rc = lib.pcap_compile(handle, ctypes.byref(prog), expr.encode("utf-8"), 1,
                                  PCAP_NETMASK_UNKNOWN)
            if rc != 0:
                msg = (lib.pcap_geterr(handle) or b"syntax error").decode("utf-8", "replace")
                raise CaptureSpecError(f"filter {expr!r}: {msg}")
            try:
                insns = [(prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf,
                          prog.bf_insns[i].k) for i in range(prog.bf_len)]
            finally:
                lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)
    if len(insns) + 3 > BPF_MAXINSNS:
        raise CaptureSpecError(f"filter: too complex ({len(insns)} BPF instructions)")
    return insns


_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_RET_K = 0x06
_SKF_AD_IFINDEX = 0xFFFFF000 + 8  # SKF_AD_OFF + SKF_AD_IFINDEX
REJECT_ALL: list[Insn] = [(_BPF_RET_K, 0, 0, 0)]


def exclude_ifindex(insns: list[Insn], ifindex: int) -> list[Insn]:
    """Prefix a program with "drop packets of interface ``ifindex``".

    Classic BPF jumps are relative, so the compiled program is valid unchanged
    after the prefix, and it starts with its own loads (no register state).
    """
    return [(_BPF_LD_W_ABS, 0, 0, _SKF_AD_IFINDEX), (_BPF_JEQ_K, 0, 1, ifindex),
            (_BPF_RET_K, 0, 0, 0), *insns]


SO_ATTACH_FILTER = 26


def attach_filter(sock: socket.socket, insns: list[Insn]) -> None:
    arr = (_BpfInsn * len(insns))(*[_BpfInsn(c, jt, jf, k) for c, jt, jf, k in insns])
    fprog = struct.pack("HL", len(insns), ctypes.addressof(arr))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)  # kernel copies arr during the call
