"""Real conversations (recorded by ``record.py`` from Debian clients and servers):
identified correctly, parsed into the expected events, whatever the segmentation."""

from __future__ import annotations

import random

import pytest

from tests.protocols.replay import bytewise, identify, load, rechunk, recordings, run, run_udp, split_at

TCP = [n for n in recordings() if load(n)["transport"] == "tcp"]


def conversations() -> list[tuple[str, int]]:
    return [(n, i) for n in TCP for i in range(len(load(n)["connections"]))]


def test_every_protocol_has_a_recording():
    protos = {load(n)["app_proto"] for n in recordings()}
    assert protos >= {"http", "http2", "tls", "ssh", "dns", "redis", "pgsql", "mysql"}


@pytest.mark.parametrize("name,conn", conversations())
def test_identified(name, conn):
    doc = load(name)
    segs = doc["connections"][conn]
    assert identify(segs, doc["dest_port"]) == doc["app_proto"]
    # a port hint is not needed: the same bytes on an unrelated port
    assert identify(segs, 12345) == doc["app_proto"]


@pytest.mark.parametrize("name,conn", conversations())
def test_segmentation_does_not_change_events(name, conn):
    doc = load(name)
    segs = doc["connections"][conn]
    proto = doc["app_proto"]
    whole, summary = run(proto, segs)
    assert whole, "a real conversation yields events"
    assert not [e for e in whole if e.kind == "anomaly"]
    assert run(proto, bytewise(segs)) == (whole, summary)
    rng = random.Random(name)
    for _ in range(5):
        assert run(proto, rechunk(segs, rng, rng.choice([2, 7, 100, 5000]))) == (whole, summary)


@pytest.mark.parametrize("name,conn", conversations())
def test_every_split_offset(name, conn):
    doc = load(name)
    segs = doc["connections"][conn]
    proto = doc["app_proto"]
    expected = run(proto, segs)
    total = sum(len(b) for _, b in segs)
    # every offset of small conversations; the heads region of the big ones
    offsets = range(1, min(total, 3000))
    for k in offsets:
        assert run(proto, split_at(segs, k)) == expected, f"split at {k}"


def _events(name, conn=0):
    doc = load(name)
    return run(doc["app_proto"], doc["connections"][conn])


def test_http_nginx_curl():
    events, summary = _events("http_nginx_curl")
    reqs = [e for e in events if e.kind == "request"]
    resps = [e for e in events if e.kind == "response"]
    assert [(e.fields["method"], e.fields["path"]) for e in reqs] == [
        ("GET", "/index.html"), ("GET", "/big.bin"), ("GET", "/page.txt"), ("POST", "/echo"),
        ("HEAD", "/index.html"), ("GET", "/missing")]
    assert all(e.fields["host"].startswith("127.0.0.1:") and e.fields["version"] == "1.1" for e in reqs)
    assert reqs[3].fields["content_length"] == len("card=4111111111111111")
    assert reqs[3].end == reqs[4].offset  # pipelining boundary computed from Content-Length
    assert [e.fields["status"] for e in resps] == [200, 200, 200, 201, 200, 404]
    assert resps[0].fields["chunked"] and resps[0].fields["content_encoding"] == "gzip"
    # the HEAD response announces a length but carries no body: the next response follows the head
    assert resps[4].fields["content_length"] == 360 and resps[4].end == resps[5].offset
    assert summary["requests"] == 6 and summary["statuses"] == {200: 4, 201: 1, 404: 1}
    assert summary["path"] == "/index.html" and ["POST", "/echo"] in summary["methods_paths"]


def test_h2c_nghttp():
    events, summary = _events("h2c_nghttpd_nghttp")
    reqs = [e for e in events if e.kind == "request"]
    assert [e.fields["path"] for e in reqs] == ["/index.html", "/data.bin", "/nope"]
    assert {e.fields["method"] for e in reqs} == {"GET"} and all(e.app_proto == "http2" for e in reqs)
    statuses = {e.fields["stream_id"]: e.fields["status"] for e in events if e.kind == "response"}
    assert sorted(statuses.values()) == [200, 200, 404]
    assert set(statuses) == {e.fields["stream_id"] for e in reqs}
    assert summary["requests"] == 3 and summary["grpc"] is False


@pytest.mark.parametrize("name,offered,negotiated,alpn", [
    ("tls13_openssl", ["1.3"], "1.3", ["h2", "http/1.1"]),
    ("tls12_openssl", ["1.2"], "1.2", ["http/1.1"]),
])
def test_tls_openssl(name, offered, negotiated, alpn):
    events, summary = _events(name)
    hello, server, done = events  # done: the handshake completed in both directions
    assert done.kind == "established" and done.fields["version"] == negotiated and summary["established"]
    assert hello.kind == "hello" and hello.fields["sni"] == "api.card-network.example"
    assert hello.fields["offered_versions"] == offered and hello.fields["alpn"] == alpn
    assert server.kind == "server_hello" and server.fields["version"] == negotiated
    assert summary["version"] == negotiated and summary["sni"] == "api.card-network.example"


