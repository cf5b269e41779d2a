"""Redis, PostgreSQL and MySQL: hand-built shapes the recordings do not cover."""

from __future__ import annotations

import struct
from pathlib import Path

from firewall.protocols import TOCLIENT, TOSERVER, make_parser
from firewall.protocols.stream import sql_verb
from tests.protocols.replay import bytewise, load, run


# -- redis ---------------------------------------------------------------------------------
def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def test_redis_big_values_are_skipped_and_secrets_not_kept():
    value = b"s3cret" * 100_000
    stream = resp(b"AUTH", b"hunter2") + resp(b"set", b"k", value) + resp(b"GET", b"k") + b"PING\r\n"
    events, summary = run("redis", [(TOSERVER, stream)])
    assert [(e.fields["command"], e.fields["keys"]) for e in events] == [
        ("AUTH", 1), ("SET", 2), ("GET", 1), ("PING", 0)]
    assert "hunter2" not in repr(events) + repr(summary)
    assert run("redis", [(TOSERVER, stream[i : i + 4096]) for i in range(0, len(stream), 4096)]) == (events, summary)


def test_redis_hold_until_the_command_name_is_known():
    p = make_parser("redis")
    first = resp(b"PING")
    p.feed(first + b"*2\r\n$8\r\nFLUSHA", TOSERVER)
    assert p.hold_from(TOSERVER) == len(first)
    (ev,) = p.feed(b"LL\r\n$5\r\nASYNC\r\n", TOSERVER)
    assert ev.fields["command"] == "FLUSHALL" and ev.offset == len(first)
    assert p.hold_from(TOSERVER) is None


def test_redis_replies_are_not_parsed_and_garbage_is_an_anomaly():
    p = make_parser("redis")
    assert p.feed(b"-ERR whatever\r\n$-1\r\n", TOCLIENT) == []
    (ev,) = p.feed(b"*2\r\n:5\r\n", TOSERVER)
    assert ev.kind == "anomaly" and ev.anomaly == "bad-resp"


