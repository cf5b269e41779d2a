"""Fuzz the HTTP/1.x parser (see fuzz/protocol_target.py for the input layout and the checks).

Besides the recorded curl/nginx conversation, the seeds hold the framing shapes
request smuggling relies on, so the fuzzer starts next to the refusal paths.

Run: python -m fuzz.fuzz_http -max_total_time=600 -dict=fuzz/dicts/http.dict
"""

from __future__ import annotations

from fuzz.common import instrumented, main

with instrumented(__name__ == "__main__"):
    import firewall.protocols  # noqa: F401
    from fuzz.protocol_target import parser_target, seeds

TestOneInput = parser_target("http")
SEEDS = seeds("http", [
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nT: 1\r\n\r\n"
    b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n\x16\x03\x01",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
])

if __name__ == "__main__":
    main(TestOneInput, SEEDS, "http")
