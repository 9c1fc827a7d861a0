"""The one bucket arithmetic of both limiters, as tables over plain times (no clock, no sleep)."""

from __future__ import annotations

import asyncio
import heapq
from typing import Any

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


async def test_the_local_limiter_lets_workers_go_in_turn() -> None:
    time = FakeTime(advance=True)
    limits = RateLimits(rpm=300, tpm=None, burst_s=2.0, clock=time.clock, sleep=time.sleep)  # 5/s, a burst of 10
    await asyncio.gather(*(limits.acquire(10) for _ in range(10)))
    assert time.slept == []  # a burst goes at once
    sent = []

    async def worker() -> None:
        await limits.acquire(10)
        sent.append(time.now)

    await asyncio.gather(*(worker() for _ in range(5)))
    assert sent == pytest.approx([100.2, 100.4, 100.6, 100.8, 101.0])  # one at a time, in order


class VirtualTime:
    """A clock for many tasks at once: `sleep` waits until `run` moves the clock to its wake-up time."""

    def __init__(self) -> None:
        self.now = 100.0
        self._wakes: list[tuple[float, int, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._wakes, (self.now + max(0.0, seconds), len(self._wakes) + id(future), future))
        await future

    async def run(self, *coros: Any) -> None:
        tasks = [asyncio.ensure_future(c) for c in coros]
        while not all(t.done() for t in tasks):
            for _ in range(20):  # let every task that can run, run
                await asyncio.sleep(0)
            if self._wakes:
                self.now, _, future = heapq.heappop(self._wakes)
                future.set_result(None)
        for t in tasks:
            t.result()


async def test_over_estimates_given_back_while_others_wait_never_let_more_than_a_burst_out() -> None:
    """Turns booked ahead kept their times while what settle() gave back let later ones in among them:
    against a server enforcing per second, a job told its TPM met 20-25% 429s."""
    time = VirtualTime()
    limits = RateLimits(rpm=None, tpm=600, burst_s=1.0, clock=time.clock, sleep=time.sleep)  # 10/s, 10 at once
    sent: list[float] = []

    async def worker(requests: int) -> None:
        for i in range(requests):
            # each uses 4; its first reservation is the guess before calibration (10), the rest 4
            reservation = await limits.acquire(10 if i == 0 else 4)
            sent.append(time.now)
            await time.sleep(0.5)  # the reply
            limits.settle(reservation, 4)

    await time.run(*(worker(10) for _ in range(8)))
    sent.sort()
    # what the server counts: 4 a request; it holds 10 at once and refills 10 a second
    most = max(sum(1 for s in sent if t <= s < t + 1.0) for t in sent)
    assert most * 4 <= 10 + 10 * 1.0 + 4, (most, sent)  # a burst and a second's rate (and one request of dust)
    assert len(sent) * 4 / (sent[-1] - sent[0]) >= 0.9 * 10  # and what was given back was used


async def test_a_cancelled_worker_takes_nothing_and_passes_its_turn_on() -> None:
    limits = RateLimits(rpm=60, tpm=6000, burst_s=60.0)  # one request a second, both buckets a minute deep
    loop = asyncio.get_running_loop()
    assert limits.requests is not None and limits.tokens is not None
    limits.requests.fill(0, loop.time())
    waiting = asyncio.ensure_future(limits.acquire(500))
    await asyncio.sleep(0)  # it waits its turn (a second) and has taken nothing yet
    assert limits.tokens.level == pytest.approx(0, abs=1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert limits.tokens.level == pytest.approx(0, abs=1)
    assert limits.requests.wait_for(1, loop.time()) == pytest.approx(1.0, abs=0.05)
    limits.requests.give_back(60, loop.time())
    await asyncio.wait_for(limits.acquire(500), timeout=1)  # the turn passed on: the next is not held up


async def test_the_cooldown_is_waited_on_the_given_clock() -> None:
    time = FakeTime(advance=True)
    limits = RateLimits(rpm=None, tpm=None, clock=time.clock, sleep=time.sleep)
    limits.cooldown(3.0)
    await limits.acquire(1)
    assert time.slept == [3.0] and time.now == 103.0
