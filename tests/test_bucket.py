"""The one bucket arithmetic of both limiters, as tables over plain times (no clock, no sleep)."""

from __future__ import annotations

import asyncio

import pytest

from batchhub.bucket import Bucket
from batchhub.limits import RateLimits

#: a bucket of 600 a minute (10/s) whose burst is one second's worth (10)
LIMIT, BURST_S = 600, 1.0

# each step: (method, arguments without `now`, now, what it returns (None: nothing), level after)
STEPS = {
    "a burst goes at once, then one every 0.1 s": [
        *[("reserve", (1,), 0.0, 0.0, k + 1) for k in range(10)],
        ("reserve", (1,), 0.0, 0.1, 11),
        ("reserve", (1,), 0.0, 0.2, 12),
    ],
    "the level drains at the rate": [
        ("reserve", (10,), 0.0, 0.0, 10),
        ("reserve", (5,), 0.5, 0.0, 10),  # 5 drained in 0.5 s
        ("wait_for", (1,), 0.5, 0.1, 10),  # asks, charges nothing
        ("wait_for", (1,), 5.0, 0.0, 0),  # empty, never below
    ],
    "an amount past the burst goes alone into an empty bucket, never refused; the next waits out its debt": [
        ("reserve", (50,), 0.0, 0.0, 50),
        ("reserve", (1,), 0.0, 4.1, 51),
        ("reserve", (50,), 10.0, 0.0, 50),  # 51 drained in 5.1 s: empty again
        ("give_back", (45,), 10.0, None, 5),
        ("reserve", (50,), 10.0, 0.5, 55),  # it waits for the bucket to empty, no longer
    ],
    "give_back returns capacity, never below empty": [
        ("reserve", (8,), 0.0, 0.0, 8),
        ("give_back", (3,), 0.0, None, 5),
        ("give_back", (30,), 0.0, None, 0),
    ],
    "charge runs into debt that later reservations wait out": [
        ("charge", (25,), 0.0, None, 25),
        ("reserve", (1,), 0.0, 1.6, 26),
        ("reserve", (1,), 1.0, 0.7, 17),
    ],
    "settle gives back an over-estimate and charges an under-estimate": [
        ("reserve", (6,), 0.0, 0.0, 6),
        ("settle", (6, 2), 0.0, None, 2),
        ("settle", (1, 9), 0.0, None, 10),
    ],
    "pause: nothing before `until`, then one unit's time each, no burst": [
        ("pause", (5.0,), 0.0, None, 60),
        ("reserve", (1,), 0.0, 5.1, 61),
        ("pause", (1.0,), 0.0, None, 61),  # a shorter pause does not shorten it
        ("reserve", (1,), 5.0, 0.2, 12),  # 50 drained in 5 s
    ],
    "fill: a server's `remaining` raises the level, never lowers it": [
        ("fill", (4,), 0.0, None, 6),
        ("fill", (9,), 0.0, None, 6),
        ("fill", (0,), 0.0, None, 10),
        ("reserve", (1,), 0.0, 0.1, 11),
    ],
    "time never runs backwards": [
        ("reserve", (10,), 5.0, 0.0, 10),
        ("wait_for", (1,), 4.0, 0.1, 10),
    ],
}


@pytest.mark.parametrize("steps", STEPS.values(), ids=STEPS.keys())
def test_bucket_arithmetic(steps: list[tuple[str, tuple[float, ...], float, float | None, float]]) -> None:
    bucket = Bucket.per_minute(LIMIT, BURST_S, 0.0)
    for method, args, now, returned, level in steps:
        got = getattr(bucket, method)(*args, now)
        assert got == (pytest.approx(returned) if returned is not None else None), (method, args, now)
        assert bucket.level == pytest.approx(level), (method, args, now)


@pytest.mark.parametrize(
    ("limit", "burst_s", "capacity", "rate"),
    [(600, 1.0, 10, 10), (600, 60.0, 600, 10), (30, 1.0, 1, 0.5), (60_000, 0.5, 500, 1000)],
)
def test_capacity_is_the_burst_and_at_least_one_unit(limit: int, burst_s: float, capacity: float, rate: float) -> None:
    bucket = Bucket.per_minute(limit, burst_s, 0.0)
    assert (bucket.capacity, bucket.rate) == (capacity, rate)


@pytest.mark.parametrize(("new_limit", "level"), [(1200, 40.0), (300, 10.0), (600, 20.0)])
def test_retuned_keeps_the_seconds_owed(new_limit: int, level: float) -> None:
    bucket = Bucket.per_minute(600, 1.0, 0.0)
    bucket.charge(30, 0.0)  # 3 s of the rate
    fresh = bucket.retuned(Bucket.per_minute(new_limit, 1.0, 0.5), 1.0)  # 2 s owed at 1.0
    assert (fresh.limit, fresh.level, fresh.updated) == (new_limit, pytest.approx(level), 1.0)
    assert fresh.level / fresh.rate == pytest.approx(2.0)


class FakeTime:
    """A clock, and a sleep that records how long each caller was told to wait (and moves the clock on)."""

    def __init__(self, *, advance: bool) -> None:
        self.now = 100.0
        self.advance = advance
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.advance:
            self.now += seconds


async def test_the_local_limiter_tells_each_worker_its_turn() -> None:
    time = FakeTime(advance=False)  # workers asking at the same instant
    limits = RateLimits(rpm=300, tpm=None, burst_s=2.0, clock=time.clock, sleep=time.sleep)  # 5/s, a burst of 10
    for _ in range(10):
        await limits.acquire(10)
    assert time.slept == []  # a burst goes at once
    for _ in range(5):
        await limits.acquire(10)
    assert time.slept == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


async def test_a_cancelled_worker_gives_its_turn_back() -> None:
    limits = RateLimits(rpm=60, tpm=6000, burst_s=60.0)  # one request a second, both buckets a minute deep
    loop = asyncio.get_running_loop()
    assert limits.requests is not None and limits.tokens is not None
    limits.requests.fill(0, loop.time())
    waiting = asyncio.ensure_future(limits.acquire(500))
    await asyncio.sleep(0)  # it has reserved and sleeps its turn (a second)
    assert limits.tokens.level == pytest.approx(500, abs=1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert limits.tokens.level == pytest.approx(0, abs=1)
    assert limits.requests.wait_for(1, loop.time()) == pytest.approx(1.0, abs=0.05)


async def test_the_cooldown_is_waited_on_the_given_clock() -> None:
    time = FakeTime(advance=True)
    limits = RateLimits(rpm=None, tpm=None, clock=time.clock, sleep=time.sleep)
    limits.cooldown(3.0)
    await limits.acquire(1)
    assert time.slept == [3.0] and time.now == 103.0
