"""Requests-per-minute and tokens-per-minute limits, and the pool-wide 429 cool-down.

Two aiolimiter leaky buckets: one counts requests, one tokens. A request's token
cost is not known before its response, so it reserves an estimate (prompt
estimate + expected completion) and `settle()` corrects the bucket with the real
`usage` once it is known: over-estimates are given back, under-estimates are
charged as debt that later requests wait out. The expected completion length is
calibrated from real usage as the job runs.

`x-ratelimit-limit-*` / `-remaining-*` / `-reset-*` response headers tighten the
limits (a bucket is adopted from them when none was configured), and a 429 pauses
every worker together until the server's Retry-After has passed.

`Limiter` is what the runner needs of a limiter. `RateLimits` is the one of a
single process; `batchhub.shared_limits.SharedLimits` is one shared by every
task of a job on a Ray cluster.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from aiolimiter import AsyncLimiter

from batchhub import defaults

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
#: Counts past this in a header are not a real limit (no provider counts to 10**15 a minute).
MAX_COUNT = 10**15


def parse_duration(text: str | None) -> float | None:
    """OpenAI-style reset durations ("1s", "6m0s", "120ms", "1h2m3.5s", or plain seconds) -> seconds."""
    if text is None:
        return None
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:  # inf, nan or negative: not a duration, ignore it
        return seconds if 0 <= seconds < math.inf else None
    total, pos = 0.0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        value, unit = float(m.group(1)), m.group(2)
        total += value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        pos = m.end()
    return total if pos == len(text) and pos > 0 and total < math.inf else None


def parse_count(value: str | None) -> int | None:
    """A header's count ("100", "99.9", "1e3") as a whole number, or None when it is not usable.

    A server may send anything: `inf`, `1e400`, `nan`, negative or absurd numbers are ignored,
    never trusted and never an error (an `inf` once crashed the job after a paid reply).
    """
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if 0 <= number <= MAX_COUNT else None  # False for nan and inf


@dataclass(frozen=True, slots=True)
class LimitHeaders:
    """What one reply's `x-ratelimit-*` headers say of one kind ("requests" or "tokens"); None where
    a header is absent or unusable. The one reading of these headers, for every limiter."""

    kind: str
    limit: int | None
    remaining: int | None
    reset_s: float | None


def read_limit_headers(headers: Mapping[str, str]) -> list[LimitHeaders]:
    """The `x-ratelimit-limit-*`, `-remaining-*` and `-reset-*` headers, for requests and tokens."""
    out = []
    for kind in ("requests", "tokens"):
        limit = parse_count(headers.get(f"x-ratelimit-limit-{kind}"))
        out.append(
            LimitHeaders(
                kind,
                limit if limit else None,  # a limit of 0 paces nothing
                parse_count(headers.get(f"x-ratelimit-remaining-{kind}")),
                parse_duration(headers.get(f"x-ratelimit-reset-{kind}")),
            )
        )
    return out


class Bucket(AsyncLimiter):
    """An aiolimiter bucket that can also be corrected after the fact.

    aiolimiter has no public way to return or add capacity, which settling token
    estimates needs; `adjust` changes the level it keeps and wakes its waiters.
    """

    def adjust(self, amount: float) -> None:
        """Add `amount` to the level (negative gives capacity back); the level may exceed max_rate (debt)."""
        self._leak()
        self._level = max(0.0, self._level + amount)
        self._wake_next()

    def set_remaining(self, remaining: float) -> None:
        """Make the bucket agree with a server that says only `remaining` is left now."""
        self._leak()
        self._level = max(self._level, self.max_rate - remaining)

    @property
    def level(self) -> float:
        self._leak()
        return self._level


@dataclass(frozen=True, slots=True)
class Reservation:
    """Tokens a request took from a token bucket, and which bucket: settling must go to the same
    one, since a bucket adopted from headers mid-job already counts the requests made before it."""

    tokens: int
    bucket: Bucket | None = None


class Limiter(Protocol):
    """What the runner asks of a limiter, per request: estimate, acquire, then settle or release."""

    def estimate(self, est_prompt_tokens: int, max_tokens: int | None) -> int: ...

    def observe_usage(
        self, est_prompt_tokens: int, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None: ...

    async def acquire(self, tokens: int) -> Reservation: ...

    def settle(self, reservation: Reservation, actual: int | None) -> None: ...

    def release(self, reservation: Reservation) -> None: ...

    def cooldown(self, seconds: float) -> None: ...

    def observe_headers(self, headers: Mapping[str, str]) -> None: ...


class Calibration:
    """Token estimates for the token limit, calibrated from real usage as the job runs."""

    def __init__(self, completion_guess: int = defaults.COMPLETION_TOKENS_GUESS) -> None:
        self._completion_sum = 0
        self._completion_count = 0
        self._completion_guess = completion_guess
        self._prompt_ratio = 1.0

    def estimate(self, est_prompt_tokens: int, max_tokens: int | None) -> int:
        """Tokens to reserve for a request: calibrated prompt estimate + expected completion."""
        prompt = int(est_prompt_tokens * self._prompt_ratio) + 1
        if self._completion_count >= 5:
            expected = int(self._completion_sum / self._completion_count * 1.2) + 1
        else:
            expected = self._completion_guess
        if max_tokens is not None:
            expected = min(expected, max_tokens)
        return prompt + expected

    def observe_usage(self, est_prompt_tokens: int, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """Calibrate estimates from a real `usage`."""
        if completion_tokens is not None:
            self._completion_sum += completion_tokens
            self._completion_count += 1
        if prompt_tokens and est_prompt_tokens > 0:
            # a slow moving average of real/estimated prompt tokens
            ratio = prompt_tokens / est_prompt_tokens
            self._prompt_ratio += (ratio - self._prompt_ratio) * 0.05


class RateLimits(Calibration):
    """The limits of one job in one process: RPM, TPM, the 429 cool-down and header calibration."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        completion_guess: int = defaults.COMPLETION_TOKENS_GUESS,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(completion_guess)
        self.requests = Bucket(rpm, 60) if rpm else None
        self.tokens = Bucket(tpm, 60) if tpm else None
        self._clock = clock
        self._resume_at = 0.0
        self.cooldowns = 0

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    # -- acquire / settle -------------------------------------------------------------

    async def acquire(self, tokens: int) -> Reservation:
        """Wait for the cool-down and both buckets; return what was reserved."""
        await self.wait_cooldown()
        if self.requests is not None:
            await self.requests.acquire(1)
        bucket = self.tokens
        reserved = 0
        if bucket is not None:
            # aiolimiter refuses amounts above capacity: such a request takes a whole bucket
            reserved = min(tokens, int(bucket.max_rate))
            await bucket.acquire(reserved)
        return Reservation(reserved, bucket)

    def settle(self, reservation: Reservation, actual: int | None) -> None:
        """Correct the token bucket once the real total is known."""
        if reservation.bucket is not None and reservation.bucket is self.tokens and actual is not None:
            reservation.bucket.adjust(actual - reservation.tokens)

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation for a request the server refused without charging (a 429)."""
        if reservation.bucket is not None and reservation.bucket is self.tokens and reservation.tokens:
            reservation.bucket.adjust(-reservation.tokens)

    # -- cool-down ----------------------------------------------------------------------

    def cooldown(self, seconds: float) -> None:
        """Pause every worker for `seconds` from now (extends, never shortens, a pause)."""
        resume = self._now() + max(0.0, seconds)
        if resume > self._resume_at:
            self._resume_at = resume
            self.cooldowns += 1

    @property
    def cooling_down(self) -> bool:
        return self._resume_at > self._now()

    async def wait_cooldown(self) -> None:
        while (delay := self._resume_at - self._now()) > 0:
            await asyncio.sleep(delay)

    # -- headers --------------------------------------------------------------------------

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Tighten the limits from `x-ratelimit-*` headers; adopt a bucket the job was not told about."""
        for said in read_limit_headers(headers):
            bucket = getattr(self, said.kind)
            if said.limit is not None and (bucket is None or said.limit < bucket.max_rate):
                bucket = Bucket(said.limit, 60)
                setattr(self, said.kind, bucket)
            if bucket is not None and said.remaining is not None:
                bucket.set_remaining(said.remaining)
            if said.remaining == 0 and bucket is None and said.reset_s:
                # no limit to pace by: pause briefly. The reset header tells when the bucket is
                # *full* again, far later than when the next request may go, so it only caps the pause.
                self.cooldown(min(said.reset_s, 1.0))
