"""Property tests: any input, any split into segments, gives the whole-buffer findings
(once retractions are applied), and scanning never raises."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.dlp.conftest import spans

PIECES = [b"4111111111111111", b"4111 1111 1111 1111", b"5555-5555-5555-4444", b"378282246310005",
          b"536-22-1234", b"DE89 3704 0044 0532 0130 00", b"DE89370400440532013000", b"AKIAZ7QJ3XKDLQ2MVB5R",
          b" ", b"-", b"0", b"7", b"\n", b"card ", b"x", b"12", b"ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"]
EXAMPLES = int(os.environ.get("PALISADE_FUZZ_EXAMPLES", "60"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=12)), max_size=30),
       cuts=st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20))
def test_any_segmentation_gives_the_whole_buffer_findings(engine, parts, cuts):
    data = b"".join(parts)
    reference = spans(engine.scan_bytes(data, chunk_size=max(1, len(data))))
    s = engine.stream(track_retractions=True)
    found, off, i = [], 0, 0
    while off < len(data):
        n = cuts[i % len(cuts)]
        found += s.scan(data[off:off + n])
        off += n
        i += 1
    found += s.close()
    gone = {(f.rule_id, f.start, f.end) for f in s.retracted}
    assert sorted(x for x in spans(found) if x not in gone) == reference
    for f in found:
        assert 0 <= f.start < f.end <= len(data)
        assert b"4111111111111111" not in f.masked.encode() and b"4111111111111111" not in f.context.encode()
