"""The leaky-bucket arithmetic of both rate limiters, written once.

A bucket holds a `level` that drains at `rate` units a second (`limit` a minute). A
caller may go once the level, its own amount included, is no higher than `capacity`
(the burst). A reservation charges the bucket at once and is told how many seconds to
wait, so the reservations of many callers queue up in time, each waiting one amount's
worth longer than the one before, and nobody polls. The level may run past capacity
(debt): a request that used more tokens than it reserved, a pause, a server saying
that nothing remains.

Every method takes `now`, seconds on one monotonic clock chosen by the caller: the
class holds no clock and never sleeps, so tests drive it with plain numbers.

    reserve(amount, now) -> wait_s    charge `amount`; it may go in wait_s seconds
    wait_for(amount, now) -> wait_s   the same wait, charging nothing
    charge(amount, now)               add a debt (tokens used beyond a reservation)
    give_back(amount, now)            return capacity (an over-estimate, a refused request)
    settle(reserved, actual, now)     one of the two, by the difference
    pause(until, now)                 nothing goes before `until`, then only at the rate
    fill(remaining, now)              a server says only `remaining` is left now
    retuned(other, now)               another bucket that owes the same seconds as this one

`limit_bucket` builds the bucket of one limit given a minute, a second, or both.
"""

from __future__ import annotations

from dataclasses import dataclass

#: the period limits are counted in (requests and tokens per minute)
MINUTE = 60.0
#: the most of a per-second limit that goes at once: one second's worth
SECOND = 1.0
#: a wait shorter than this is float dust (a level drained to 1e-15 over capacity): no wait
DUST_S = 1e-9


@dataclass(slots=True)
class Bucket:
    """A leaky bucket of `limit` units a minute, `capacity` of them at once, that may be overdrawn."""

    limit: int
    capacity: float
    level: float = 0.0
    #: the time `level` was last brought up to date
    updated: float = 0.0

    @classmethod
    def per_minute(cls, limit: int, burst_s: float, now: float) -> Bucket:
        """An empty bucket of `limit` a minute whose burst is `burst_s` seconds of it (at least one unit)."""
        return cls(limit, max(1.0, limit * burst_s / MINUTE), 0.0, now)

    @property
    def rate(self) -> float:
        """Units drained a second."""
        return self.limit / MINUTE

    def level_at(self, now: float) -> float:
        """The level at `now`, drained since the last update (time never runs backwards here)."""
        if now > self.updated:
            self.level = max(0.0, self.level - (now - self.updated) * self.rate)
            self.updated = now
        return self.level

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` more fits under the capacity (0: it fits now), or, when it is
        larger than the capacity, until the bucket is empty; charges nothing."""
        wait = (self.level_at(now) + min(amount, self.capacity) - self.capacity) / self.rate
        return wait if wait > DUST_S else 0.0  # a caller that slept this wait must not be told to sleep again

    def reserve(self, amount: float, now: float) -> float:
        """Charge `amount` now; seconds the caller waits before it goes."""
        wait = self.wait_for(amount, now)
        self.level += amount
        return wait

    def charge(self, amount: float, now: float) -> None:
        """Add `amount` (a debt when it takes the level past capacity); later reservations wait it out."""
        self.level = self.level_at(now) + max(0.0, amount)

    def give_back(self, amount: float, now: float) -> None:
        """Return `amount` of capacity (never below empty)."""
        self.level = max(0.0, self.level_at(now) - max(0.0, amount))

    def settle(self, reserved: float, actual: float, now: float) -> None:
        """Correct a reservation of `reserved` by what was really used."""
        if actual > reserved:
            self.charge(actual - reserved, now)
        else:
            self.give_back(reserved - actual, now)

    def pause(self, until: float, now: float) -> None:
        """Nothing more goes before `until`, and after it only at the rate (no burst)."""
        self.level = max(self.level_at(now), self.capacity + max(0.0, until - now) * self.rate)

    def fill(self, remaining: float, now: float) -> None:
        """Agree with a server that says only `remaining` is left now (never lowers the level)."""
        self.level = max(self.level_at(now), self.capacity - remaining)

    def retuned(self, other: Bucket, now: float) -> Bucket:
        """`other` (another limit or burst), owing the same seconds as this bucket does now."""
        other.level = self.level_at(now) / self.rate * other.rate
        other.updated = now
        return other


def limit_bucket(per_minute: int | None, per_second: int | None, burst_s: float, now: float) -> Bucket | None:
    """The empty bucket of one limit, None when it has none.

    A limit given a minute (`--rpm`) may send `burst_s` seconds of it at once; one given a
    second (`--rps`) is that many times 60 a minute, with a burst of at most a second. Given
    both, both apply: the bucket takes the lower rate and the smaller burst.
    """
    shapes = []
    if per_minute is not None:
        shapes.append((per_minute, burst_s))
    if per_second is not None:
        shapes.append((per_second * 60, min(burst_s, SECOND)))
    if not shapes:
        return None
    bucket = Bucket.per_minute(min(limit for limit, _ in shapes), burst_s, now)
    bucket.capacity = min(Bucket.per_minute(limit, burst, now).capacity for limit, burst in shapes)
    return bucket
