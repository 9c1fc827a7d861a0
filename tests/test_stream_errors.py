"""Errors inside a 200 event stream, as proxies send them once they have opened the stream.

A proxy that sends its 200 and headers before its upstream answers (LiteLLM, OpenRouter) can pass
the upstream's 429 or 400 on only as an error event whose `code` is the status. The simulator
does the same with `stream_errors = "in_band"`; the job must read the event as the status it
stands for: a rate limit is retried as one (not as a server failure that uses up the row's
attempts), a refused request is not sent again.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchhub import arun_job
from batchhub.mock import MockConfig, MockServer


async def test_a_rate_limit_inside_a_stream_is_retried_as_a_rate_limit(tmp_path: Path, prompts_csv, job_spec) -> None:
    data = prompts_csv(tmp_path / "in.csv", 6)
    config = MockConfig(faults={"429": 0.3}, fault_retry_after_ms=50, stream_errors="in_band", seed=7)
    async with MockServer(config) as server:
        # one attempt per row for failures: a 429 read as a server failure would fail its row
        spec = job_spec(server.base_url, data, concurrency=4, stream=True, max_attempts=1)
        summary = await arun_job(spec, progress=False)
        assert server.stats.faults_injected.get("429", 0) > 0  # the case under test happened
    assert (summary.ok, summary.failed, summary.exit_code) == (6, 0, 0)
    table = pq.read_table(tmp_path / "job" / "results", columns=["rate_limit_retries"]).to_pydict()
    assert sum(table["rate_limit_retries"]) == server.stats.faults_injected["429"]


async def test_a_refusal_inside_a_stream_is_not_sent_again(tmp_path: Path, prompts_csv, job_spec) -> None:
    data = prompts_csv(tmp_path / "in.csv", 3)
    config = MockConfig(faults={"400": 1.0}, stream_errors="in_band")
    async with MockServer(config) as server:
        spec = job_spec(server.base_url, data, concurrency=2, stream=True, max_attempts=4, fail_fast=False)
        summary = await arun_job(spec, progress=False)
        assert server.stats.requests == 3  # one each: a 400 is the request's, sending it again changes nothing
    assert (summary.ok, summary.failed) == (0, 3)
    errors = pq.read_table(tmp_path / "job" / "results", columns=["http_status", "error_message"]).to_pydict()
    assert set(errors["http_status"]) == {400}
    assert all("No connected db." in m for m in errors["error_message"])


def test_stream_errors_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="stream_errors"):
        MockConfig(stream_errors="sometimes")
