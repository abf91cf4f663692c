"""Backoff between attempts: exponential with full jitter, never shorter than the server asked."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

from alambic.generate.config import RetryConfig


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date); None if absent."""
    if headers is None:
        return None
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(0.0, float(milliseconds) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, retry_after: float | None, policy: RetryConfig, rng: random.Random) -> float:
    """Wait before attempt `attempt + 1`.

    Full jitter spreads retries of requests that failed together; a
    Retry-After is a floor (capped so a broken header cannot stall the run for
    hours), and a little jitter on top keeps those retries from arriving at once.
    """
    ceiling = min(policy.max_delay_s, policy.base_delay_s * (2 ** (attempt - 1)))
    delay = rng.uniform(0.0, ceiling)
    if retry_after is not None:
        floor = min(retry_after, policy.max_retry_after_s)
        delay = max(delay, floor + rng.uniform(0.0, min(policy.base_delay_s, floor * 0.1 + 1e-3)))
    return delay
