"""One rate limit shared by many processes: the limit of an API key, not of a machine.

A provider limits a key, so every task of a job on a cluster must draw from one
limit. `Ledger` is the arithmetic of that limit, kept in one place (on Ray, a
named actor: see `batchhub.ray_engine`); it never blocks. A caller asks for a
reservation and is told how long to wait before it may send; it sleeps on its
own event loop, so the ledger answers thousands of callers a second.

    reserve(requests, est_tokens) -> wait_s   charge the buckets now, go in wait_s seconds
    settle(est_tokens, actual_tokens)         correct the token bucket once usage is known
    rate_limited(retry_after)                 a 429: pause until Retry-After, or learn from a bare one
    pause(seconds)                            nobody sends for `seconds`, then at the rate
    tighten(kind, limit)                      a server's x-ratelimit-limit-* is lower than ours

Each bucket is a `batchhub.bucket.Bucket` (the arithmetic the local limiter uses
too), whose burst is `burst_s` seconds of its limit: a reservation adds its amount
to the level, and may go when the level has drained back to the burst. The waits
of successive reservations so grow by one unit's time each, and the callers,
together, send at the limit's rate after at most one burst. A bare 429 teaches the
ledger's `batchhub.learned_rate.LearnedRate` (the tasks share one limit, so they learn
it together: the ledger counts every task's reservations and 429s), whose limit paces
reservations with a bucket of its own, as in the single-process limiter.

`SharedLimits` is the runner's side (`batchhub.limits.Limiter`): it estimates
tokens locally (as the single-process limiter does) and asks a `LimitBackend`
for reservations.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from batchhub import defaults
from batchhub.bucket import Bucket, limit_bucket
from batchhub.learned_rate import LearnedRate
from batchhub.limits import Calibration, Reservation, read_limit_headers


class Ledger:
    """The reservations of one shared limit: requests and tokens per minute, and a pause."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        *,
        rps: int | None = None,
        burst_s: float = defaults.BURST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._paused_until = 0.0
        self.requests: Bucket | None = None
        self.tokens: Bucket | None = None
        self.reservations = 0
        self.pauses = 0
        #: the requests limit learned from bare 429s (and the bucket that paces by it)
        self.learned = LearnedRate()
        self.configure(rpm, tpm, rps, burst_s)

    def configure(
        self, rpm: int | None, tpm: int | None, rps: int | None = None, burst_s: float = defaults.BURST_S
    ) -> None:
        """Set the limits and the burst (the job started last decides); a bucket of the same shape keeps its level."""
        self._rps, self._burst_s = rps, burst_s
        now = self._clock()
        for kind, fresh in (
            ("requests", limit_bucket(rpm, rps, burst_s, now)),
            ("tokens", limit_bucket(tpm, None, burst_s, now)),
        ):
            current: Bucket | None = getattr(self, kind)
            if fresh is None or current is None:
                setattr(self, kind, fresh)
            elif (current.limit, current.capacity) != (fresh.limit, fresh.capacity):
                setattr(self, kind, current.retuned(fresh, now))  # keep what is owed, in seconds of the new rate

    def reserve(self, requests: int, tokens: int) -> float:
        """Charge one reservation; seconds the caller waits before sending."""
        now = self._clock()
        self.reservations += 1
        wait = max(0.0, self._paused_until - now)
        if self.requests is not None and requests:
            wait = max(wait, self.requests.reserve(requests, now))
        learned = self._learned_at(now) if requests else None
        if learned is not None:
            wait = max(wait, learned.reserve(requests, now))
        if self.tokens is not None and tokens:
            wait = max(wait, self.tokens.reserve(tokens, now))
        for _ in range(requests):
            self.learned.sent(now + wait)
        return wait

    def rate_limited(self, retry_after: float | None) -> None:
        """A 429 one of the tasks met: pause until its Retry-After, or learn from a bare one."""
        now = self._clock()
        if self.learned.refused(now, self._ceiling(), learn=not retry_after):
            learned = self._learned_at(now)
            if learned is not None:
                learned.pause(now, now)  # cut: no burst at the new rate
        if retry_after:
            self.pause(retry_after)

    def _learned_at(self, now: float) -> Bucket | None:
        return self.learned.bucket(now, self._ceiling(), self._burst_s)

    def _ceiling(self) -> int | None:
        return self.requests.limit if self.requests is not None else None

    def settle(self, est_tokens: int, actual_tokens: int) -> None:
        """Correct the token bucket by what a request really used (0 for a refused one)."""
        if self.tokens is not None:
            self.tokens.settle(est_tokens, actual_tokens, self._clock())

    def pause(self, seconds: float) -> None:
        """Nobody sends for `seconds` from now (extends, never shortens, a pause)."""
        now = self._clock()
        seconds = max(0.0, seconds)
        if now + seconds > self._paused_until:
            self._paused_until = now + seconds
            self.pauses += 1
        for bucket in (self.requests, self.tokens, self.learned.paced):
            if bucket is not None:
                bucket.pause(now + seconds, now)

    def tighten(self, kind: str, limit: int) -> None:
        """Adopt a server's lower (or first known) limit for "requests" or "tokens"."""
        if kind not in ("requests", "tokens") or limit < 1:
            return
        current: Bucket | None = getattr(self, kind)
        if current is None or limit < current.limit:
            rpm = limit if kind == "requests" else (self.requests.limit if self.requests else None)
            tpm = limit if kind == "tokens" else (self.tokens.limit if self.tokens else None)
            self.configure(rpm, tpm, self._rps, self._burst_s)

    def snapshot(self) -> dict[str, Any]:
        """The limits and counters, for status and tests."""
        learned = self.learned.rpm(self._clock(), self._ceiling())
        return {
            "rpm": self.requests.limit if self.requests else None,
            "tpm": self.tokens.limit if self.tokens else None,
            "learned_rpm": round(learned) if learned is not None else None,
            "burst_s": self._burst_s,
            "reservations": self.reservations,
            "pauses": self.pauses,
            "cuts": self.learned.cuts,
        }