def test_tls10_refused_by_server():
    events, summary = _events("tls10_refused_openssl")
    assert events[0].fields["offered_versions"] == ["1.0"] and events[0].fields["legacy_version"] == "1.0"
    assert events[1].kind == "alert" and events[1].fields["description"] == "protocol_version"
    assert summary["version"] is None and summary["alert"] == "protocol_version"


def test_ssh_openssh():
    events, summary = _events("ssh_openssh")
    assert {e.fields["side"]: e.fields["software"] for e in events} == {
        "client": "OpenSSH_9.2p1", "server": "OpenSSH_9.2p1"}
    assert summary == {"client": "OpenSSH_9.2p1", "server": "OpenSSH_9.2p1"}


def test_dns_tcp_dig():
    doc = load("dns_tcp_dnsmasq_dig")
    answers = []
    for segs in doc["connections"]:
        events, _ = run("dns", segs)
        q, a = events
        assert q.kind == "query" and a.kind == "answer" and a.fields["id"] == q.fields["id"]
        answers.append((q.fields["qname"], q.fields["qtype"], [(r["type"], r["data"]) for r in a.fields["answers"]]))
    assert answers == [
        ("api.card-network.example", "A", [("A", "10.1.2.3")]),
        ("www.card-network.example", "A", [("CNAME", "api.card-network.example")]),
        ("card-network.example", "MX", [("MX", "10 mail.card-network.example")]),
    ]


def test_dns_udp_dig():
    segs = load("dns_udp_dnsmasq_dig")["connections"][0]
    events, summary = run_udp(segs)
    assert [e.kind for e in events] == ["query", "answer"] * 3
    assert events[1].fields["answers"][0]["data"] == "fd00::3"
    assert events[3].fields["answers"][0] == {"name": "card-network.example", "type": "TXT",
                                              "data": "v=spf1 -all", "ttl": 0}
    assert events[5].fields["rcode"] == "REFUSED"
    assert summary["queries"] == ["api.card-network.example", "card-network.example", "nonexistent.invalid"]


def test_redis_cli():
    events, summary = _events("redis_cli")
    names = [e.fields["command"] for e in events]
    assert names == ["COMMAND", "PING", "SET", "GET", "CONFIG", "MULTI", "INCR", "EXPIRE", "EXEC", "HSET", "DEL"]
    assert events[4].fields["subcommand"] == "GET"
    assert events[9].fields["keys"] == 5 and events[10].fields["keys"] == 2
    assert summary["commands"]["CONFIG GET"] == 1
    # the 40 KB value of the second connection is skipped, not buffered
    big, _ = _events("redis_cli", 1)
    assert [(e.fields["command"], e.fields["keys"]) for e in big] == [("SET", 2)]


def test_pgsql_psql():
    events, summary = _events("pgsql_psql")
    startup = events[0]
    assert startup.kind == "startup" and startup.fields["user"] == "postgres"
    assert startup.fields["database"] == "postgres" and startup.fields["application_name"] == "rec"
    verbs = [e.fields["verb"] for e in events if e.kind == "statement"]
    assert verbs == ["CREATE", "INSERT", "SELECT", "SELECT", "UPDATE", "SELECT", "DROP"]
    errors = [e.fields["error"] for e in events if e.kind == "response" and "error" in e.fields]
    assert errors == ["42P01"]
    assert summary["verbs"] == {"CREATE": 1, "INSERT": 1, "SELECT": 3, "UPDATE": 1, "DROP": 1}
    multi, summary2 = _events("pgsql_psql", 1)
    stmt = [e for e in multi if e.kind == "statement"][0]
    assert stmt.fields["verbs"] == ["SELECT", "DELETE"] and summary2["verbs"] == {"SELECT": 1, "DELETE": 1}


def test_pgsql_sslrequest_refused():
    events, summary = _events("pgsql_sslrequest_refused")
    assert events[0].kind == "startup" and events[0].offset == 8  # after the 8-byte SSLRequest
    assert summary["encrypted"] is False and summary["verbs"] == {"SELECT": 1}


def test_mysql_mariadb():
    events, summary = _events("mysql_mariadb")
    assert events[0].kind == "greeting" and "MariaDB" in events[0].fields["server_version"]
    assert events[1].kind == "login" and events[1].fields == {"user": "root", "database": "mysql"}
    verbs = [e.fields["verb"] for e in events if e.kind == "statement"]
    assert verbs[:3] == ["CREATE", "SELECT", "USE"] and "INSERT" in verbs and "UPDATE" in verbs
    assert [e.fields["error"] for e in events if e.kind == "response"] == [1146]
    assert summary["user"] == "root" and summary["verbs"]["CREATE"] == 2
