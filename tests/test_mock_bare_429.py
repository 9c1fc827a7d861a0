"""The simulator's bare 429s (no Retry-After, no x-ratelimit-*) and its RPM limit that changes mid-run."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from test_mock_server import FakeClock

from batchhub.cli import main
from batchhub.mock import MockConfig, MockServer
from batchhub.mock.ratelimit import RateLimits

AUTH = {"Authorization": "Bearer sk-test"}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def admitted(limits: RateLimits, clock: FakeClock, seconds: float, step: float = 0.01) -> int:
    """Requests admitted when one is tried every `step` seconds for `seconds`."""
    count, start = 0, clock.now
    for i in range(1, round(seconds / step) + 1):
        clock.now = start + i * step
        count += limits.try_acquire(1) is None
    return count


def test_the_rpm_schedule_lowers_then_raises_the_limit() -> None:
    clock = FakeClock()
    limits = RateLimits(1200, None, clock, rpm_schedule=[(10.0, 600), (20.0, 2400)])
    # the bucket starts full (1,200) and refills 20/s: tried 100 times a second, all 1,000 go, 400 left
    assert admitted(limits, clock, 9.99) == 999
    assert limits.headers()["x-ratelimit-limit-requests"] == "1200"
    # lowered to 600 a minute at 10 s: the 400 left fit its capacity, then 10/s
    assert admitted(limits, clock, 10.0) == pytest.approx(400 + 100, abs=2)
    assert limits.headers()["x-ratelimit-limit-requests"] == "600"
    assert admitted(limits, clock, 10.0) == pytest.approx(400, abs=2)  # raised to 40/s at 20 s, from empty
    assert limits.headers()["x-ratelimit-limit-requests"] == "2400"


def test_a_lowered_limit_holds_no_more_than_its_capacity() -> None:
    clock = FakeClock()
    limits = RateLimits(6000, None, clock, rpm_schedule=[(1.0, 60)])
    clock.now += 1.0
    assert admitted(limits, clock, 0.5, step=0.001) == 60  # a full 6,000 bucket cut to 60: at most 60 at once


def test_a_schedule_without_a_limit_starts_one() -> None:
    clock = FakeClock()
    limits = RateLimits(None, None, clock, rpm_schedule=[(5.0, 60)])
    assert admitted(limits, clock, 5.0) == 500  # unlimited, then a full bucket of 60 at 5 s
    assert admitted(limits, clock, 1.0) == 60  # the 59 left and one more


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("60=600", "list of"),
        ([[60, 600, 1]], "the entry"),
        ([[-1, 600]], "seconds >= 0"),
        ([[float("inf"), 600]], "seconds >= 0"),
        ([[1, 0]], "positive integer"),
        ([[1, 1.5]], "positive integer"),
        ([[1, True]], "positive integer"),
        ([[10, 600], [10, 1200]], "does not come after"),
        ([[10, 600], [5, 1200]], "does not come after"),
    ],
)
def test_a_bad_schedule_is_refused_naming_the_key(schedule: Any, message: str) -> None:
    with pytest.raises(ValueError, match="rpm_schedule") as info:
        MockConfig(rpm_schedule=schedule)
    assert message in str(info.value)


@pytest.mark.parametrize("value", [0, "no", None])
def test_retry_after_must_be_a_boolean(value: Any) -> None:
    with pytest.raises(ValueError, match="mock retry_after must be true or false"):
        MockConfig(retry_after=value)


async def test_a_bare_429_says_nothing_of_when_or_how_much() -> None:
    config = MockConfig(rpm=1, ratelimit_headers=False, retry_after=False, faults={})
    async with MockServer(config) as server, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        async with session.post(url, json=BODY, headers=AUTH) as first:
            assert first.status == 200
        async with session.post(url, json=BODY, headers=AUTH) as refused:
            assert refused.status == 429
            body = await refused.json()
            names = {name.lower() for name in refused.headers}
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert not {"retry-after", "retry-after-ms"} & names
    assert not any(name.startswith("x-ratelimit") for name in names)
    assert server.stats.rate_limited == 1


async def test_an_injected_429_is_bare_too() -> None:
    config = MockConfig(retry_after=False, faults={"429": 1.0})
    async with MockServer(config) as server, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        async with session.post(url, json=BODY, headers=AUTH) as refused:
            assert refused.status == 429
            assert "Retry-After" not in refused.headers and "retry-after-ms" not in refused.headers


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rpm-schedule", "ten=600"], "--rpm-schedule needs SECONDS=RPM"),
        (["--rpm-schedule", "10=600", "--rpm-schedule", "5=1200"], "does not come after"),
        (["--rpm-schedule", "10=-3"], "positive integer"),
    ],
)
def test_mock_server_refuses_a_bad_schedule(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["mock-server", "--port", "0", *args])
    assert result.exit_code == 2
    assert message in result.output
