"""Downward-API files: the kubelet's format, its symlink swap, and the watcher."""

from __future__ import annotations

import os
import re
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firewall.identity.podinfo import (
    PodInfo,
    PodinfoError,
    PodinfoWatcher,
    format_downward,
    go_quote,
    parse_downward,
    read_podinfo,
    write_podinfo,
    write_podinfo_files,
)

# --------------------------------------------------------------------------- parse_downward


def test_parse_plain_lines_sorted_as_kubelet_writes():
    text = 'app="payments"\npalisade.dev/pcap="duration=60s,filter=tcp port 5432"\ntier="db"'
    assert parse_downward(text) == {
        "app": "payments",
        "palisade.dev/pcap": "duration=60s,filter=tcp port 5432",
        "tier": "db",
    }


def test_parse_ignores_blank_lines_and_trailing_newline():
    assert parse_downward('\na="1"\n\nb="2"\n') == {"a": "1", "b": "2"}
    assert parse_downward("") == {}


@pytest.mark.parametrize("quoted, expected", [
    (r'"say \"hi\""', 'say "hi"'),
    (r'"back\\slash"', "back\\slash"),
    (r'"a\nb\tc\rd"', "a\nb\tc\rd"),
    (r'"\a\b\f\v"', "\a\b\f\v"),
    (r'"ctl\x01\x7f"', "ctl\x01\x7f"),
    (r'"\xc3\xa9t\xc3\xa9"', "été"),            # \xNN are bytes: UTF-8 reassembled
    (r'"\u00e9\u2028"', "é\u2028"),
    (r'"\U0001f600"', "\U0001f600"),
    (r'"\101\102"', "AB"),                       # octal byte escapes
    ('"héllo wörld"', "héllo wörld"),          # printable non-ASCII is written raw
    (r'"{\"k\": [1, 2]}"', '{"k": [1, 2]}'),     # kubectl.kubernetes.io/last-applied-configuration
])
def test_parse_go_escapes(quoted, expected):
    assert parse_downward(f"k={quoted}") == {"k": expected}


@pytest.mark.parametrize("text, message", [
    ("novalue", "line 1: expected key=\"value\""),
    ('a="1"\nb=2', "line 2: value must be a double-quoted string"),
    ('a="unterminated', "line 1: value must be a double-quoted string"),
    ('a="x"y"', "line 1: unescaped"),
    ('a="bad \\q"', "line 1: unknown escape \\q"),
    ('a="\\x4"', "line 1: bad \\x escape"),
    ('a="\\ud800"', "line 1: \\ud800 is not a valid code point"),
    ('a="\\\'"', "line 1: unknown escape"),                    # \' is not valid in "..." in Go
    ('a="ends\\"', "line 1: value is not terminated"),
    ('="v"', "line 1: bad key"),
    ('a b="v"', "line 1: bad key"),
    ('ok="1"\n\n\nbad', "line 4:"),
])
def test_parse_malformed_lines_name_the_line(text, message):
    with pytest.raises(PodinfoError) as exc:
        parse_downward(text)
    assert message in str(exc.value)


def test_go_quote_matches_go_for_known_values():
    # expected strings are what Go's fmt.Sprintf("%q", v) prints
    assert go_quote('a"b\\c') == r'"a\"b\\c"'
    assert go_quote("tab\there\n") == r'"tab\there\n"'
    assert go_quote("\x00\x1b\x7f") == r'"\x00\x1b\x7f"'
    assert go_quote("é ü 😀") == '"é ü 😀"'
    assert go_quote("\u2028\ufeff") == r'"\u2028\ufeff"'
    assert format_downward({"b": "2", "a": "1"}) == 'a="1"\nb="2"'


_keys = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}/)?[A-Za-z0-9_.-]{1,30}\Z")
_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=8))
def test_format_then_parse_round_trips(values):
    assert parse_downward(format_downward(values)) == values


# --------------------------------------------------------------------------- files, kubelet layout


def test_write_podinfo_reproduces_kubelet_layout(tmp_path):
    d = str(tmp_path)
    write_podinfo(d, {"palisade.dev/pcap": "duration=5s"}, {"app": "api"})
    first = os.readlink(os.path.join(d, "..data"))
    assert re.fullmatch(r"\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\d{9}", first)
    assert os.readlink(os.path.join(d, "annotations")) == "..data/annotations"
    assert os.readlink(os.path.join(d, "labels")) == "..data/labels"
    assert read_podinfo(d) == PodInfo({"palisade.dev/pcap": "duration=5s"}, {"app": "api"})

    write_podinfo(d, {"palisade.dev/quarantine": "true"}, {"app": "api"})
    second = os.readlink(os.path.join(d, "..data"))
    assert second != first
    assert not os.path.exists(os.path.join(d, first)), "old generation must be removed"
    assert sorted(os.listdir(d)) == sorted(["..data", second, "annotations", "labels"])
    assert read_podinfo(d).annotations == {"palisade.dev/quarantine": "true"}


def test_read_podinfo_plain_files_and_missing_ones(tmp_path):
    (tmp_path / "labels").write_text('app="x"')
    assert read_podinfo(str(tmp_path)) == PodInfo({}, {"app": "x"})


def test_read_podinfo_errors_are_podinfo_errors(tmp_path):
    with pytest.raises(PodinfoError, match="does not exist"):
        read_podinfo(str(tmp_path / "nope"))
    write_podinfo_files(str(tmp_path), {"annotations": 'a="1"\noops', "labels": ""})
    with pytest.raises(PodinfoError, match=r"annotations: line 2:"):
        read_podinfo(str(tmp_path))


