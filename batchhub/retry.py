"""Retry policy as pure functions of (error, headers, attempt).

Which error a reply or a client exception is, is decided once, in `batchhub.http_errors`.

- `parse_retry_after(headers, now)` reads `retry-after-ms`, `Retry-After` (seconds or an
  HTTP date) and returns seconds, or None.
- `backoff_delay(attempt, rng)` is exponential backoff with full jitter.
- `next_step(error, failures, rate_limits, spec)` decides: retry after how long, or give up.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

from batchhub import defaults
from batchhub.errors import APIError, RateLimitError, RetryableError


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, from `retry-after-ms` or `Retry-After`, or None."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if value >= 0:
                return value
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        return value if value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def backoff_delay(
    attempt: int,
    rng: random.Random | None = None,
    base: float = defaults.BACKOFF_BASE_S,
    cap: float = defaults.BACKOFF_CAP_S,
) -> float:
    """Full-jitter backoff for the `attempt`-th failure (1-based): uniform in [0, min(cap, base * 2^(n-1))]."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed attempt."""

    retry: bool
    delay: float = 0.0
    #: True for a 429: the limiter, not this row, waits (`delay` is the server's Retry-After,
    #: 0 for a bare 429, after which the row waits its turn at the limit learned from it)
    pool_wide: bool = False


def next_step(
    error: APIError,
    *,
    failures: int,
    rate_limits: int,
    max_attempts: int,
    max_rate_limit_retries: int,
    rng: random.Random | None = None,
    backoff_base: float = defaults.BACKOFF_BASE_S,
) -> Decision:
    """Retry or give up, and how long to wait.

    `failures` counts this row's retryable non-429 failures so far (this one included),
    `rate_limits` its 429s so far (this one included). The two budgets are separate so a
    long rate-limit storm does not use up a row's attempts.
    """
    if isinstance(error, RateLimitError):
        if rate_limits > max_rate_limit_retries:
            return Decision(retry=False)
        # a bare 429 waits no fixed time: the limiter paces the row's next attempt by what it learned
        delay = min(error.retry_after, defaults.RETRY_AFTER_CAP_S) if error.retry_after is not None else 0.0
        return Decision(retry=True, delay=delay, pool_wide=True)
    if isinstance(error, RetryableError):
        if failures >= max_attempts:
            return Decision(retry=False)
        delay = backoff_delay(failures, rng, base=backoff_base)
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, defaults.RETRY_AFTER_CAP_S))
        return Decision(retry=True, delay=delay)
    return Decision(retry=False)
