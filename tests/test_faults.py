"""Every fault the simulator can inject: the right status per row, bounded retries, no crash."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from batchhub import arun_job
from batchhub.mock import MockConfig, MockServer
from batchhub.spec import JobSpec

# fault -> (error_type when every request meets it, extra settings)
ALWAYS = {
    "500": ("server_error", {}),
    "502": ("server_error", {}),
    "503": ("server_error", {}),
    "504": ("server_error", {}),
    "timeout": ("transport_error", {}),
    "reset": ("transport_error", {}),
    "truncated": ("bad_response", {}),
    "html": ("bad_response", {}),
    "empty_choices": ("bad_response", {}),
    "stream_cut": ("bad_response", {"stream": True}),
}


@pytest.fixture
def spec_for(tmp_path: Path, prompts_csv, job_spec):
    """`spec_for(server, n, **settings)`: n prompts, six at a time, 0.3 s timeout, 3 attempts."""

    def make(server: MockServer, n: int, **kw) -> JobSpec:
        data = prompts_csv(tmp_path / "in.csv", n, text="Describe a cloud shaped like animal number {i}.")
        kw.setdefault("max_attempts", 3)
        return job_spec(server.base_url, data, concurrency=6, timeout=0.3, **kw)

    return make


def results(tmp_path: Path) -> pd.DataFrame:
    return pq.read_table(tmp_path / "job" / "results").to_pandas()


@pytest.mark.parametrize("fault", sorted(ALWAYS))
async def test_a_fault_on_every_request_fails_each_row_after_max_attempts(tmp_path: Path, fault: str, spec_for) -> None:
    error_type, extra = ALWAYS[fault]
    async with MockServer(MockConfig(faults={fault: 1.0}, hang_seconds=2.0)) as server:
        summary = await arun_job(spec_for(server, 6, **extra), progress=False)
        assert (summary.ok, summary.failed, summary.pending, summary.exit_code) == (0, 6, 0, 1)
        assert server.stats.requests == 6 * 3  # retried exactly up to max_attempts, no more
    df = results(tmp_path)
    assert set(df["error_type"]) == {error_type}
    assert set(df["attempts"]) == {3}
    assert df["error_message"].str.len().min() > 0


@pytest.mark.parametrize("fault", sorted(ALWAYS))
async def test_an_intermittent_fault_is_retried_until_every_row_is_ok(tmp_path: Path, fault: str, spec_for) -> None:
    _, extra = ALWAYS[fault]
    async with MockServer(MockConfig(seed=9, faults={fault: 0.3}, hang_seconds=2.0)) as server:
        summary = await arun_job(spec_for(server, 40, max_attempts=10, **extra), progress=False)
        assert (summary.ok, summary.failed) == (40, 0)
        assert summary.retries == server.stats.requests - 40 > 0
        assert len(server.stats.completed_keys) == 40


async def test_burst_of_mixed_5xx_and_429(tmp_path: Path, spec_for) -> None:
    faults = {"500": 0.2, "503": 0.2, "429": 0.2}
    async with MockServer(MockConfig(seed=5, faults=faults, fault_retry_after_ms=5)) as server:
        summary = await arun_job(spec_for(server, 80, max_attempts=12), progress=False)
    assert (summary.ok, summary.failed) == (80, 0)
    df = results(tmp_path)
    # failure attempts stay within max_attempts whatever the number of 429s met on the way
    assert (df["attempts"] - df["rate_limit_retries"]).between(1, 12).all()
    assert df["rate_limit_retries"].sum() == summary.rate_limited > 0


async def test_a_response_without_usage_is_ok_with_null_usage(tmp_path: Path, spec_for) -> None:
    async with MockServer(MockConfig(faults={"no_usage": 1.0})) as server:
        summary = await arun_job(spec_for(server, 5), progress=False)
    assert (summary.ok, summary.failed, summary.http_requests) == (5, 0, 5)
    df = results(tmp_path)
    assert df["prompt_tokens"].isna().all() and df["content"].str.len().min() > 0


async def test_stream_without_usage_chunk_is_still_a_result(tmp_path: Path, spec_for) -> None:
    async with MockServer(MockConfig(faults={"no_usage": 1.0})) as server:
        summary = await arun_job(spec_for(server, 4, stream=True), progress=False)
    assert (summary.ok, summary.failed) == (4, 0)


async def test_hung_requests_are_abandoned_at_the_timeout_not_waited_for(tmp_path: Path, spec_for) -> None:
    import time

    async with MockServer(MockConfig(faults={"timeout": 1.0}, hang_seconds=60.0)) as server:
        started = time.monotonic()
        summary = await arun_job(spec_for(server, 6, max_attempts=2), progress=False)
        elapsed = time.monotonic() - started
    assert summary.failed == 6
    assert elapsed < 10  # 2 attempts of 0.3 s each per row, six at a time: not the 60 s hang