# --------------------------------------------------------------------------- watcher


class Recorder:
    """Collects callbacks; ``wait_for(n)`` is the readiness check (no sleeps)."""

    def __init__(self) -> None:
        self.changes: list[PodInfo] = []
        self.errors: list[str] = []
        self._cv = threading.Condition()

    def on_change(self, info: PodInfo) -> None:
        with self._cv:
            self.changes.append(info)
            self._cv.notify_all()

    def on_error(self, msg: str) -> None:
        with self._cv:
            self.errors.append(msg)
            self._cv.notify_all()

    def wait_for(self, n_changes: int = 0, n_errors: int = 0, timeout: float = 5.0) -> bool:
        with self._cv:
            return self._cv.wait_for(
                lambda: len(self.changes) >= n_changes and len(self.errors) >= n_errors, timeout)


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "polling"])
def test_watcher_follows_kubelet_swaps(tmp_path, use_inotify):
    d = str(tmp_path)
    write_podinfo(d, {"a": "1"}, {"app": "x"})
    rec = Recorder()
    w = PodinfoWatcher(d, rec.on_change, poll_interval=0.05, on_error=rec.on_error,
                       use_inotify=use_inotify)
    with w:
        assert w.mode == ("inotify" if use_inotify else "polling")
        assert len(rec.changes) == 1, "start() delivers the initial state before returning"
        assert rec.changes[0] == PodInfo({"a": "1"}, {"app": "x"})

        write_podinfo(d, {"a": "2", "palisade.dev/quarantine": "true"}, {"app": "x"})
        # quarantine relies on a reaction within 1 s of the swap
        assert rec.wait_for(2, timeout=1.0), "no reaction within 1 s of the symlink swap"
        assert rec.changes[1].annotations == {"a": "2", "palisade.dev/quarantine": "true"}

        # a no-op rewrite (same bytes, new generation) is not a change: the next real
        # change must arrive as the third callback, not the fourth
        write_podinfo(d, {"a": "2", "palisade.dev/quarantine": "true"}, {"app": "x"})
        write_podinfo(d, {"a": "3"}, {"app": "y"})
        assert rec.wait_for(3, timeout=2.0)
        assert rec.changes[2] == PodInfo({"a": "3"}, {"app": "y"})
    assert len(rec.changes) == 3
    assert rec.errors == []
    assert w.mode == "stopped"


@pytest.mark.parametrize("use_inotify", [True, False], ids=["inotify", "polling"])
def test_watcher_keeps_last_good_state_on_malformed_file(tmp_path, use_inotify):
    d = str(tmp_path)
    write_podinfo(d, {"palisade.dev/mode": "protect"}, {})
    rec = Recorder()
    with PodinfoWatcher(d, rec.on_change, poll_interval=0.05, on_error=rec.on_error,
                        use_inotify=use_inotify) as w:
        assert rec.wait_for(1)
        write_podinfo_files(d, {"annotations": 'palisade.dev/mode="learn\nbroken', "labels": ""})
        assert rec.wait_for(1, 1), "a malformed file must be reported through on_error"
        assert "line 1" in rec.errors[0]
        assert w.current == PodInfo({"palisade.dev/mode": "protect"}, {}), "last good state kept"
        write_podinfo(d, {"palisade.dev/mode": "learn"}, {})
        assert rec.wait_for(2)
    assert [c.annotations for c in rec.changes] == [{"palisade.dev/mode": "protect"},
                                                    {"palisade.dev/mode": "learn"}]
    assert len(rec.errors) == 1


def test_watcher_waits_for_directory_to_appear(tmp_path):
    d = str(tmp_path / "podinfo")
    rec = Recorder()
    with PodinfoWatcher(d, rec.on_change, poll_interval=0.05, on_error=rec.on_error):
        assert rec.wait_for(0, 1)
        assert "does not exist" in rec.errors[0]
        write_podinfo(d, {"a": "1"}, {})
        assert rec.wait_for(1)
    assert rec.changes == [PodInfo({"a": "1"}, {})]


def test_watcher_survives_a_failing_callback(tmp_path):
    d = str(tmp_path)
    write_podinfo(d, {"a": "1"}, {})
    rec = Recorder()
    calls = []

    def boom(info: PodInfo) -> None:
        calls.append(info)
        if len(calls) == 1:
            raise RuntimeError("consumer bug")
        rec.on_change(info)

    with PodinfoWatcher(d, boom, poll_interval=0.05, on_error=rec.on_error):
        assert rec.wait_for(0, 1)
        assert "consumer bug" in rec.errors[0]
        write_podinfo(d, {"a": "2"}, {})
        assert rec.wait_for(1)
    assert rec.changes[0].annotations == {"a": "2"}


def test_stop_from_inside_a_callback(tmp_path):
    d = str(tmp_path)
    write_podinfo(d, {"a": "1"}, {})
    rec = Recorder()
    holder: list[PodinfoWatcher] = []

    def on_change(info: PodInfo) -> None:
        if info.annotations.get("a") == "2":
            holder[0].stop()  # e.g. the sidecar shutting down on a change
        rec.on_change(info)  # after stop(): the wait below then sees its effect (it raced before)

    w = PodinfoWatcher(d, on_change, poll_interval=0.05, on_error=rec.on_error)
    holder.append(w)
    w.start()
    write_podinfo(d, {"a": "2"}, {})
    assert rec.wait_for(2)
    assert w.mode == "stopped"
    write_podinfo(d, {"a": "3"}, {})
    w.stop()
    assert [c.annotations["a"] for c in rec.changes] == ["1", "2"]
    assert rec.errors == []