# -- pgsql ---------------------------------------------------------------------------------
def pg(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!I", len(body) + 4) + body


def startup(user="app", database="payments") -> bytes:
    body = struct.pack("!I", 196608) + b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    return struct.pack("!I", len(body) + 4) + body


def test_pgsql_extended_protocol_parse_message():
    parse = pg(b"P", b"stmt1\0  DELETE FROM cards WHERE id = $1\0" + struct.pack("!H", 0))
    bind = pg(b"B", b"\0stmt1\0" + b"\0" * 6)
    stream = startup() + parse + bind + pg(b"E", b"\0\0\0\0\0") + pg(b"S", b"")
    events, summary = run("pgsql", [(TOSERVER, stream)])
    assert events[0].fields == {"user": "app", "database": "payments", "application_name": None, "protocol": "3.0"}
    assert events[1].kind == "statement" and events[1].fields["verb"] == "DELETE"
    assert events[1].fields["message"] == "parse" and events[1].end == len(startup() + parse)
    assert run("pgsql", bytewise([(TOSERVER, stream)])) == (events, summary)


def test_pgsql_password_is_never_read():
    stream = startup() + pg(b"p", b"TopSecret!\0") + pg(b"Q", b"SELECT 1\0")
    events, summary = run("pgsql", [(TOSERVER, stream)])
    assert "TopSecret" not in repr(events) + repr(summary) and summary["verbs"] == {"SELECT": 1}


def test_pgsql_huge_query_is_truncated_and_skipped():
    sql = b"INSERT INTO t VALUES " + b"(1,'x')," * 200_000 + b"(2,'y')\0"
    stream = startup() + pg(b"Q", sql) + pg(b"Q", b"COMMIT\0")
    events, summary = run("pgsql", [(TOSERVER, stream)])
    insert, commit = events[1], events[2]
    assert insert.fields["verb"] == "INSERT" and insert.fields["truncated"] is True
    assert len(insert.fields["statement"]) == 256 and commit.fields["verb"] == "COMMIT"
    assert commit.offset == insert.end


def test_pgsql_hold_covers_a_statement_prefix_still_arriving():
    p = make_parser("pgsql")
    p.feed(startup(), TOSERVER)
    q = pg(b"Q", b"DROP TABLE cards\0")
    p.feed(q[:7], TOSERVER)
    assert p.hold_from(TOSERVER) == len(startup())
    (ev,) = p.feed(q[7:], TOSERVER)
    assert ev.fields["verb"] == "DROP" and p.hold_from(TOSERVER) is None


def _golden(name: str) -> bytes:
    return (Path(__file__).parent / "data" / name).read_bytes()


def _pg_ssl_flow(answer: bytes = b"S") -> tuple:
    p = make_parser("pgsql")
    assert p.feed(struct.pack("!II", 8, 80877103), TOSERVER) == []
    return p, p.feed(answer, TOCLIENT)


def test_pgsql_ssl_accepted_switches_both_directions_to_tls():
    # issue 15 item 4: the stream after 'S' is TLS, parsed as such (it was passed unread)
    p, (switch,) = _pg_ssl_flow()
    assert switch.kind == "switch" and switch.fields == {"to": "tls", "via": "sslrequest"}
    assert (switch.direction, switch.offset, switch.end) == (TOCLIENT, 0, 1)
    client, server = _golden("openssl_tls1_3_client.bin"), _golden("openssl_tls1_3_server.bin")
    p.feed(client[:100], TOSERVER)
    assert p.hold_from(TOSERVER) == 8  # the ClientHello is held until complete, offsets are the outer stream's
    events = p.feed(client[100:395], TOSERVER) + p.feed(server, TOCLIENT) + p.feed(client[395:], TOSERVER)
    assert [e.kind for e in events] == ["hello", "server_hello", "established"]
    assert all(e.app_proto == "pgsql" for e in events)
    assert events[0].offset == 8 and events[0].fields["sni"] == "pay.example"
    assert events[1].offset == 1 and events[1].fields["version"] == "1.3"
    assert p.summary()["encrypted"] is True and p.summary()["switched_to"] == "tls"


def test_pgsql_plaintext_after_ssl_accepted_breaks_the_record_layer():
    p, _ = _pg_ssl_flow()
    (ev,) = p.feed(startup() + pg(b"Q", b"SELECT 1\0"), TOSERVER)
    assert ev.anomaly == "tls:bad-record" and ev.offset == 8
    assert p.summary()["encrypted"] is False  # never a completed handshake


def test_pgsql_six_bytes_of_record_header_after_s_are_not_a_handshake():
    p, _ = _pg_ssl_flow()
    events = p.feed(b"\x16\x03\x01\x00\x10" + b"\0" * 16, TOSERVER)
    assert [e.anomaly for e in events] == ["tls:unexpected-handshake"]


def test_pgsql_gssenc_accepted_is_a_switch_to_gssapi():
    p = make_parser("pgsql")
    assert p.feed(struct.pack("!II", 8, 80877104), TOSERVER) == []
    (ev,) = p.feed(b"G", TOCLIENT)
    assert ev.kind == "switch" and ev.fields == {"to": "gssapi", "via": "gssencrequest"}
    assert p.feed(pg(b"Q", b"SELECT 1\0"), TOSERVER) == []  # opaque: the session decides (exception policy)
    assert p.summary()["switched_to"] == "gssapi"


def test_pgsql_ssl_refused_stays_plaintext_and_held_client_bytes_are_parsed():
    p, events = _pg_ssl_flow(b"N")
    assert events == []
    (ev,) = p.feed(startup(), TOSERVER)
    assert ev.kind == "startup"
    (ev,) = p.feed(pg(b"Q", b"DROP TABLE t\0"), TOSERVER)
    assert ev.fields["verb"] == "DROP"


def test_pgsql_client_talking_before_the_answer_is_held():
    p = make_parser("pgsql")
    p.feed(struct.pack("!II", 8, 80877103), TOSERVER)
    assert p.feed(startup(), TOSERVER) == [] and p.hold_from(TOSERVER) == 8
    (ev,) = p.feed(b"N", TOCLIENT)
    assert ev.kind == "startup" and p.hold_from(TOSERVER) is None


def test_pgsql_bad_lengths_are_anomalies():
    events, _ = run("pgsql", [(TOSERVER, struct.pack("!II", 3, 196608))])
    assert [e.anomaly for e in events] == ["bad-startup"]
    events, _ = run("pgsql", [(TOSERVER, startup() + b"Q\0\0\0\x02")])
    assert events[-1].anomaly == "bad-message-length"


def test_sql_verb_skips_comments_and_parentheses():
    assert sql_verb("  -- hi\n/* x */ (select 1)") == "SELECT"
    assert sql_verb("# mysql comment\nupdate t set a=1") == "UPDATE"
    assert sql_verb("/* never closed") == ""


# -- mysql ---------------------------------------------------------------------------------
def my(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


GREETING = load("mysql_mariadb")["connections"][0][0][1]


def login(user=b"app", db=b"shop", caps=0x000FA68D | 0x8) -> bytes:
    body = struct.pack("<IIB", caps, 1 << 24, 33) + b"\0" * 23 + user + b"\0" + b"\x14" + b"a" * 20 + db + b"\0"
    body += b"mysql_native_password\0"
    return my(1, body)


def test_mysql_login_and_commands_by_sequence_id():
    big = b"INSERT INTO t VALUES " + b"(1)," * 100_000 + b"(2)"
    stream = login() + my(0, b"\x03" + big) + my(0, b"\x02archive") + my(0, b"\x16SELECT ? FROM t") + my(0, b"\x01")
    segs = [(TOCLIENT, GREETING), (TOSERVER, stream)]
    events, summary = run("mysql", segs)
    kinds = [(e.kind, e.fields.get("verb") or e.fields.get("user")) for e in events]
    assert kinds == [("greeting", None), ("login", "app"), ("statement", "INSERT"), ("statement", "USE"),
                     ("statement", "SELECT")]
    assert events[2].fields["truncated"] is True and events[3].fields["command"] == "init_db"
    assert summary["database"] == "archive" and summary["verbs"] == {"INSERT": 1, "USE": 1, "SELECT": 1}
    assert run("mysql", bytewise(segs)) == (events, summary)


def test_mysql_ssl_request_switches_to_tls():
    ssl_req = my(1, struct.pack("<IIB", 0x000FA68D | 0x800, 1 << 24, 33) + b"\0" * 23)
    p = make_parser("mysql")
    assert p.feed(GREETING, TOCLIENT)[0].kind == "greeting"
    (switch,) = p.feed(ssl_req, TOSERVER)
    assert switch.kind == "switch" and switch.fields == {"to": "tls", "via": "client_ssl"}
    client, server = _golden("openssl_tls1_2_client.bin"), _golden("openssl_tls1_2_server.bin")
    events = p.feed(client[:100], TOSERVER) + p.feed(client[100:], TOSERVER) + p.feed(server, TOCLIENT)
    assert [e.kind for e in events] == ["hello", "server_hello", "established"]
    assert events[0].offset == len(ssl_req) and events[1].offset == len(GREETING)
    assert p.summary()["encrypted"] is True


def test_mysql_plaintext_after_ssl_request_breaks_the_record_layer():
    ssl_req = my(1, struct.pack("<IIB", 0x000FA68D | 0x800, 1 << 24, 33) + b"\0" * 23)
    p = make_parser("mysql")
    p.feed(GREETING, TOCLIENT)
    p.feed(ssl_req, TOSERVER)
    (ev,) = p.feed(my(0, b"\x03SELECT secret FROM cards"), TOSERVER)
    assert ev.anomaly == "tls:bad-record" and ev.offset == len(ssl_req)


def test_mysql_error_greeting():
    err = my(0, b"\xff" + struct.pack("<H", 1130) + b"Host is not allowed")
    events, summary = run("mysql", [(TOCLIENT, err)])
    assert events[0].fields["error"] == 1130 and summary["errors"] == 1


# -- the switch through the session ------------------------------------------------------------
def _pg_session(tmp_path, port, mode="protect"):
    from firewall.dlp.engine import DlpEngine
    from tests.protocols.test_tls import make_session

    return make_session(tmp_path, DlpEngine.load(), port, mode)


def test_switch_hiding_plaintext_an_l7_rule_reads_is_refused_in_protect(tmp_path):
    s, events = _pg_session(tmp_path, 5433)  # sql: {verbs: [SELECT]} needs the statements
    s.feed(TOSERVER, struct.pack("!II", 8, 80877103))
    out, stop = s.feed(TOCLIENT, b"S")
    assert stop is not None and out == b"" and s.verdict == "deny"
    (alert,) = [e for e in events if e.get("alert", {}).get("category") == "inspection"]
    assert alert["alert"]["signature"] == "inspection:tunnel:pgsql:sslrequest->tls"


def test_switch_on_a_port_without_l7_rules_is_followed_as_tls(tmp_path):
    s, events = _pg_session(tmp_path, 5432)
    s.feed(TOSERVER, struct.pack("!II", 8, 80877103))
    out, stop = s.feed(TOCLIENT, b"S")
    assert stop is None and out == b"S" and not s.encrypted
    client, server = _golden("openssl_tls1_3_client.bin"), _golden("openssl_tls1_3_server.bin")
    s.feed(TOSERVER, client[:263])
    s.feed(TOCLIENT, server)
    s.feed(TOSERVER, client[263:])
    assert s.encrypted and s.app_proto == "pgsql" and s.record()["l7"]["switched_to"] == "tls"
    # plaintext after the switch is a broken record layer: refused (the DLP block rule governs the flow)
    s2, _ = _pg_session(tmp_path, 5432)
    s2.feed(TOSERVER, struct.pack("!II", 8, 80877103))
    s2.feed(TOCLIENT, b"S")
    out, stop = s2.feed(TOSERVER, startup() + pg(b"Q", b"SELECT '4111111111111111'\0"))
    assert stop is not None and out == b"" and stop.reason.startswith("inspection-error:parse:pgsql:tls:")


def test_switch_in_monitor_mode_alerts_and_forwards(tmp_path):
    s, events = _pg_session(tmp_path, 5433, "monitor")
    s.feed(TOSERVER, struct.pack("!II", 8, 80877104))  # GSSENCRequest
    out, stop = s.feed(TOCLIENT, b"G")
    assert stop is None and out == b"G"
    (alert,) = [e for e in events if e.get("alert", {}).get("category") == "inspection"]
    assert alert["alert"]["signature"] == "inspection:tunnel:pgsql:gssencrequest->gssapi"
    assert alert["inspection"]["action"] == "forward"


def test_mysql_statements_a_verbs_rule_cannot_see_are_incomplete():
    from firewall.policy.match import L7Matcher
    from firewall.policy.model import SqlMatch

    m = L7Matcher.build("sql", SqlMatch(verbs=["SELECT"]))
    multi = 0x000FA68D | 0x8  # includes CLIENT_MULTI_STATEMENTS (0x10000), as the mysql client sends
    single = multi & ~0x10000
    for caps, sql, allowed in [
        (single, b"SELECT '" + b"x" * 3000 + b"'; DROP TABLE t", True),  # one statement per query
        (multi, b"SELECT '" + b"x" * 3000 + b"'; DROP TABLE t", False),
        (multi, b"SELECT 1; DROP TABLE t", False),
        (multi, b"SELECT 1; SELECT 2", True),
    ]:
        p = make_parser("mysql")
        p.feed(GREETING, TOCLIENT)
        p.feed(login(caps=caps), TOSERVER)
        (ev,) = p.feed(my(0, b"\x03" + sql), TOSERVER)
        assert m.check(ev) is allowed, (hex(caps), sql[:20])
    # query attributes hide the statement text: incomplete, refused by a verbs rule
    p = make_parser("mysql")
    p.feed(GREETING, TOCLIENT)
    p.feed(login(caps=single | (1 << 27)), TOSERVER)
    (ev,) = p.feed(my(0, b"\x03\x01\x01" + b"\x00" * 4 + b"SELECT 1"), TOSERVER)
    assert ev.fields["verbs_complete"] is False and m.check(ev) is False
