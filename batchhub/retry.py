"""Retry policy as pure functions of (status, error body, headers, attempt).

- `classify(status, body, headers)` turns an error response into the right `APIError`.
- `parse_retry_after(headers, now)` reads `retry-after-ms`, `Retry-After` (seconds or an
  HTTP date) and returns seconds, or None.
- `backoff_delay(attempt, rng)` is exponential backoff with full jitter.
- `next_step(error, failures, rate_limits, spec)` decides: retry after how long, or give up.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchhub import defaults
from batchhub.errors import (
    APIError,
    AuthenticationError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    RequestRejected,
    RetryableError,
    ServerError,
)

#: error codes of a 429 that mean "out of money", not "slow down"
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "quota_exceeded"})


def parse_error_body(body: bytes | str | None) -> tuple[str | None, str | None, str | None]:
    """(message, code, type) from an OpenAI-style `{"error": {...}}` body, None where absent."""
    if not body:
        return None, None, None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None, None
    err: Any = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, str):
        return err, None, None
    if not isinstance(err, dict):
        message = data.get("message") if isinstance(data, dict) else None
        return (message if isinstance(message, str) else None), None, None
    message = err.get("message")
    code = err.get("code")
    kind = err.get("type")
    return (
        message if isinstance(message, str) else None,
        str(code) if code is not None else None,
        kind if isinstance(kind, str) else None,
    )


#: the fields of an OpenAI error object, kept as the server sent them
_ERROR_FIELDS = ("message", "type", "param", "code")


def error_object(body: bytes | str | None) -> dict[str, Any] | None:
    """The OpenAI-style `error` object of a body (its message, type, param, code as sent), or None."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict):
        return None
    kept = {k: err[k] for k in _ERROR_FIELDS if k in err and (err[k] is None or isinstance(err[k], str | int))}
    return kept or None


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


def classify(status: int, body: bytes | str | None, headers: Mapping[str, str]) -> APIError:
    """The error for a non-2xx response (the failure policy table of DESIGN.md)."""
    message, code, kind = parse_error_body(body)
    request_id = next((v for k, v in headers.items() if k.lower() == "x-request-id"), None)
    text = message or _default_message(status)
    common: dict[str, Any] = {"status": status, "code": code, "request_id": request_id}
    common["error_object"] = error_object(body)
    if status == 401:
        return AuthenticationError(f"the API key was refused: {text}", **common)
    if status == 403:
        return PermissionDeniedError(f"this key may not use the model: {text}", **common)
    if status == 404:
        # a model that does not exist or a URL that is not the API: every other request would get it too
        return NotFoundError(text, **common)
    if status == 429:
        if (code in QUOTA_CODES) or (kind in QUOTA_CODES):
            return QuotaExceededError(f"the account's quota or balance is exhausted: {text}", **common)
        return RateLimitError(text, retry_after=parse_retry_after(headers), **common)
    if status >= 500:
        return ServerError(text, retry_after=parse_retry_after(headers), **common)
    if status == 408 or status == 409:
        # request timeout and conflict are transient by definition
        return ServerError(text, **common)
    return RequestRejected(text, **common)


def _default_message(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"status {status}"


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
    #: True when the whole pool should pause (a 429), not only this row
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
        if error.retry_after is not None:
            return Decision(retry=True, delay=min(error.retry_after, defaults.RETRY_AFTER_CAP_S), pool_wide=True)
        delay = min(defaults.COOLDOWN_CAP_S, defaults.COOLDOWN_BASE_S * 2 ** min(rate_limits - 1, 16))
        return Decision(retry=True, delay=delay, pool_wide=True)
    if isinstance(error, RetryableError):
        if failures >= max_attempts:
            return Decision(retry=False)
        delay = backoff_delay(failures, rng, base=backoff_base)
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, defaults.RETRY_AFTER_CAP_S))
        return Decision(retry=True, delay=delay)
    return Decision(retry=False)
