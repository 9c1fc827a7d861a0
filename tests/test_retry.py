"""Failure policy: classification, Retry-After parsing and retry decisions, as tables."""

from __future__ import annotations

import email.utils
import json
import random

import pytest

from batchhub.errors import (
    AuthenticationError,
    BadResponseError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitError,
    RequestRejected,
    ServerError,
    TransportError,
)
from batchhub.http_errors import classify
from batchhub.retry import backoff_delay, next_step, parse_retry_after


def body(message: str = "m", code: str | None = None, kind: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()


@pytest.mark.parametrize(
    ("status", "payload", "expected"),
    [
        (400, body("bad temperature"), RequestRejected),
        (404, body("no such route"), NotFoundError),
        (404, body("The model `x` does not exist", "model_not_found"), NotFoundError),
        (422, b"unprocessable", RequestRejected),
        (401, body("Incorrect API key", "invalid_api_key"), AuthenticationError),
        (403, body("not allowed", "model_not_allowed"), PermissionDeniedError),
        (429, body("slow down", "rate_limit_exceeded"), RateLimitError),
        (429, body("You exceeded your current quota", "insufficient_quota", "insufficient_quota"), QuotaExceededError),
        (429, body("quota", None, "insufficient_quota"), QuotaExceededError),
        (429, b"<html>Too Many Requests</html>", RateLimitError),
        (500, body("internal"), ServerError),
        (502, b"<html>bad gateway</html>", ServerError),
        (503, b"", ServerError),
        (504, body("timeout"), ServerError),
        (408, b"", TransportError),  # not a server error: the server timed out waiting for the request
        (409, body("conflict"), ConflictError),
    ],
)
def test_classify(status: int, payload: bytes, expected: type) -> None:
    err = classify(status, payload, {"x-request-id": "req_1"})
    assert type(err) is expected
    assert err.status == status
    assert err.request_id == "req_1"


def test_classify_keeps_server_message_and_code() -> None:
    err = classify(400, body("temperature must be <= 2", "invalid_value"), {})
    assert "temperature must be <= 2" in str(err)
    assert err.code == "invalid_value"
    assert str(err).startswith("HTTP 400")


def test_quota_is_decided_by_code_not_text() -> None:
    # a rate-limit message that mentions quota is still a rate limit
    err = classify(429, body("per-minute quota reached, slow down", "rate_limit_exceeded"), {})
    assert type(err) is RateLimitError


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "-3"}, None),
        ({"Retry-After": "soon"}, None),
        ({"retry-after-ms": "250", "Retry-After": "1"}, 0.25),
        ({"retry-after-ms": "x", "Retry-After": "2"}, 2.0),
        ({"Retry-After": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
        ({"Retry-After": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    got = parse_retry_after(headers, now=NOW)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_rate_limit_error_carries_retry_after() -> None:
    err = classify(429, body(), {"Retry-After": "3"})
    assert isinstance(err, RateLimitError)
    assert err.retry_after == 3.0


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(60.0, 1.0 * 2 ** (attempt - 1))
        samples = [backoff_delay(attempt, rng) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # spreads over the whole range, not a fixed delay


KW = {"max_attempts": 3, "max_rate_limit_retries": 4}


@pytest.mark.parametrize(
    ("error", "failures", "rate_limits", "retry", "pool_wide"),
    [
        (ServerError("x", status=503), 1, 0, True, False),
        (ServerError("x", status=503), 2, 0, True, False),
        (ServerError("x", status=503), 3, 0, False, False),
        (TransportError("timeout"), 1, 0, True, False),
        (BadResponseError("not json"), 2, 0, True, False),
        (BadResponseError("not json"), 3, 0, False, False),
        (RequestRejected("bad", status=400), 1, 0, False, False),
        (AuthenticationError("no", status=401), 1, 0, False, False),
        (RateLimitError("slow", status=429), 0, 1, True, True),
        # many 429s do not use up the failure attempts...
        (RateLimitError("slow", status=429), 0, 4, True, True),
        # ...but have their own bound
        (RateLimitError("slow", status=429), 0, 5, False, False),
        # a row with failures used up may still wait out rate limits
        (RateLimitError("slow", status=429), 3, 2, True, True),
    ],
)
def test_next_step(error, failures: int, rate_limits: int, retry: bool, pool_wide: bool) -> None:
    d = next_step(error, failures=failures, rate_limits=rate_limits, rng=random.Random(0), **KW)
    assert d.retry is retry
    assert d.pool_wide is pool_wide


def test_next_step_uses_retry_after_for_429_and_caps_it() -> None:
    d = next_step(RateLimitError("x", retry_after=12.0), failures=0, rate_limits=1, **KW)
    assert d.delay == 12.0
    d = next_step(RateLimitError("x", retry_after=86400.0), failures=0, rate_limits=1, **KW)
    assert d.delay == 300.0


def test_next_step_429_without_retry_after_leaves_the_wait_to_the_limiter() -> None:
    """A bare 429 once doubled a pool-wide cool-down per 429 of the row (1, 2, 4... s, up to 60 s): a job
    told nothing ran at 3% of a 1,200 rpm limit. Now the row waits its turn at the rate learned from it."""
    decisions = [next_step(RateLimitError("x"), failures=0, rate_limits=n, **KW) for n in (1, 2, 3, 4)]
    assert [(d.retry, d.delay, d.pool_wide) for d in decisions] == [(True, 0.0, True)] * 4


def test_server_retry_after_is_a_floor_for_backoff() -> None:
    d = next_step(ServerError("x", retry_after=9.0), failures=1, rate_limits=0, rng=random.Random(0), **KW)
    assert d.delay >= 9.0
