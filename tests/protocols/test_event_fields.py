"""Typed L7 event fields: a matcher can only read a field some parser writes (issue 15, item 6).

The tls.minVersion bug was a matcher reading ``supported_versions``/``versions`` while the
parser wrote ``offered_versions``: every hello looked version-less and the README's
``card-network`` rule (``tls: {minVersion: "1.2"}``) denied TLS 1.3 as well.  These tests close
the class: the matchers' reads are resolved against the parsers' declared field sets, and
the declared sets are checked against what the real parsers emit on real recordings.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from firewall.policy import engine as policy
from firewall.policy import match as policy_match
from firewall.policy.match import READS, L7Matcher, field_name
from firewall.policy.model import TlsMatch
from firewall.protocols import SCHEMAS, TOCLIENT, TOSERVER, make_parser
from firewall.protocols.base import EventFields
from tests.protocols.replay import load, recordings, run_udp

DATA = Path(__file__).parent / "data"
OPENSSL = {"1.0": "tls1", "1.1": "tls1_1", "1.2": "tls1_2", "1.3": "tls1_3"}


def golden(version: str) -> tuple[bytes, bytes]:
    stem = OPENSSL[version]
    return (DATA / f"openssl_{stem}_client.bin").read_bytes(), (DATA / f"openssl_{stem}_server.bin").read_bytes()


def tls_events(version: str) -> list:
    client, server = golden(version)
    p = make_parser("tls")
    return p.feed(client, TOSERVER) + p.feed(server, TOCLIENT)


def test_every_field_a_matcher_reads_is_written_by_a_parser():
    assert READS, "the matchers declare what they read"
    for apps, kind, name in READS:
        for app in apps:
            assert name in SCHEMAS[(app, kind)], (app, kind, name)
    with pytest.raises(RuntimeError, match="no parser writes"):
        field_name(("tls",), "hello", "supported_versions")  # the original bug, refused at import


def test_matchers_read_fields_only_through_declared_names():
    # no string-literal field access left in the L7 code paths: every read goes through field_name
    for fn in (L7Matcher.check, policy_match._offered_max, policy._l7_key):
        tree = ast.parse(inspect.getsource(fn).strip())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                pytest.fail(f"{fn.__qualname__} reads field {node.args[0].value!r} by literal")


@pytest.mark.parametrize("name", [r for r in recordings()])
def test_parsers_emit_only_declared_fields(name):
    doc = load(name)
    app = doc["app_proto"]
    for conn in doc["connections"]:
        if name.startswith("dns_udp"):
            events, _ = run_udp(conn)
        else:
            p = make_parser(app)
            events = [e for d, b in conn for e in p.feed(b, d)]
        assert events
        for ev in events:
            if ev.kind == "anomaly":
                continue
            declared = SCHEMAS.get((ev.app_proto, ev.kind))
            assert declared is not None, (ev.app_proto, ev.kind)
            assert set(ev.fields) <= declared, (ev.app_proto, ev.kind, set(ev.fields) - declared)


@pytest.mark.parametrize("version", list(OPENSSL))
def test_typed_tls_events_from_real_openssl(version):
    events = tls_events(version)
    assert [e.kind for e in events] == ["hello", "server_hello", "established"]
    for ev in events:
        assert isinstance(ev.typed, EventFields) and ev.fields == ev.typed.as_dict()
        assert set(ev.fields) == SCHEMAS[("tls", ev.kind)]
    hello, server, done = events
    assert hello.fields["sni"] == "pay.example" and hello.fields["alpn"] == ["h2", "http/1.1"]
    assert hello.fields["offered_versions"] == [version] and server.fields["version"] == version
    assert done.fields["version"] == version


@pytest.mark.parametrize("version,allowed", [("1.0", False), ("1.1", False), ("1.2", True), ("1.3", True)])
def test_min_version_on_real_openssl_hellos(version, allowed):
    """The README's card-network rule, tls: {minVersion: "1.2"}, against s_client -tls1 ... -tls1_3."""
    matcher = L7Matcher.build("tls", TlsMatch(sni=["*.example"], min_version="1.2"))
    hello, server, _ = tls_events(version)
    assert matcher.check(hello) is allowed
    assert matcher.check(server) is allowed
    # minVersion 1.3 admits only the 1.3 hello
    strict = L7Matcher.build("tls", TlsMatch(min_version="1.3"))
    assert strict.check(hello) is (version == "1.3")


