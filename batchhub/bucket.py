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
    retuned(limit, burst_s, now)      the same bucket at another limit, keeping what is owed
"""

from __future__ import annotations

from dataclasses import dataclass

#: seconds of a limit a local limiter may send at once (aiolimiter's `time_period`: a minute)
MINUTE = 60.0


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
        """Seconds until `amount` more fits under the capacity (0: it fits now); charges nothing."""
        return max(0.0, (self.level_at(now) + amount - self.capacity) / self.rate)

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

    def retuned(self, limit: int, burst_s: float, now: float) -> Bucket:
        """A bucket of another limit that owes the same seconds as this one does."""
        fresh = Bucket.per_minute(limit, burst_s, now)
        fresh.level = self.level_at(now) / self.rate * fresh.rate
        return fresh
