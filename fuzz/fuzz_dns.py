"""Fuzz DNS: the TCP stream parser (length-prefixed messages) and ``parse_message`` for UDP datagrams.

Every record of the input is also parsed as one datagram: ``parse_message`` must
return an ``L7Event`` (malformed -> ``anomaly``) and never raise.

Run: python -m fuzz.fuzz_dns -max_total_time=600
"""

from __future__ import annotations

from fuzz.common import check, instrumented, main

with instrumented(__name__ == "__main__"):
    from firewall.protocols import L7Event
    from firewall.protocols.dns import parse_message
    from fuzz.protocol_target import decode, encode, parser_target, recorded_conversations, seeds

_stream = parser_target("dns")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    _stream(data)
    for d, datagram in decode(data)[1]:
        ev = parse_message(datagram, d)
        check(isinstance(ev, L7Event), "parse_message must return an L7Event")
        check(ev.kind == "anomaly" or ev.anomaly is None, f"anomaly name on {ev}")


SEEDS = seeds("dns") + [encode(c) for c in recorded_conversations("dns_udp_dnsmasq_dig")[:4]]

if __name__ == "__main__":
    main(TestOneInput, SEEDS, "dns")
