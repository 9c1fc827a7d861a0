"""Job-level errors stop the job, row-level errors stay with their rows.

A failed row under --json, a wrong model or base URL, an endpoint that cannot be reached, a
key refused mid-job, and the same 400 on every request: each against the simulator on
127.0.0.1, counting what the simulator saw.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

import batchhub
from batchhub import Job, arun_job, job_status, prepare_job
from batchhub.cli import main
from batchhub.spec import JobSpec


def prompts(path: Path, n: int) -> Path:
    pd.DataFrame({"prompt": [f"Tell me fact number {i} about owls." for i in range(n)]}).to_csv(path, index=False)
    return path


def spec_for(tmp_path: Path, base_url: str, n: int = 40, **kw: Any) -> JobSpec:
    kw.setdefault("model", "gpt-4o-mini")
    kw.setdefault("concurrency", 8)
    kw.setdefault("backoff_base", 0.001)
    return JobSpec(
        input=prompts(tmp_path / "in.csv", n),
        job_dir=tmp_path / "job",
        base_url=base_url,
        api_key="sk-test-key",
        quiet=True,
        **kw,
    )


def cli(tmp_path: Path, base_url: str, n: int, *extra: str):
    args = ["run", str(prompts(tmp_path / "in.csv", n)), "--base-url", base_url, "--job-dir", str(tmp_path / "job")]
    args += ["--api-key", "sk-test-key", "--concurrency", "8", "-q", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


# -- 1. a failed row under --json ------------------------------------------------------------------


async def test_json_job_records_failed_rows_instead_of_crashing(tmp_path: Path, mock_server) -> None:
    # the 400s (over the context window) and the 503s past their last attempt end as error rows,
    # which have no content for the JSON check to read
    server = await mock_server(seed=3, faults={"503": 0.3}, max_context_tokens=60)
    data = tmp_path / "owls.csv"
    texts = [f"Describe owl number {i}" for i in range(30)]
    texts[5] = texts[17] = "owl " * 80
    pd.DataFrame({"prompt": texts}).to_csv(data, index=False)
    spec = spec_for(
        tmp_path, server.base_url, json=True, max_attempts=1, params={"response_format": {"type": "json_object"}}
    )
    spec.input = data
    summary = await arun_job(spec, progress=False)
    assert summary.pending == 0 and summary.exit_code == 1
    assert summary.ok + summary.failed == 30 and summary.failed >= 2
    st = job_status(tmp_path / "job")
    assert st.errors_by_type.get("invalid_request") == 2 and st.pending == 0


def test_json_run_from_python_returns_the_failed_rows(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=4, faults={"503": 0.5})
    df = pd.DataFrame({"review": [f"review {i}" for i in range(20)]})
    with pytest.warns(batchhub.FailedRowsWarning):
        out = batchhub.run(
            df,
            model="gpt-4o-mini",
            template="Sentiment of: {review}",
            params={"response_format": {"type": "json_object"}},
            json=True,
            max_attempts=1,
            base_url=server.base_url,
            api_key="sk-test",
            job_dir=tmp_path / "job",
            progress=False,
        )
    assert len(out) == 20 and "error" in set(out["status"]) and out["status"].notna().all()


class _BrokenSession:
    """A session whose post() has a bug: what a bug in a worker looks like to Job.run()."""

    def post(self, *args: Any, **kwargs: Any) -> Any:
        return {}["no such key"]


async def test_a_bug_in_a_worker_is_raised_as_itself_not_as_a_group(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "http://127.0.0.1:9/v1", n=5)
    job = Job(prepare_job(spec), session=_BrokenSession(), progress=False)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="no such key") as caught:
        await job.run()
    assert not isinstance(caught.value, BaseExceptionGroup)
    assert isinstance(caught.value.__cause__, BaseExceptionGroup)  # the group stays reachable
    assert job_status(tmp_path / "job").pending == 5


# -- 3. a wrong model, URL or key; an endpoint that cannot be reached ------------------------------


def test_an_unknown_model_costs_one_request_and_leaves_every_row_pending(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock()  # the simulator's own list of models
    result = cli(tmp_path, server.base_url, 300, "--model", "gpt-4o-mni", "--concurrency", "32")
    assert result.exit_code == 3, result.output
    assert f"model 'gpt-4o-mni' not found at {server.base_url}/chat/completions" in result.output
    assert "does not exist" in result.output  # the server's own words
    assert server.stats.requests == 1 and server.stats.by_status == {404: 1}
    assert job_status(tmp_path / "job").pending == 300


def test_a_base_url_without_v1_is_named(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock()
    base = server.base_url.removesuffix("/v1") + "/openai"
    result = cli(tmp_path, base, 300, "--model", "gpt-4o-mini")
    assert result.exit_code == 3, result.output
    assert f"no such endpoint {base}/chat/completions" in result.output
    assert "is /v1 missing from the base URL?" in result.output
    assert server.stats.by_status == {404: 1}
    assert job_status(tmp_path / "job").pending == 300


def test_a_refused_key_costs_one_request_not_a_wave(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(api_key="sk-the-right-key")
    result = cli(tmp_path, server.base_url, 100, "--model", "gpt-4o-mini", "--concurrency", "32")
    assert result.exit_code == 3 and "HTTP 401" in result.output, result.output
    assert server.stats.requests == 1
    assert job_status(tmp_path / "job").pending == 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_endpoint_nothing_listens_on_stops_the_job(tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{free_port()}/v1"
    result = cli(tmp_path, base, 50, "--model", "gpt-4o-mini", "--max-attempts", "5")
    assert result.exit_code == 3, result.output
    assert f"cannot reach the endpoint {base}/chat/completions" in result.output
    assert "HTTP requests 3 (" in result.output  # the first request's connection attempts, nothing more
    st = job_status(tmp_path / "job")
    assert (st.pending, st.failed) == (50, 0)


async def test_a_key_revoked_mid_job_stops_without_failing_rows(tmp_path: Path, mock_server) -> None:
    server = await mock_server(latency_ms=2)
    spec = spec_for(tmp_path, server.base_url, n=300, concurrency=4)

    async def revoke() -> None:  # after the 20th answer the key stops working
        await server.wait_until(lambda stats: stats.completions >= 20)
        server.config.api_key = "sk-another-key"

    revoking = asyncio.ensure_future(revoke())
    summary = await arun_job(spec, progress=False)
    await revoking
    assert (summary.exit_code, summary.stopped, summary.failed) == (3, "fatal", 0)
    assert "HTTP 401" in (summary.message or "")
    assert 20 <= summary.ok < 300 and summary.pending == 300 - summary.ok
    assert server.stats.by_status.get(401, 0) <= 4  # at most the requests in flight when it came


# -- 4. the same error on every request ------------------------------------------------------------


def test_the_same_400_on_every_request_stops_after_five(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(faults={"400": 1.0})
    result = cli(tmp_path, server.base_url, 300, "--model", "gpt-4o-mini", "--concurrency", "32")
    assert result.exit_code == 3, result.output
    assert "HTTP 400: No connected db. (the first 5 requests all failed with this same error" in result.output
    assert "--no-fail-fast" in result.output
    assert server.stats.requests == 5
    st = job_status(tmp_path / "job")
    assert (st.pending, st.failed) == (300, 0)
    # the failures really are per row: the user says so, and every row is sent and recorded
    again = cli(tmp_path, server.base_url, 300, "--model", "gpt-4o-mini", "--no-fail-fast")
    assert again.exit_code == 1, again.output
    assert server.stats.requests == 5 + 300
    assert job_status(tmp_path / "job").failed == 300


async def test_fewer_rows_than_the_fail_fast_count_are_recorded(tmp_path: Path, mock_server) -> None:
    server = await mock_server(faults={"400": 1.0})
    summary = await arun_job(spec_for(tmp_path, server.base_url, n=3), progress=False)
    assert (summary.failed, summary.pending, summary.exit_code) == (3, 0, 1)
    assert server.stats.requests == 3


async def test_identical_failures_then_a_success_are_all_recorded(tmp_path: Path, mock_server) -> None:
    server = await mock_server(max_context_tokens=60)
    data = tmp_path / "owls.csv"
    texts = ["owl " * 80] * 4 + [f"Describe owl number {i}" for i in range(36)]  # four the same 400, then fine
    pd.DataFrame({"prompt": texts}).to_csv(data, index=False)
    spec = spec_for(tmp_path, server.base_url, concurrency=1)
    spec.input = data
    summary = await arun_job(spec, progress=False)
    assert (summary.ok, summary.failed, summary.pending, summary.exit_code) == (36, 4, 0, 1)
    assert server.stats.requests == 40
