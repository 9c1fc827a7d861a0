"""Rate limits: token settling, oversized requests, header calibration, the pool-wide cool-down."""

from __future__ import annotations

import asyncio

import pytest

from batchhub import defaults
from batchhub.limits import LimitHeaders, RateLimits, parse_count, parse_duration, read_limit_headers
from batchhub.shared_limits import Ledger, LedgerBackend, SharedLimits


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("2.5", 2.5),
        ("0s", 0.0),
        ("abc", None),
        ("5x", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


async def test_oversized_request_goes_into_an_empty_bucket_instead_of_hanging() -> None:
    limits = RateLimits(rpm=None, tpm=1000)
    reserved = await asyncio.wait_for(limits.acquire(50_000), timeout=1)
    assert reserved.tokens == 50_000  # the whole of it is owed: the next requests wait it out
    assert limits.tokens is not None and limits.tokens.level == pytest.approx(50_000, abs=1)


async def test_settle_gives_back_overestimates_and_charges_debt() -> None:
    limits = RateLimits(rpm=None, tpm=10_000)
    reserved = await limits.acquire(600)
    limits.settle(reserved, 100)
    assert limits.tokens.level == pytest.approx(100, abs=1)
    reserved = await limits.acquire(100)
    limits.settle(reserved, 15_000)  # far more than estimated: the bucket goes into debt
    assert limits.tokens.level > limits.tokens.capacity
    assert limits.tokens.wait_for(1, asyncio.get_running_loop().time()) > 0  # no capacity for even one


async def test_release_returns_reservation_of_refused_request() -> None:
    limits = RateLimits(rpm=None, tpm=10_000)
    reserved = await limits.acquire(500)
    limits.release(reserved)
    assert limits.tokens.level == pytest.approx(0, abs=1)


def test_estimate_calibrates_completion_from_usage() -> None:
    limits = RateLimits(rpm=None, tpm=None, completion_guess=256)
    assert limits.estimate(100, None) == 101 + 256
    assert limits.estimate(100, 20) == 101 + 20  # max_tokens bounds the completion
    for _ in range(10):
        limits.observe_usage(100, 100, 10)
    assert limits.estimate(100, None) == 101 + 13  # 10 tokens on average, plus a 20% margin


def test_prompt_ratio_moves_toward_real_counts() -> None:
    limits = RateLimits(rpm=None, tpm=None)
    before = limits.estimate(100, 1)
    for _ in range(100):
        limits.observe_usage(100, 200, 1)
    assert limits.estimate(100, 1) > before * 1.5


async def test_reservations_made_before_a_bucket_was_adopted_are_not_settled_on_it() -> None:
    limits = RateLimits(rpm=None, tpm=None, clock=lambda: 100.0)
    early = await limits.acquire(500)  # no token bucket yet: nothing reserved
    # 400,000 a minute, a burst of half a second (3,333): the server has 2,333 left of it, so the new
    # bucket already counts 1,000 (that request among them)
    limits.observe_headers({"x-ratelimit-limit-tokens": "400000", "x-ratelimit-remaining-tokens": "2333"})
    assert limits.tokens is not None and limits.tokens.level == pytest.approx(1000, abs=1)
    limits.settle(early, 1000)  # settling it on the new bucket would count it twice
    assert limits.tokens.level == pytest.approx(1000, abs=1)
    late = await limits.acquire(300)
    limits.settle(late, 100)
    assert limits.tokens.level == pytest.approx(1100, abs=1)


async def test_a_request_let_in_before_a_bucket_was_adopted_is_not_settled_on_it() -> None:
    """A request let in by the one ahead of it (in line, woken) returns only when it next runs: a token
    bucket adopted from headers meanwhile reserved nothing for it, so its settling must not go there."""
    now = 100.0
    slept = asyncio.Event()

    async def sleep(_: float) -> None:
        await slept.wait()

    limits = RateLimits(rpm=6000, tpm=None, clock=lambda: now, sleep=sleep)
    assert limits.requests is not None
    limits.requests.level = limits.requests.capacity  # a burst just went: the next waits
    first = asyncio.ensure_future(limits.acquire(500))
    second = asyncio.ensure_future(limits.acquire(500))
    await asyncio.sleep(0)  # the first sleeps its wait, the second waits in line behind it
    now += 1.0
    slept.set()
    await asyncio.sleep(0)  # the first lets itself in, and the second with it, which has not run since
    assert first.done() and not second.done()
    limits.observe_headers({"x-ratelimit-limit-tokens": "400000", "x-ratelimit-remaining-tokens": "2333"})
    assert limits.tokens is not None and limits.tokens.level == pytest.approx(1000, abs=1)
    limits.release(await second)  # a 429: nothing was reserved on the new bucket, nothing goes back to it
    assert limits.tokens.level == pytest.approx(1000, abs=1)


async def test_headers_adopt_and_tighten_limits_with_the_jobs_burst() -> None:
    limits = RateLimits(rpm=None, tpm=100_000, clock=lambda: 100.0)
    limits.observe_headers(
        {
            "x-ratelimit-limit-requests": "6000",
            "x-ratelimit-remaining-requests": "45",
            "x-ratelimit-limit-tokens": "40000",
            "x-ratelimit-remaining-tokens": "40000",
        }
    )
    assert limits.requests is not None and limits.requests.limit == 6000
    # adopted with the job's burst (half a second: 50), not a minute's 6,000: a server enforcing its
    # limit per second would refuse a minute's worth; 45 of the minute left means 5 of the burst used
    assert limits.requests.capacity == pytest.approx(50)
    assert limits.requests.level == pytest.approx(5)
    assert limits.tokens.limit == 40_000  # told 100k, the server says 40k: tighten at once


async def test_a_higher_header_limit_is_followed_only_when_replies_keep_saying_it_and_never_past_a_told_one() -> None:
    limits = RateLimits(rpm=None, tpm=100_000, clock=lambda: 100.0)
    limits.observe_headers({"x-ratelimit-limit-tokens": "40000", "x-ratelimit-limit-requests": "600"})
    assert (limits.tokens.limit, limits.requests.limit) == (40_000, 600)
    # rows of two models: the other model's larger limit, then this one's again, never loosens it
    for _ in range(3 * defaults.HEADER_RAISE_REPLIES):
        limits.observe_headers({"x-ratelimit-limit-requests": "5000"})
        limits.observe_headers({"x-ratelimit-limit-requests": "600"})
    assert limits.requests.limit == 600
    # the server raised the key's limits: every reply says so, and the job follows (the lowest said)
    for k in range(defaults.HEADER_RAISE_REPLIES):
        assert limits.requests.limit == 600
        limits.observe_headers({"x-ratelimit-limit-requests": str(1200 + k), "x-ratelimit-limit-tokens": "900000"})
    assert limits.requests.limit == 1200
    assert limits.tokens.limit == 100_000  # up to what the job was told, not past it


async def test_a_new_header_limit_lets_the_line_in_only_as_far_as_its_remaining_allows() -> None:
    """A reply says a new limit and that nothing of it remains: the requests waiting in line stay there
    (the new bucket is filled from `remaining` before anyone is let in by it)."""
    now = 100.0

    async def sleep(_: float) -> None:
        await asyncio.Event().wait()  # the clock does not move: only a header lets anyone in

    limits = RateLimits(rpm=None, tpm=None, clock=lambda: now, sleep=sleep)
    limits.observe_headers({"x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "0"})
    waiting = [asyncio.ensure_future(limits.acquire(0)) for _ in range(10)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    limits.observe_headers({"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "0"})
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_lower_header_limit_keeps_what_the_bucket_owes() -> None:
    """Told 600 a minute, a burst just sent, requests waiting: a reply says 300 (and nothing of what
    remains). The new bucket owes the same seconds as the old one, so nobody goes at once."""
    now = 100.0

    async def sleep(_: float) -> None:
        await asyncio.Event().wait()  # the clock does not move: only a header could let anyone in

    limits = RateLimits(rpm=600, tpm=None, clock=lambda: now, sleep=sleep)
    assert limits.requests is not None
    limits.requests.level = limits.requests.capacity  # a burst just went
    waiting = [asyncio.ensure_future(limits.acquire(0)) for _ in range(10)]
    await asyncio.sleep(0)
    limits.observe_headers({"x-ratelimit-limit-requests": "300"})
    await asyncio.sleep(0)
    assert limits.requests.limit == 300
    assert not any(task.done() for task in waiting)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_zero_remaining_without_a_limit_pauses_briefly() -> None:
    now = [100.0]
    limits = RateLimits(rpm=None, tpm=None, clock=lambda: now[0])
    limits.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"})
    assert limits.cooling_down
    now[0] = 101.01  # not the six minutes until the bucket is full again: one request's worth at most
    assert not limits.cooling_down


async def test_zero_remaining_with_a_limit_is_paced_by_the_bucket() -> None:
    limits = RateLimits(rpm=None, tpm=None)
    limits.observe_headers(
        {
            "x-ratelimit-limit-requests": "120",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1m0s",
        }
    )
    assert not limits.cooling_down
    assert limits.requests is not None and limits.requests.wait_for(1, asyncio.get_running_loop().time()) > 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    await limits.acquire(1)  # one request refills in 0.5 s at 120/min
    assert 0.3 < loop.time() - start < 1.5


async def test_cooldown_extends_never_shortens() -> None:
    now = [0.0]
    limits = RateLimits(rpm=None, tpm=None, clock=lambda: now[0])
    limits.cooldown(10)
    limits.cooldown(2)
    now[0] = 5
    assert limits.cooling_down
    assert limits.cooldowns == 1


async def test_workers_wait_for_the_cooldown_together() -> None:
    limits = RateLimits(rpm=None, tpm=None)
    loop = asyncio.get_running_loop()
    limits.cooldown(0.05)
    start = loop.time()
    await asyncio.gather(*(limits.acquire(1) for _ in range(5)))
    assert loop.time() - start >= 0.045


# -- x-ratelimit-* headers a server may send: any value, parsed once for both limiters ------------

#: (header value, the count it gives): anything not a finite whole number of a sane size is ignored
COUNTS = [
    ("100", 100),
    (" 100 ", 100),
    ("0", 0),
    ("99.9", 99),
    ("1e3", 1000),
    ("inf", None),
    ("-inf", None),
    ("Infinity", None),
    ("1e400", None),
    ("nan", None),
    ("-5", None),
    ("-0.5", None),
    ("1e300", None),
    ("123456789012345678901234567890", None),
    ("abc", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("value", "count"), COUNTS)
def test_parse_count(value: str | None, count: int | None) -> None:
    assert parse_count(value) == count


@pytest.mark.parametrize("value", ["inf", "-inf", "1e400", "nan", "-5", "1e300", "abc", "NaN"])
@pytest.mark.parametrize("header", ["limit", "remaining", "reset"])
async def test_unusable_header_values_are_ignored_by_both_limiters(header: str, value: str) -> None:
    """An `inf` limit once crashed the job with OverflowError after a paid reply, on every resume."""
    headers = {f"x-ratelimit-{header}-{kind}": value for kind in ("requests", "tokens")}
    if header == "reset":
        headers |= {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0"}
    now = [100.0]
    local = RateLimits(rpm=600, tpm=None, clock=lambda: now[0])
    local.observe_headers(headers)
    assert local.requests is not None and local.requests.limit == 600
    if header != "reset":
        assert local.requests.level == 0 and local.tokens is None
    ledger = Ledger(rpm=600, tpm=None)
    shared = SharedLimits(LedgerBackend(ledger), rpm=600)
    shared.observe_headers(headers)
    assert ledger.snapshot()["rpm"] == 600 and ledger.snapshot()["tpm"] is None
    assert ledger.pauses == 0 or header == "reset"


@pytest.mark.parametrize(
    ("text", "seconds"), [("inf", None), ("1e400", None), ("nan", None), ("-5", None), ("-1s", None), ("1e400s", None)]
)
def test_parse_duration_refuses_unusable_values(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_both_limiters_read_headers_through_one_function() -> None:
    got = read_limit_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "inf",
            "x-ratelimit-limit-tokens": "1e400",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert got == [LimitHeaders("requests", 60, None, None), LimitHeaders("tokens", None, 0, 360.0)]
