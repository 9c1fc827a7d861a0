"""Bursts: a job sends at most `burst` seconds of a limit at once, then paces (issue 13, item 1).

A provider may enforce its per-minute limit per second (the simulator's `limit_window_s = 1`):
a job that sends a minute's worth at once meets a 429 storm there.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_prompts
from test_bucket import FakeTime

import batchhub
from batchhub import arun_job, defaults
from batchhub.bucket import Bucket
from batchhub.errors import UsageError
from batchhub.limits import RateLimits
from batchhub.shared_limits import Ledger
from batchhub.spec import JobSpec


class Opening:
    """A local limiter on a fake clock that moves as its callers sleep: when each request goes."""

    def __init__(self, **limits: object) -> None:
        self.time = FakeTime(advance=True)
        self.limits = RateLimits(clock=self.time.clock, sleep=self.time.sleep, **limits)  # type: ignore[arg-type]

    async def waits(self, n: int, tokens: int = 1) -> list[float]:
        """Seconds from now until each of `n` more requests of `tokens`, asked for at once, goes (0: at once)."""
        start, sent = self.time.now, []

        async def one() -> None:
            await self.limits.acquire(tokens)
            sent.append(self.time.now - start)

        await asyncio.gather(*(one() for _ in range(n)))
        return sent


async def test_the_opening_of_a_job_is_one_burst_then_the_rate() -> None:
    waits = await Opening(rpm=600, tpm=None).waits(100)  # 10 a second
    at_once = sum(1 for w in waits if w == 0)
    assert at_once <= 10 * defaults.BURST_S + 1  # one burst (a minute's worth, 100 here, before)
    assert max(waits) == pytest.approx((100 - at_once) / 10, abs=0.05)  # the rest at the rate


@pytest.mark.parametrize(
    ("rpm", "rps", "burst", "at_once", "rate"),
    [
        (600, None, 1.0, 10, 10),
        (600, None, 3.0, 30, 10),
        (600, None, 0.1, 1, 10),
        (None, 5, 1.0, 5, 5),
        (None, 5, 10.0, 5, 5),  # --rps: a burst of at most a second
        (None, 5, 0.4, 2, 5),
        (600, 5, 3.0, 5, 5),  # both: the lower rate and the smaller burst
        (120, 5, 3.0, 5, 2),
        (6000, 5, 3.0, 5, 5),
    ],
)
async def test_rpm_rps_and_burst_shape_the_requests_bucket(
    rpm: int | None, rps: int | None, burst: float, at_once: int, rate: float
) -> None:
    waits = await Opening(rpm=rpm, tpm=None, rps=rps, burst_s=burst).waits(40)
    assert sum(1 for w in waits if w == 0) == at_once
    assert waits[-1] - waits[-2] == pytest.approx(1 / rate)


async def test_a_request_larger_than_a_burst_of_tokens_goes_alone_and_its_debt_is_waited_out() -> None:
    """A server enforcing per second admits it when its bucket is full and is then owed the rest:
    the next request must wait for all of it, not for the burst's worth alone."""
    opening = Opening(rpm=None, tpm=600, burst_s=1.0)  # 10 tokens a second, 10 at once
    assert await opening.waits(1, tokens=50) == [0.0]  # it never waits for more than an empty bucket
    waits = await opening.waits(1, tokens=5)
    assert waits == [pytest.approx(4.5)]  # 40 owed past the burst, then its own 5


def spec(tmp_path: Path, base_url: str, rows: Path, **settings: object) -> JobSpec:
    return JobSpec(
        input=rows,
        job_dir=tmp_path / "job",
        base_url=base_url,
        model="m",
        api_key="k",
        quiet=True,
        backoff_base=0.01,
        **settings,  # type: ignore[arg-type]
    )


async def test_a_job_told_the_limit_meets_no_429_storm_where_it_is_enforced_per_second(
    tmp_path: Path, mock_server
) -> None:
    server = await mock_server(rpm=6000, limit_window_s=1, latency_ms=5)  # 100 a second, 100 at once
    rows = write_prompts(tmp_path / "in.csv", 300)
    summary = await arun_job(spec(tmp_path, server.base_url, rows, rpm=6000, concurrency=32), progress=False)
    assert (summary.ok, summary.failed) == (300, 0)
    assert server.stats.rate_limited <= 3  # a minute's burst at once met 2,858 (each refused row is sent again)