def test_min_version_end_to_end_with_the_readme_policy(tmp_path):
    """PolicySet with the README's card-network rule: TLS 1.3 and 1.2 allowed, 1.1 and 1.0 denied."""
    from firewall.identity.fqdn import FqdnCache
    from firewall.policy.engine import FlowInfo, PolicySet
    from tests.policy.common import CARDNET, PAY, TABLE_POLICY, write

    if "minVersion" not in TABLE_POLICY:
        pytest.skip("the table policy has no minVersion rule")
    cache = FqdnCache()
    cache.learn("api.eu.card-network.example", [CARDNET.ip], 300)
    ps = PolicySet.load([write(tmp_path, TABLE_POLICY)], fqdn=cache)
    flow = FlowInfo("egress", PAY, CARDNET, 443)
    verdicts = {}
    for version in OPENSSL:
        client, _ = golden(version)
        (hello,) = make_parser("tls").feed(client, TOSERVER)
        hello = type(hello)(hello.app_proto, hello.kind, hello.direction, hello.offset,
                            dict(hello.fields, sni="api.eu.card-network.example"), hello.end)
        d = ps.decide_l7(flow, hello, fqdn=cache)
        verdicts[version] = d.verdict if d is not None else None
    assert verdicts == {"1.0": "deny", "1.1": "deny", "1.2": "allow", "1.3": "allow"}


def test_http2_host_rule_reads_the_authority_the_parser_writes():
    from firewall.policy.model import HttpMatch
    from firewall.protocols.base import L7Event

    m = L7Matcher.build("http", [HttpMatch(host="api.example")])
    assert m.check(L7Event("http2", "request", 0, 0, {"method": "GET", "path": "/", "authority": "api.example"}))
    assert not m.check(L7Event("http2", "request", 0, 0, {"method": "GET", "path": "/", "authority": "x.example"}))


def test_sql_rule_checks_every_statement_of_a_query():
    from firewall.policy.model import SqlMatch

    m = L7Matcher.build("sql", SqlMatch(verbs=["SELECT"]))
    p = make_parser("pgsql")
    import struct
    startup = struct.pack("!II", 0, 196608) + b"user\0u\0\0"
    startup = struct.pack("!I", len(startup)) + startup[4:]
    p.feed(startup, TOSERVER)
    body = b"SELECT 1; DELETE FROM cards\0"
    (ev,) = p.feed(b"Q" + struct.pack("!I", len(body) + 4) + body, TOSERVER)
    assert ev.fields["verbs"] == ["SELECT", "DELETE"] and m.check(ev) is False


@pytest.mark.parametrize("sql,allowed", [
    ("SELECT 1", True),
    ("SELECT 1; " * 16, True),
    ("SELECT 1; " * 17 + "DROP TABLE cards", False),  # more statements than the event lists
    ("SELECT '" + "x" * 3000 + "'; DROP TABLE cards", False),  # past the 2 KiB prefix
])
def test_sql_rule_refuses_what_the_parser_could_not_list(sql, allowed):
    import struct

    from firewall.policy.model import SqlMatch

    m = L7Matcher.build("sql", SqlMatch(verbs=["SELECT"]))
    p = make_parser("pgsql")
    startup = struct.pack("!II", 0, 196608) + b"user\0u\0\0"
    p.feed(struct.pack("!I", len(startup)) + startup[4:], TOSERVER)
    body = sql.encode() + b"\0"
    (ev,) = p.feed(b"Q" + struct.pack("!I", len(body) + 4) + body, TOSERVER)
    assert m.check(ev) is allowed
    # the extended protocol's Parse carries one statement: a long one is still complete
    body = b"\0" + ("SELECT '" + "x" * 3000 + "'").encode() + b"\0\0\0"
    (ev,) = p.feed(b"P" + struct.pack("!I", len(body) + 4) + body, TOSERVER)
    assert ev.fields["truncated"] and m.check(ev) is True
