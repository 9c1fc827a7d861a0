"""The simulated endpoint's rate limits: two token buckets, as OpenAI describes them.

Each limit (requests per minute, tokens per minute) is a bucket holding up to
`limit` units, starting full and refilling continuously at `limit / 60` per
second. A request is admitted only if every bucket holds its cost, and is then
charged to all of them; a refused request is not charged. The clock is passed
in so that tests can move time instead of sleeping.

A provider may enforce a per-minute limit over a shorter window (OpenAI: 60,000
RPM may be enforced as 1,000 per second). `window_s` below 60 does so: the
bucket holds only `window_s` seconds of the limit (at least one unit) and starts
full at that, refilling at the same `limit / 60` a second. A request costing more
than a window's worth (but no more than the minute's limit) is admitted when the
bucket is full, and leaves it in debt. The `x-ratelimit-*` headers still speak of
the minute, as a provider's do: limit, remaining and reset of a minute-deep
bucket charged alongside, so they never tell a client about the shorter window.

An RPM schedule (`[(seconds_from_start, rpm), ...]`) changes the requests limit
mid-run, as a provider changes a key's tier: at each time the requests bucket is
retuned to the new limit (a lower one holds no more than its new capacity, a
higher one refills faster from where it was).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Clock = Callable[[], float]


def format_duration(seconds: float) -> str:
    """OpenAI's `x-ratelimit-reset-*` format: "120ms", "1s", "8.64s", "6m0s", "1h2m3s"."""
    # Work in whole milliseconds, rounded up, so "59.9996s" cannot print as "60s".
    total_ms = max(0, math.ceil(seconds * 1000 - 1e-9))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest_ms = divmod(total_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class TokenBucket:
    """A continuously refilling bucket of `limit` units per minute, `window_s` seconds of them deep."""

    def __init__(self, limit: int, clock: Clock, window_s: float = 60.0) -> None:
        self.limit = limit
        self._rate = limit / 60.0
        self._window_s = window_s
        self.capacity = max(1.0, limit * window_s / 60.0)
        self._level = self.capacity
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self._rate)
        self._updated = now

    @property
    def level(self) -> float:
        """Units available now."""
        self._refill()
        return self._level

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are available: 0 if they are, inf if never."""
        if amount > self.limit:
            return math.inf
        # more than the bucket holds goes when it is full, into debt
        missing = min(amount, self.capacity) - self.level
        # Tolerate float dust from continuous refill: 0.9999999999 of 1 is 1.
        return 0.0 if missing <= 1e-9 else missing / self._rate

    def take(self, amount: float) -> None:
        """Charge `amount` units (the caller has checked they are there)."""
        self._refill()
        self._level -= amount

    def retune(self, limit: int) -> None:
        """The same bucket at another limit: it keeps its level, at most the new capacity."""
        self._refill()
        self.limit = limit
        self._rate = limit / 60.0
        self.capacity = max(1.0, limit * self._window_s / 60.0)
        self._level = min(self._level, self.capacity)

    def time_to_full(self) -> float:
        """Seconds until the bucket is full again (the `x-ratelimit-reset-*` value)."""
        return (self.capacity - self.level) / self._rate


@dataclass(frozen=True)
class Denial:
    """Why a request was refused: which limit, and how long until it would fit."""

    kind: str  # "requests" or "tokens", as in OpenAI's error `type`
    limit: int
    used: int
    requested: int
    #: seconds until the request fits; inf when it never can (larger than the limit)
    wait: float


class RateLimits:
    """The requests and tokens buckets of one endpoint; either may be absent."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        clock: Clock,
        *,
        window_s: float = 60.0,
        rpm_schedule: Sequence[tuple[float, int]] = (),
    ) -> None:
        self._clock = clock
        self._window_s = window_s
        self.requests = TokenBucket(rpm, clock, window_s) if rpm is not None else None
        self.tokens = TokenBucket(tpm, clock, window_s) if tpm is not None else None
        # what the headers and messages tell: the minute, whatever the window enforced
        self._told = {
            kind: self._minute_of(bucket)
            for kind, bucket in (("requests", self.requests), ("tokens", self.tokens))
            if bucket is not None
        }
        self._started = clock()
        #: the changes of the requests limit still to come, soonest first
        self._schedule = sorted(rpm_schedule)

    def _minute_of(self, bucket: TokenBucket) -> TokenBucket:
        """The minute-deep bucket the headers tell of, charged alongside `bucket` when its window is shorter."""
        return TokenBucket(bucket.limit, self._clock) if self._window_s < 60.0 else bucket

    def _follow_schedule(self) -> None:
        """Apply the RPM changes whose time has come (a bucket appears full when there was none)."""
        while self._schedule and self._clock() - self._started >= self._schedule[0][0]:
            _, rpm = self._schedule.pop(0)
            if self.requests is None:
                self.requests = TokenBucket(rpm, self._clock, self._window_s)
                self._told["requests"] = self._minute_of(self.requests)
                continue
            self.requests.retune(rpm)
            if self._told["requests"] is not self.requests:
                self._told["requests"].retune(rpm)

    def try_acquire(self, tokens: int) -> Denial | None:
        """Charge one request costing `tokens` tokens, or say why it is refused.

        When both limits refuse, the one with the longer wait is reported, so
        that its Retry-After is enough for the request to pass.
        """
        self._follow_schedule()
        denials: list[Denial] = []
        for kind, bucket, cost in (("requests", self.requests, 1), ("tokens", self.tokens, tokens)):
            if bucket is None:
                continue
            wait = bucket.wait_for(cost)
            if wait > 0:
                used = round(bucket.limit - self._told[kind].level)
                denials.append(Denial(kind, bucket.limit, used, cost, wait))
        if denials:
            return max(denials, key=lambda d: d.wait)
        for kind, cost in (("requests", 1), ("tokens", tokens)):
            enforced = getattr(self, kind)
            if enforced is not None:
                enforced.take(cost)
                if self._told[kind] is not enforced:
                    self._told[kind].take(cost)
        return None

    def headers(self) -> dict[str, str]:
        """The `x-ratelimit-*` headers describing the buckets now."""
        self._follow_schedule()
        headers: dict[str, str] = {}
        for kind, bucket in self._told.items():
            headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level)))
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.time_to_full())
        return headers
