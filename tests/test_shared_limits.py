"""The shared limit's arithmetic (the Ray actor holds a Ledger) and the runner's side of it, without Ray."""

from __future__ import annotations

import asyncio

import pytest

from batchhub.shared_limits import Ledger, LedgerBackend, SharedLimits, limiter_name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_go_at_the_rate_after_one_burst() -> None:
    clock = Clock()
    ledger = Ledger(rpm=600, tpm=None, burst_s=1.0, clock=clock)  # 10/s, a burst of 10
    waits = [ledger.reserve(1, 0) for _ in range(30)]
    assert waits[:10] == [0.0] * 10
    # then one every 0.1 s: the 11th goes at 0.1 s, the 30th at 2.0 s
    assert waits[10:] == pytest.approx([0.1 * k for k in range(1, 21)])


def test_many_callers_together_never_pass_the_limit_in_any_window() -> None:
    clock = Clock()
    ledger = Ledger(rpm=570, tpm=None, burst_s=1.0, clock=clock)
    starts = []
    for step in range(2000):  # four callers asking as fast as they like, time moving on
        clock.now = 1000.0 + step * 0.01
        for _ in range(4):
            starts.append(clock.now + ledger.reserve(1, 0))
    starts.sort()
    window_limit = 570 * 10 / 60 + 570 / 60  # ten seconds of the rate plus the burst
    for i, t in enumerate(starts):
        j = i
        while j < len(starts) and starts[j] < t + 10:
            j += 1
        assert j - i <= window_limit + 1e-6


@pytest.mark.parametrize(
    ("reserve", "settle_to", "next_wait"),
    [
        (600, 100, 0.0),  # an over-estimate is given back: room for the next
        (100, 1100, 1.0),  # an under-estimate is a debt: 1,100 used + 900 asked is a second over the burst
        (600, 0, 0.0),  # a refused request (429) gives its reservation back
    ],
)
def test_settle_corrects_the_token_bucket(reserve: int, settle_to: int, next_wait: float) -> None:
    clock = Clock()
    ledger = Ledger(rpm=None, tpm=60_000, burst_s=1.0, clock=clock)  # 1,000 tokens/s, burst 1,000
    assert ledger.reserve(1, reserve) == 0.0
    ledger.settle(reserve, settle_to)
    assert ledger.reserve(1, 900) == pytest.approx(next_wait)


def test_an_oversized_request_goes_alone_and_the_next_waits_out_its_debt() -> None:
    clock = Clock()
    ledger = Ledger(rpm=None, tpm=600, burst_s=1.0, clock=clock)  # 10 tokens/s
    assert ledger.reserve(1, 50) == 0.0
    assert ledger.reserve(1, 5) == pytest.approx(4.5)


def test_a_pause_holds_everyone_then_resumes_at_the_rate_without_a_burst() -> None:
    clock = Clock()
    ledger = Ledger(rpm=600, tpm=None, burst_s=1.0, clock=clock)
    ledger.pause(5.0)
    assert ledger.reserve(1, 0) == pytest.approx(5.1)
    assert ledger.reserve(1, 0) == pytest.approx(5.2)
    ledger.pause(1.0)  # a shorter pause does not shorten the longer one
    assert ledger.pauses == 1


def test_a_pause_without_limits_still_holds_everyone() -> None:
    clock = Clock()
    ledger = Ledger(rpm=None, tpm=None, clock=clock)
    assert ledger.reserve(1, 100) == 0.0
    ledger.pause(2.0)
    clock.now += 0.5
    assert ledger.reserve(1, 100) == pytest.approx(1.5)


def test_tighten_adopts_a_lower_limit_and_ignores_a_higher_one() -> None:
    ledger = Ledger(rpm=600, tpm=None, clock=Clock())
    ledger.tighten("requests", 900)
    ledger.tighten("tokens", 40_000)  # no token limit known yet: adopted
    assert ledger.snapshot()["rpm"] == 600 and ledger.snapshot()["tpm"] == 40_000
    ledger.tighten("requests", 300)
    assert ledger.snapshot()["rpm"] == 300


def test_configure_keeps_what_is_owed() -> None:
    clock = Clock()
    ledger = Ledger(rpm=600, tpm=None, burst_s=1.0, clock=clock)
    for _ in range(20):
        ledger.reserve(1, 0)  # 10 over the burst: a second of debt at 10/s
    ledger.configure(rpm=1200, tpm=None, burst_s=1.0)  # the same second of debt, at 20/s
    assert ledger.reserve(1, 0) == pytest.approx(1.0, abs=0.06)


def test_the_limiter_name_is_a_hash_never_the_key() -> None:
    key = "sk-live-abcdefghijklmnopqrstuvwxyz"
    name = limiter_name("https://api.example.com/v1", key)
    assert key not in name and "abcdefgh" not in name
    assert name == limiter_name("https://api.example.com/v1", key)
    assert name != limiter_name("https://api.example.com/v1", key + "x")
    assert name != limiter_name("https://other.example.com/v1", key)


async def test_shared_limits_wait_what_the_ledger_says() -> None:
    ledger = Ledger(rpm=1200, tpm=None, burst_s=1.0)  # 20/s, a burst of 20
    limits = SharedLimits(LedgerBackend(ledger), rpm=1200)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(limits.acquire(10) for _ in range(24)))
    assert 0.15 <= loop.time() - start < 1.0  # the last 4 waited 0.05 .. 0.2 s
    assert ledger.reservations == 24


async def test_shared_limits_pass_on_settlements_pauses_and_lower_header_limits() -> None:
    ledger = Ledger(rpm=None, tpm=60_000, burst_s=1.0)
    limits = SharedLimits(LedgerBackend(ledger), tpm=60_000)
    reservation = await limits.acquire(900)
    limits.settle(reservation, 100)  # 800 given back
    assert ledger.reserve(1, 900) == 0.0
    limits.observe_headers({"x-ratelimit-limit-tokens": "30000", "x-ratelimit-limit-requests": "100"})
    assert ledger.snapshot()["tpm"] == 30_000 and ledger.snapshot()["rpm"] == 100
    limits.cooldown(0.2)
    assert ledger.pauses == 1
    loop = asyncio.get_running_loop()
    start = loop.time()
    await limits.acquire(1)
    assert loop.time() - start >= 0.19


async def test_shared_limits_tell_each_caller_its_turn_on_one_clock() -> None:
    """The wall-clock test above, counted: 20 go at once, the last 4 wait 0.05 .. 0.2 s."""
    clock = Clock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    ledger = Ledger(rpm=1200, tpm=None, burst_s=1.0, clock=clock)  # 20/s, a burst of 20
    limits = SharedLimits(LedgerBackend(ledger), rpm=1200, clock=clock, sleep=sleep)
    await asyncio.gather(*(limits.acquire(10) for _ in range(24)))
    assert slept == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert limits.waited_s == pytest.approx(0.5) and ledger.reservations == 24
    limits.cooldown(3.0)  # a 429 seen here waits before the ledger is asked
    await limits.acquire(1)
    assert slept[4] == pytest.approx(3.0) and ledger.pauses == 1
