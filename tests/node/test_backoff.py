"""The one back-off: the delays the jobs, the outbox, the webhook and the audit sender waited before
they shared it."""

from __future__ import annotations

import math

from node.backoff import backoff_s


def test_the_delays_each_retry_waited_before() -> None:
    for attempt in range(1, 30):
        assert backoff_s(10.0, attempt) == 10.0 * 2 ** (attempt - 1)  # jobs, webhook
        assert backoff_s(5.0, attempt, 600.0) == min(600.0, 5.0 * 2 ** max(0, attempt - 1))  # outbox
    delay, audit = 0.5, []  # the audit sender doubled its own delay after each failure in a row
    for _ in range(10):
        audit.append(delay)
        delay = min(30.0, delay * 2)
    assert [backoff_s(0.5, n, 30.0) for n in range(1, 11)] == audit


def test_no_overflow_for_any_attempt_count() -> None:
    assert backoff_s(5.0, 0) == 5.0
    assert backoff_s(5.0, 10_000, 600.0) == 600.0
    assert math.isfinite(backoff_s(5.0, 10_000))