def limiter_name(base_url: str, api_key: str) -> str:
    """The shared limiter's name: a hash of the endpoint and the key, never the key itself."""
    digest = hashlib.sha256(f"batchhub-limit\n{base_url}\n{api_key}".encode()).hexdigest()
    return f"batchhub-limit-{digest[:32]}"


class LimitBackend(Protocol):
    """Where a `SharedLimits` gets its reservations from (a Ray actor, or a `Ledger` in this process)."""

    def reserve(self, requests: int, tokens: int) -> Awaitable[float]: ...

    def settle(self, est_tokens: int, actual_tokens: int) -> None: ...

    def rate_limited(self, retry_after: float | None) -> None: ...

    def pause(self, seconds: float) -> None: ...

    def tighten(self, kind: str, limit: int) -> None: ...


class LedgerBackend:
    """A `Ledger` in this process as a backend (one process, or tests)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def reserve(self, requests: int, tokens: int) -> float:
        return self.ledger.reserve(requests, tokens)

    def settle(self, est_tokens: int, actual_tokens: int) -> None:
        self.ledger.settle(est_tokens, actual_tokens)

    def rate_limited(self, retry_after: float | None) -> None:
        self.ledger.rate_limited(retry_after)

    def pause(self, seconds: float) -> None:
        self.ledger.pause(seconds)

    def tighten(self, kind: str, limit: int) -> None:
        self.ledger.tighten(kind, limit)


class SharedLimits(Calibration):
    """A `Limiter` whose buckets live in a shared ledger; estimates are calibrated locally."""

    def __init__(
        self,
        backend: LimitBackend,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        rps: int | None = None,
        completion_guess: int = defaults.COMPLETION_TOKENS_GUESS,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(completion_guess)
        self._backend = backend
        self._clock = clock
        self._sleep = sleep
        #: the limits as this process knows them, so a header is passed on only when it says more
        requests = limit_bucket(rpm, rps, defaults.BURST_S, 0.0)
        self._known = {"requests": requests.limit if requests else None, "tokens": tpm}
        self._resume_at = 0.0
        self.waited_s = 0.0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def acquire(self, tokens: int) -> Reservation:
        if (delay := self._resume_at - self._now()) > 0:
            await self._sleep(delay)  # a 429 this process saw, before the ledger has heard of it
        wait = await self._backend.reserve(1, tokens)
        if wait > 0:
            self.waited_s += wait
            await self._sleep(wait)
        return Reservation(tokens)

    def settle(self, reservation: Reservation, actual: int | None) -> None:
        if actual is not None and actual != reservation.tokens:
            self._backend.settle(reservation.tokens, actual)

    def release(self, reservation: Reservation) -> None:
        if reservation.tokens:
            self._backend.settle(reservation.tokens, 0)

    def rate_limited(self, retry_after: float | None) -> None:
        if retry_after:  # this process waits at once, before the ledger has heard of it
            self._resume_at = max(self._resume_at, self._now() + retry_after)
        self._backend.rate_limited(retry_after)

    def cooldown(self, seconds: float) -> None:
        self._resume_at = max(self._resume_at, self._now() + max(0.0, seconds))
        self._backend.pause(seconds)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        for said in read_limit_headers(headers):
            known = self._known[said.kind]
            if said.limit is not None and (known is None or said.limit < known):
                self._known[said.kind] = said.limit
                self._backend.tighten(said.kind, said.limit)
            if said.remaining == 0 and self._known[said.kind] is None and said.reset_s:
                self.cooldown(min(said.reset_s, 1.0))
