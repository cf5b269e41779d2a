"""Live: the installed Debian clients and servers, on 127.0.0.1, through the recording relay.

The committed recordings could drift from what today's packages send; these
tests record afresh (same scenarios as ``record.py``) and check that the
identifier and parsers still understand every conversation, with the fields
the policy engine matches on. Skipped, with the reason, when a binary is
missing or root is needed (postgres via runuser, mariadbd --user=root, sshd).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import tests.protocols.record as record
from tests.protocols.replay import bytewise, identify, load, run, run_udp

NEEDS = {
    "http": (["nginx", "curl"], False),
    "h2c": (["nghttpd", "nghttp"], False),
    "tls": (["openssl"], False),
    "ssh": (["ssh", "/usr/sbin/sshd", "ssh-keygen"], True),
    "dns": (["dnsmasq", "dig"], False),
    "redis": (["redis-server", "redis-cli"], False),
    "pgsql": (["initdb", "postgres", "psql", "runuser"], True),
    "mysql": (["mariadb-install-db", "mariadbd", "mariadb"], True),
}


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    def do(scenario: str) -> dict[str, dict]:
        binaries, root = NEEDS[scenario]
        missing = [b for b in binaries if not shutil.which(b)]
        if missing:
            pytest.skip(f"needs {', '.join(missing)} (installed by .ci/run)")
        if root and os.geteuid() != 0:
            pytest.skip(f"{scenario} server needs root to start here")
        # servers drop privileges (nginx workers, postgres): pytest's 0700 tmp_path
        # is not reachable for them, so the work dir is a world-traversable one
        with tempfile.TemporaryDirectory(prefix=f"live-{scenario}-") as work:
            os.chmod(work, 0o755)
            monkeypatch.setattr(record, "OUT_DIR", tmp_path / "out")
            record.SCENARIOS[scenario](Path(work))
        out = {}
        for path in (tmp_path / "out").glob("*.json.gz"):
            name = path.name[: -len(".json.gz")]
            monkeypatch.setattr("tests.protocols.replay.DATA", tmp_path / "out")
            out[name] = load(name)
        assert out, "the scenario recorded nothing"
        return out

    return do


def check_tcp(doc: dict) -> list:
    all_events = []
    for segs in doc["connections"]:
        assert identify(segs, 1) == doc["app_proto"]
        events, summary = run(doc["app_proto"], segs)
        assert run(doc["app_proto"], bytewise(segs)) == (events, summary)
        assert not [e.anomaly for e in events if e.anomaly]
        all_events += events
    return all_events


def test_live_http(recorded):
    (doc,) = recorded("http").values()
    events = check_tcp(doc)
    assert [e.fields["method"] for e in events if e.kind == "request"] == ["GET", "GET", "GET", "POST", "HEAD", "GET"]
    assert [e.fields["status"] for e in events if e.kind == "response"] == [200, 200, 200, 201, 200, 404]


def test_live_h2c(recorded):
    (doc,) = recorded("h2c").values()
    events = check_tcp(doc)
    assert sorted(e.fields["status"] for e in events if e.kind == "response") == [200, 200, 404]


def test_live_tls(recorded):
    docs = recorded("tls")
    versions = {}
    for name, doc in docs.items():
        events = check_tcp(doc)
        assert events[0].fields["sni"] == "api.card-network.example"
        versions[name] = [e.fields.get("version") or e.fields.get("description") for e in events[1:]
                          if e.kind != "established"]
    assert versions == {"tls13_openssl": ["1.3"], "tls12_openssl": ["1.2"],
                        "tls10_refused_openssl": ["protocol_version"]}


def test_live_ssh(recorded):
    (doc,) = recorded("ssh").values()
    events = check_tcp(doc)
    assert {e.fields["side"] for e in events} == {"client", "server"}
    assert all(e.fields["software"].startswith("OpenSSH") for e in events)


def test_live_dns(recorded):
    docs = recorded("dns")
    answers = [e for segs in docs["dns_tcp_dnsmasq_dig"]["connections"] for e in check_tcp_conn(segs)
               if e.kind == "answer"]
    assert answers[0].fields["answers"][0]["data"] == "10.1.2.3"
    events, _ = run_udp(docs["dns_udp_dnsmasq_dig"]["connections"][0])
    assert [e.kind for e in events] == ["query", "answer"] * 3


def check_tcp_conn(segs):
    return check_tcp({"app_proto": "dns", "connections": [segs]})


def test_live_redis(recorded):
    (doc,) = recorded("redis").values()
    events = check_tcp(doc)
    names = [e.fields["command"] for e in events]
    assert {"SET", "GET", "CONFIG", "HSET", "DEL"} <= set(names)


def test_live_pgsql(recorded):
    docs = recorded("pgsql")
    events = check_tcp(docs["pgsql_psql"])
    assert events[0].fields["user"] == "postgres"
    verbs = [e.fields["verb"] for e in events if e.kind == "statement"]
    assert verbs[:2] == ["CREATE", "INSERT"] and "DROP" in verbs
    check_tcp(docs["pgsql_sslrequest_refused"])


def test_live_mysql(recorded):
    (doc,) = recorded("mysql").values()
    events = check_tcp(doc)
    assert events[1].kind == "login" and events[1].fields["user"] == "root"
    assert "INSERT" in [e.fields["verb"] for e in events if e.kind == "statement"]
