"""Fuzz the ssh parser (see fuzz/protocol_target.py for the input layout and the checks).

Run: python -m fuzz.fuzz_ssh -max_total_time=600   (libFuzzer flags; fuzz/README.md)
"""

from __future__ import annotations

from fuzz.common import instrumented, main

with instrumented(__name__ == "__main__"):
    import firewall.protocols  # noqa: F401
    from fuzz.protocol_target import parser_target, seeds

TestOneInput = parser_target("ssh")
SEEDS = seeds("ssh")

if __name__ == "__main__":
    main(TestOneInput, SEEDS, "ssh")