async def test_a_job_told_its_tpm_meets_no_429_storm_where_it_is_enforced_per_second(
    tmp_path: Path, mock_server
) -> None:
    # 600,000 tokens a minute enforced as 10,000 a second; rows of ~330 tokens: about 4 s of rows
    server = await mock_server(tpm=600_000, limit_window_s=1, latency_ms=50)
    rows = write_prompts(tmp_path / "in.csv", 150, text="row {i}: summarise this. " + "the harbour wind " * 90)
    summary = await arun_job(spec(tmp_path, server.base_url, rows, tpm=600_000, concurrency=32), progress=False)
    assert (summary.ok, summary.failed) == (150, 0)
    assert server.stats.rate_limited <= 3  # turns booked ahead, with over-estimates given back: dozens


async def test_a_tiny_burst_of_tokens_still_runs_without_429s(tmp_path: Path, mock_server) -> None:
    # 60,000 tokens a minute enforced per second (1,000 at once); one row of ~2,500 tokens among small ones
    server = await mock_server(tpm=60_000, limit_window_s=1, latency_ms=5)
    text = ["row {i}: say something about the sea"] * 30
    text[6] = "row {i}: " + "word " * 2500
    rows = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [t.format(i=i) for i, t in enumerate(text)]}).to_csv(rows, index=False)
    settings = {"tpm": 60_000, "burst": 0.05, "concurrency": 4, "max_tokens": 48}
    summary = await arun_job(spec(tmp_path, server.base_url, rows, **settings), progress=False)
    assert (summary.ok, summary.failed) == (30, 0)
    # the large row needs the server's bucket exactly full, which the job knows only to within its
    # token estimates: it may meet one 429. Taking only a burst's worth for it, the job met 8 or 9.
    assert server.stats.rate_limited <= 2


def shape(bucket: Bucket | None) -> tuple[int, float] | None:
    return (bucket.limit, bucket.capacity) if bucket is not None else None


@pytest.mark.parametrize(
    "settings",
    [{}, {"burst_s": 3.0}, {"rps": 5}, {"rps": 20, "burst_s": 0.25}],
    ids=["default", "burst", "rps", "both"],
)
def test_the_shared_ledger_has_the_local_limiters_burst_and_rps(settings: dict[str, float]) -> None:
    local = RateLimits(rpm=600, tpm=60_000, **settings)  # type: ignore[arg-type]
    ledger = Ledger(rpm=600, tpm=60_000, **settings)  # type: ignore[arg-type]
    assert (shape(ledger.requests), shape(ledger.tokens)) == (shape(local.requests), shape(local.tokens))


def test_a_later_job_with_another_burst_reshapes_the_shared_limit_keeping_what_is_owed() -> None:
    now = [0.0]
    ledger = Ledger(rpm=600, tpm=None, clock=lambda: now[0])  # 10 a second, 10 at once
    for _ in range(20):
        ledger.reserve(1, 0)  # a second owed past the burst
    ledger.configure(600, None, None, 3.0)
    assert shape(ledger.requests) == (600, 30.0) and ledger.snapshot()["burst_s"] == 3.0
    assert ledger.reserve(1, 0) == 0.0  # 20 of a burst of 30
    ledger.configure(600, None, 5, 3.0)  # --rps 5 as well: 5 a second, 5 at once
    assert shape(ledger.requests) == (300, 5.0)
    assert ledger.reserve(1, 0) == pytest.approx(1.3)  # 21 owed at 10/s are 10.5 at 5/s: 5.5 past the burst, +1


def test_run_takes_burst_and_rps_and_refuses_a_bad_burst(tmp_path: Path) -> None:
    df = pd.DataFrame({"prompt": ["a", "b", "c"]})
    settings = {"mock": True, "model": "gpt-4o-mini", "job_dir": tmp_path / "job", "progress": False}
    out = batchhub.run(df, rps=50, burst=0.25, **settings)
    assert out["status"].tolist() == ["ok"] * 3
    recorded = json.loads((tmp_path / "job" / "job.json").read_text())["spec"]
    assert (recorded["rps"], recorded["burst"]) == (50, 0.25)
    with pytest.raises(UsageError, match="burst must be a positive number of seconds"):
        batchhub.run(df, burst=float("inf"), **{**settings, "job_dir": tmp_path / "other"})
    assert not (tmp_path / "other").exists()
