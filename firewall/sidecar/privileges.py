"""Drop from root to the proxy user, keeping only CAP_NET_ADMIN and CAP_NET_RAW.

Why these two: IP_TRANSPARENT (the TPROXY listener and the upstream socket bound
to the client's address) and SO_MARK need CAP_NET_ADMIN; AF_PACKET captures need
CAP_NET_RAW.  Everything else is dropped from every capability set, and
no_new_privs is set, so an exploited sidecar cannot regain root.

Started directly as UID 1337 with those capabilities (the injector's choice in
Kubernetes: ``runAsUser: 1337`` + ``capabilities.add``), this is a no-op.
"""

from __future__ import annotations

import ctypes
import os

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
KEEP = (CAP_NET_ADMIN, CAP_NET_RAW)
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _capset(caps: tuple[int, ...]) -> None:
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for c in caps:
        idx, bit = divmod(c, 32)
        data[idx].effective |= 1 << bit
        data[idx].permitted |= 1 << bit
    if _libc.capset(ctypes.byref(hdr), ctypes.byref(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset failed: {os.strerror(err)}")


def current_caps() -> dict[str, int]:
    """CapEff/CapPrm/CapBnd from /proc/self/status (tests and the startup log)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("Cap"):
                k, v = line.split(":")
                out[k] = int(v.strip(), 16)
    return out


def raise_file_caps() -> None:
    """Non-root start: make the permitted CAP_NET_ADMIN/CAP_NET_RAW effective, drop the rest.

    The image grants the two as *permitted-only* file capabilities (``setcap ...+p``): with the
    effective bit set, the kernel refuses to exec the interpreter at all in a container whose
    bounding set lacks them (the webhook, ``drop: [ALL]``: "operation not permitted"). So the
    sidecar raises them itself, first thing, before any thread exists (capabilities are per
    thread). A no-op for root and when neither capability is permitted.
    """
    if os.geteuid() == 0:
        return
    prm = current_caps().get("CapPrm", 0)
    keep = tuple(c for c in KEEP if prm & (1 << c))
    if keep:
        _capset(keep)


def drop(uid: int, gid: int) -> str:
    """Switch to uid/gid keeping KEEP; returns a one-line description for the log."""
    if os.geteuid() != 0:
        return f"running as uid {os.geteuid()} (no privilege change)"
    _libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _capset(KEEP)
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    return f"dropped to uid {uid} gid {gid} keeping CAP_NET_ADMIN, CAP_NET_RAW"
