"""The one exponential back-off every retry in the node uses (jobs, outbox rows, webhook
notifications, the audit repository): the first delay, doubled for each attempt after the first,
capped."""

from __future__ import annotations

import math

#: Doublings past this many change nothing a clock can wait for (2**62 first delays), and the
#: exponent stays small enough for a float.
_MAX_DOUBLINGS = 62


def backoff_s(initial_s: float, attempt: int, max_s: float = math.inf) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first failure):
    ``initial_s * 2 ** (attempt - 1)``, at most ``max_s``; ``initial_s`` for attempt 0 or less."""
    return min(max_s, initial_s * 2 ** min(_MAX_DOUBLINGS, max(0, attempt - 1)))
