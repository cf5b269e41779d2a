"""Fuzz the pod-annotation parsers: the downward-API file format and the values the sidecar acts on.

Input: the bytes of an ``annotations`` file (decoded as the sidecar does,
UTF-8 with replacement). Checked:

* ``parse_downward`` returns a dict or raises ``PodinfoError`` (message starts
  with ``line N:``) - nothing else;
* what parses survives the kubelet's own formatting: ``parse_downward(
  format_downward(d)) == d`` (so ``go_quote`` and the parser agree);
* for the annotations the sidecar and injector interpret (``palisade.dev/pcap``,
  ``palisade.dev/exclude-inbound-ports``, ``palisade.dev/exclude-outbound-cidrs``,
  ``palisade.dev/inject``, ``palisade.dev/mode``), the parser either accepts the
  value or raises its own documented error type.

Run: python -m fuzz.fuzz_podinfo -max_total_time=600
"""

from __future__ import annotations

from fuzz.common import check, instrumented, main

with instrumented(__name__ == "__main__"):
    from firewall.capture.manager import CaptureSpecError, parse_spec
    from firewall.identity.podinfo import PodinfoError, format_downward, go_quote, parse_downward
    from injector.annotations import AnnotationError, check_mode, exclusions, inject_flag

ANN_PCAP = "palisade.dev/pcap"


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    text = data.decode("utf-8", "replace")
    try:
        parsed = parse_downward(text)
    except PodinfoError as exc:
        check(str(exc).startswith("line "), f"PodinfoError without a line number: {exc}")
        parsed = None
    if parsed is not None:
        again = parse_downward(format_downward(parsed))
        check(again == parsed, "format_downward/parse_downward do not round-trip")
        values = parsed
    else:
        # still exercise the value parsers with the raw text as one value
        values = {ANN_PCAP: text, "palisade.dev/exclude-inbound-ports": text,
                  "palisade.dev/exclude-outbound-cidrs": text, "palisade.dev/mode": text,
                  "palisade.dev/inject": text}
    for key, value in values.items():
        check(parse_downward(f"k={go_quote(value)}") == {"k": value}, "go_quote round-trip")
        if key == ANN_PCAP or key.endswith("/pcap"):
            try:
                parse_spec(value)
            except CaptureSpecError:
                pass
    try:
        exclusions(values)
    except AnnotationError:
        pass
    try:
        check_mode(values)
    except AnnotationError:
        pass
    try:
        inject_flag({}, values)
    except AnnotationError:
        pass


SEEDS = [
    b'palisade.dev/pcap="duration=60s,filter=tcp port 5432,max-bytes=50MiB"\n'
    b'palisade.dev/quarantine="true"\npalisade.dev/mode="protect"',
    b'kubernetes.io/config.seen="2026-01-01T00:00:00.000000000Z"\npalisade.dev/exclude-inbound-ports="15021,9090"\n'
    b'palisade.dev/exclude-outbound-cidrs="169.254.169.254/32,fd00::/8"',
    b'a="\\x41\\u00e9\\U0001F600\\101\\a\\t\\"q\\""\nb=""',
    b'palisade.dev/inject="false"\npalisade.dev/pcap="filter=tcp and (port 80, or port 443),rotate=1MiB"',
]

if __name__ == "__main__":
    main(TestOneInput, SEEDS, "podinfo")
