"""What starts a capture, apart from the engine: the annotation's persisted hash (one attempt per
distinct ``palisade.dev/pcap`` value, across restarts) and the trigger record of an automatic capture."""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import stat
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = ".palisade-capture-state.json"
STATE_MAX_BYTES = 4096


class AnnotationState:
    """The last annotation value's SHA-256, kept in a small state file in the pcap directory.

    Read with O_NOFOLLOW and only when a small regular file; written to a fresh temporary and
    renamed, so a symlink planted in the pcap directory redirects neither a read nor a write."""

    def __init__(self, state_path: str) -> None:
        self.state_path = state_path

    def load(self) -> dict[str, Any]:
        """The persisted annotation hash. Opened with O_NOFOLLOW (a symlink planted in the pcap
        directory must not make the sidecar read another file) and only if it is a small regular file."""
        try:
            fd = os.open(self.state_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return {}
        except OSError as exc:  # ELOOP: a symlink
            log.warning("capture state %s not opened (%s); starting fresh", self.state_path,
                        "a symlink" if exc.errno == errno.ELOOP else exc.strerror)
            return {}
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > STATE_MAX_BYTES:
                log.warning("capture state %s is not a small regular file; starting fresh", self.state_path)
                return {}
            with os.fdopen(os.dup(fd), encoding="utf-8") as fh:
                data = json.loads(fh.read(STATE_MAX_BYTES))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError) as exc:
            log.warning("capture state %s unreadable (%s); starting fresh", self.state_path, exc)
            return {}
        finally:
            os.close(fd)

    def save(self, annotation_sha256: str | None) -> None:
        """Written to a fresh temporary (O_EXCL|O_NOFOLLOW, 0600) then renamed over the state file:
        rename replaces a planted symlink itself, never its target."""
        tmp = f"{self.state_path}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"annotation_sha256": annotation_sha256}, fh)
            os.replace(tmp, self.state_path)
        except OSError as exc:  # a full disk must not stop the capture itself
            log.warning("cannot persist capture state %s: %s", self.state_path, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass


def auto_trigger(peer: str, reason: dict[str, Any]) -> dict[str, Any]:
    """``{"rule", "flow", "peer"}`` (+ ``category``) from what the session passes."""
    flow = reason.get("flow")
    if flow is None:
        flow = {k: v for k, v in reason.items() if k not in ("rule", "category", "peer")}
    trigger: dict[str, Any] = {"rule": reason.get("rule"), "flow": flow, "peer": peer}
    if "category" in reason:
        trigger["category"] = reason["category"]
    return trigger
