"""bench/soak.py's accounting: which outcome each response is, counts, and the latency percentiles.
(The soak itself runs for minutes against a real server and is not part of the test suite.)"""

from __future__ import annotations

import json

import pytest

from bench.soak import OUTCOMES, Tally, outcome_of

ERROR_5XX = json.dumps({"error": {"message": "engine failed", "type": "service_unavailable_error"}})
ERROR_4XX = json.dumps({"error": {"message": "bad", "type": "invalid_request_error"}})
CHUNK = json.dumps({"choices": [{"delta": {"content": "hi"}}]})


@pytest.mark.parametrize("status, events, body_ok, expected", [
    (200, None, True, "completed"),
    (200, None, False, "lost"),  # a 200 whose body is not the JSON it should be
    (400, None, True, "rejected_4xx"),
    (429, None, True, "rejected_4xx"),
    (503, None, True, "5xx"),
    (200, [CHUNK, CHUNK, "[DONE]"], True, "completed"),
    (200, [CHUNK, CHUNK], True, "lost"),  # cut before [DONE]
    (200, [], True, "lost"),
    (200, [CHUNK, ERROR_5XX, "[DONE]"], True, "5xx"),  # an error event in a 200 stream is still an error
    (200, [ERROR_4XX, "[DONE]"], True, "rejected_4xx"),
    (200, [CHUNK, "{not json", "[DONE]"], True, "5xx"),
])
def test_outcome_of(status: int, events: list[str] | None, body_ok: bool, expected: str) -> None:
    assert outcome_of(status, events, body_ok) == expected


def test_tally_counts_and_percentiles() -> None:
    tally = Tally()
    for i in range(1, 101):  # completed latencies 0.01 .. 1.00 s
        tally.record("chat", "completed", i / 100)
    tally.record("bad: malformed JSON", "rejected_4xx", 9.0)
    tally.record("chat stream", "cancelled", 9.0)
    assert tally.sent == 102 and tally.outcomes["completed"] == 100
    assert tally.by_kind[("chat stream", "cancelled")] == 1
    assert tally.percentile(50) == 0.50 and tally.percentile(99) == 0.99 and tally.percentile(100) == 1.00
    assert tally.summary() == "sent 102  completed 100  rejected_4xx 1  5xx 0  lost 0  cancelled 1"
    assert set(OUTCOMES) == {"completed", "rejected_4xx", "5xx", "lost", "cancelled"}
    with pytest.raises(AssertionError):
        tally.record("chat", "succeeded", 0.1)
    assert Tally().percentile(99) != Tally().percentile(99)  # nan without completed requests
