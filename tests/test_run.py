"""Whole jobs against the simulator on 127.0.0.1: results, resume, failure policy, export, status."""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from batchhub import Job, arun_job, export_job, job_status, prepare_job
from batchhub.errors import UsageError
from batchhub.mock import MockServer
from batchhub.spec import JobSpec
from batchhub.store import JobStore


def write_prompts(path: Path, n: int, **extra_columns) -> Path:
    df = pd.DataFrame(
        {"id": range(n), "prompt": [f"Tell me fact number {i} about owls." for i in range(n)], **extra_columns}
    )
    df.to_csv(path, index=False)
    return path


def make_spec(tmp_path: Path, server: MockServer, n: int = 50, **kw) -> JobSpec:
    data = kw.pop("input", None) or write_prompts(tmp_path / "in.csv", n)
    kw.setdefault("model", "gpt-test")
    kw.setdefault("api_key", "sk-test-key")
    kw.setdefault("concurrency", 8)
    kw.setdefault("backoff_base", 0.01)  # keep retry waits tiny
    return JobSpec(input=data, job_dir=tmp_path / "job", base_url=server.base_url, quiet=True, **kw)


async def test_whole_job_every_row_once_and_export_in_input_order(tmp_path: Path, mock_server) -> None:
    server = await mock_server(seed=3, latency_ms=2)
    spec = make_spec(tmp_path, server, n=120, flush_rows=25, max_tokens=30)
    summary = await arun_job(spec, progress=False)
    assert (summary.ok, summary.failed, summary.pending, summary.exit_code) == (120, 0, 0, 0)
    assert summary.http_requests == 120
    assert server.stats.completions == 120
    parts = list((tmp_path / "job" / "results").glob("part-*.parquet"))
    # flushed during the run, not only at the end (a flush due while the previous one is still
    # being written waits for the next result, so the exact count depends on timing)
    assert len(parts) >= 2
    assert not list((tmp_path / "job").glob("journal-*.jsonl"))  # all compacted at the end
    out = tmp_path / "out.parquet"
    assert export_job(tmp_path / "job", out) == 120
    df = pd.read_parquet(out)
    assert df["id"].tolist() == list(range(120))
    assert df["row_id"].tolist() == list(range(120))
    assert set(df["status"]) == {"ok"}
    assert (df["prompt_tokens"] + df["completion_tokens"] == df["total_tokens"]).all()
    assert df["finish_reason"].isin(["stop", "length"]).all()
    assert int(df["total_tokens"].sum()) == server.stats.prompt_tokens + server.stats.completion_tokens
    st = job_status(tmp_path / "job")
    assert (st.ok, st.failed, st.pending, st.total_rows) == (120, 0, 0, 120)
    assert st.total_tokens == int(df["total_tokens"].sum())


async def test_a_flush_on_the_last_result_leaves_no_empty_journal_segment(tmp_path: Path, mock_server) -> None:
    # one row with flush_rows=1: its result starts a compaction and opens a fresh segment
    # that nothing is ever written to; the end of the run must remove it
    server = await mock_server(seed=3)
    spec = make_spec(tmp_path, server, n=1, flush_rows=1)
    summary = await arun_job(spec, progress=False)
    assert (summary.ok, summary.exit_code) == (1, 0)
    assert not list((tmp_path / "job").glob("journal-*.jsonl"))
    assert len(list((tmp_path / "job" / "results").glob("part-*.parquet"))) == 1
    # and the job resumes cleanly from that state: nothing left to send
    again = await arun_job(spec, progress=False)
    assert (again.ok, again.results_this_run, server.stats.completions) == (1, 0, 1)


async def test_stream_gives_same_content_as_plain(tmp_path: Path, mock_server) -> None:
    server = await mock_server(seed=5)
    plain = await arun_job(make_spec(tmp_path, server, n=20), progress=False)
    assert plain.ok == 20
    stream_spec = make_spec(tmp_path, server, n=20, stream=True)
    stream_spec.job_dir = tmp_path / "job-stream"
    streamed = await arun_job(stream_spec, progress=False)
    assert streamed.ok == 20
    a = pq.read_table(tmp_path / "job" / "results").to_pandas().sort_values("row_id")
    b = pq.read_table(tmp_path / "job-stream" / "results").to_pandas().sort_values("row_id")
    assert a["content"].tolist() == b["content"].tolist()
    assert a["total_tokens"].tolist() == b["total_tokens"].tolist()  # usage asked for in the stream


async def test_rerun_resumes_sending_nothing_twice(tmp_path: Path, mock_server) -> None:
    server = await mock_server()
    spec = make_spec(tmp_path, server, n=30)
    await arun_job(spec, progress=False)
    again = await arun_job(spec, progress=False)
    assert again.http_requests == 0 and again.ok == 30
    assert server.stats.completions == 30


async def test_400_row_fails_alone_and_retry_failed_resends_only_it(tmp_path: Path, mock_server) -> None:
    server = await mock_server(max_context_tokens=200)
    prompts = [f"short prompt {i}" for i in range(10)]
    prompts[4] = "word " * 500  # over the simulator's context window
    path = tmp_path / "in.csv"
    pd.DataFrame({"prompt": prompts}).to_csv(path, index=False)
    spec = make_spec(tmp_path, server, input=path)
    summary = await arun_job(spec, progress=False)
    assert (summary.ok, summary.failed, summary.exit_code) == (9, 1, 1)
    assert summary.http_requests == 10  # a 400 is not retried
    row = pq.read_table(tmp_path / "job" / "results").to_pandas().set_index("row_id").loc[4]
    assert row["status"] == "error" and row["http_status"] == 400 and row["error_type"] == "invalid_request"
    assert "context" in row["error_message"]
    spec.retry_failed = True
    again = await arun_job(spec, progress=False)
    assert again.http_requests == 1 and again.failed == 1


async def test_5xx_and_garbage_are_retried_until_ok(tmp_path: Path, mock_server) -> None:
    server = await mock_server(seed=11, faults={"503": 0.2, "500": 0.1, "html": 0.05, "truncated": 0.05, "reset": 0.05})
    spec = make_spec(tmp_path, server, n=60, max_attempts=12)
    summary = await arun_job(spec, progress=False, rng=__import__("random").Random(0))
    assert (summary.ok, summary.failed) == (60, 0)
    assert summary.retries > 0
    assert summary.http_requests == 60 + summary.retries


async def test_failures_past_max_attempts_are_recorded(tmp_path: Path, mock_server) -> None:
    server = await mock_server(faults={"503": 1.0})
    summary = await arun_job(make_spec(tmp_path, server, n=3, max_attempts=2), progress=False)
    assert (summary.ok, summary.failed, summary.exit_code) == (0, 3, 1)
    assert server.stats.requests == 6
    df = pq.read_table(tmp_path / "job" / "results").to_pandas()
    assert set(df["error_type"]) == {"server_error"} and set(df["attempts"]) == {2}


async def test_401_aborts_fast_and_resumable(tmp_path: Path, mock_server) -> None:
    server = await mock_server(api_key="sk-right-key")
    spec = make_spec(tmp_path, server, n=500, api_key="sk-wrong-key", concurrency=4)
    started = time.monotonic()
    summary = await arun_job(spec, progress=False)
    assert time.monotonic() - started < 5
    assert summary.exit_code == 3 and summary.stopped == "fatal"
    assert "API key" in (summary.message or "")
    assert summary.pending == 500  # nothing recorded as failed: fix the key and run again
    assert server.stats.requests <= 8
    spec.api_key = "sk-right-key"
    done = await arun_job(spec, progress=False)
    assert done.ok == 500


async def test_403_names_the_model(tmp_path: Path, mock_server) -> None:
    server = await mock_server(allowed_models=["small-model"])
    summary = await arun_job(make_spec(tmp_path, server, n=20, model="big-model"), progress=False)
    assert summary.exit_code == 3 and "big-model" in (summary.message or "")


async def test_insufficient_quota_stops_instead_of_retrying(tmp_path: Path, mock_server) -> None:
    server = await mock_server(quota_tokens=500)
    summary = await arun_job(make_spec(tmp_path, server, n=200, concurrency=2), progress=False)
    assert summary.exit_code == 3 and summary.stopped == "fatal"
    assert "quota" in (summary.message or "")
    assert summary.rate_limited == 0
    assert 0 < summary.ok < 200


async def test_rate_limit_storm_completes_without_using_up_attempts(tmp_path: Path, mock_server) -> None:
    # half of all requests are refused with a 429 (retry-after 20 ms); one failure attempt per row
    server = await mock_server(seed=2, faults={"429": 0.5}, fault_retry_after_ms=20)
    spec = make_spec(tmp_path, server, n=200, concurrency=16, max_attempts=1)
    summary = await arun_job(spec, progress=False)
    assert (summary.ok, summary.failed) == (200, 0)
    assert server.stats.rate_limited > 100
    assert summary.rate_limited == server.stats.rate_limited
    assert summary.http_requests == 200 + summary.rate_limited
    df = pq.read_table(tmp_path / "job" / "results").to_pandas()
    assert df["rate_limit_retries"].sum() == summary.rate_limited
    assert set(df["attempts"] - df["rate_limit_retries"]) == {1}


async def test_rate_limit_retries_have_their_own_bound(tmp_path: Path, mock_server) -> None:
    server = await mock_server(faults={"429": 1.0}, fault_retry_after_ms=1)
    summary = await arun_job(make_spec(tmp_path, server, n=3, max_rate_limit_retries=4), progress=False)
    assert (summary.ok, summary.failed) == (0, 3)
    df = pq.read_table(tmp_path / "job" / "results").to_pandas()
    assert set(df["error_type"]) == {"rate_limited"} and set(df["attempts"]) == {5}


async def test_limit_learned_from_headers_avoids_429s(tmp_path: Path, mock_server) -> None:
    # the server allows 6,000 requests a minute (100/s); the job is not told, reads x-ratelimit-*
    # headers and paces itself at that rate, with its own short burst, instead of running into 429s
    # (it does not spend the server's minute-deep bucket at once: a server enforcing per second,
    # whose headers speak of the minute too, would answer that with 429s)
    server = await mock_server(rpm=6000, latency_ms=1)
    started = time.monotonic()
    summary = await arun_job(make_spec(tmp_path, server, n=300, concurrency=16), progress=False)
    assert (summary.ok, summary.failed) == (300, 0)
    assert server.stats.rate_limited == 0
    assert time.monotonic() - started >= 2.0  # 300 at 100/s after a burst of 50: paced, not all at once


async def test_a_changed_input_or_changed_settings_send_only_the_new_requests(tmp_path: Path, mock_server) -> None:
    server = await mock_server()
    spec = make_spec(tmp_path, server, n=10)
    await arun_job(spec, progress=False)
    other = make_spec(tmp_path, server, n=10, model="another-model")
    changed = await arun_job(other, progress=False)  # every row asks another model now: all sent
    assert (changed.ok, changed.http_requests, changed.mismatched_results) == (10, 10, 10)
    back = await arun_job(spec, progress=False)  # the first model's replies are still the job's
    assert (back.ok, back.http_requests, back.reused) == (10, 0, {"job": 10})
    write_prompts(tmp_path / "in.csv", 11)
    grown = await arun_job(spec, progress=False)
    assert grown.total_rows == 11 and grown.ok == 11 and grown.http_requests == 1


async def test_a_job_from_before_a_setting_existed_resumes(tmp_path: Path, mock_server) -> None:
    server = await mock_server()
    spec = make_spec(tmp_path, server, n=10)
    await arun_job(spec, progress=False)
    manifest_path = tmp_path / "job" / "job.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["request_config"]["params"]  # as written before `params` was a setting
    manifest_path.write_text(json.dumps(manifest))
    assert (await arun_job(spec, progress=False)).exit_code == 0
    manifest_path.write_text(json.dumps(manifest))  # the resume wrote it anew, with params
    changed = make_spec(tmp_path, server, n=10, params={"seed": 1})  # another request for every row
    assert (await arun_job(changed, progress=False)).http_requests == 10


async def test_null_prompts_fail_without_being_sent(tmp_path: Path, mock_server) -> None:
    server = await mock_server()
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a", None, "", "b"]) + "\n")
    summary = await arun_job(make_spec(tmp_path, server, input=path), progress=False)
    assert (summary.ok, summary.failed) == (2, 2)
    assert server.stats.requests == 2


async def test_no_api_key_for_a_real_endpoint_is_a_usage_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("BATCHHUB_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    spec = JobSpec(input=write_prompts(tmp_path / "in.csv", 3), model="m", job_dir=tmp_path / "job")
    with pytest.raises(UsageError, match="no API key"):
        await arun_job(spec)
    assert not (tmp_path / "job").exists()


async def test_key_reaches_no_file(tmp_path: Path, mock_server) -> None:
    key = "sk-SECRET-canary-7f3a9c1e5b"
    server = await mock_server(api_key=key, faults={"503": 0.2, "html": 0.1}, max_context_tokens=60)
    prompts = [f"p {i}" for i in range(30)] + ["long " * 200]
    path = tmp_path / "in.csv"
    pd.DataFrame({"prompt": prompts}).to_csv(path, index=False)
    spec = make_spec(tmp_path, server, input=path, api_key=key, max_attempts=2, flush_rows=7)
    await arun_job(spec, progress=False)
    bad = make_spec(tmp_path, server, input=path, api_key=key + "-wrong")
    bad.job_dir = tmp_path / "job2"
    await arun_job(bad, progress=False)
    export_job(tmp_path / "job", tmp_path / "out.csv")
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert key.encode() not in file.read_bytes(), file


class DiskFullStore(JobStore):
    """A real job store whose second part write fails as on a full disk."""

    compactions = 0

    def compact(self, rows, segment):
        DiskFullStore.compactions += 1
        if DiskFullStore.compactions >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().compact(rows, segment)


async def test_failed_checkpoint_stops_the_job_and_loses_nothing(tmp_path: Path, mock_server) -> None:
    server = await mock_server(latency_ms=2)
    spec = make_spec(tmp_path, server, n=200, flush_rows=10, concurrency=4)
    prepared = prepare_job(spec)
    prepared.store = DiskFullStore(prepared.store.dir)
    summary = await Job(prepared, progress=False).run()
    assert summary.exit_code == 3 and summary.stopped == "write_error"
    assert "No space left" in (summary.message or "")
    assert summary.pending > 0
    recorded = summary.results_this_run
    # the part that failed left its rows in the journal; a resume compacts them and sends the rest
    resumed = await arun_job(spec, progress=False)
    assert (resumed.ok, resumed.failed) == (200, 0)
    assert resumed.http_requests == 200 - recorded
    assert server.stats.duplicates() == 0
    table = JobStore(tmp_path / "job").results()
    assert sorted(table["row_id"].to_pylist()) == list(range(200))


class JournalFullStore(JobStore):
    """A real job store whose journal stops taking lines after 30 results."""

    def append(self, row):
        if row["seq"] > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().append(row)


async def test_journal_write_failure_stops_at_once_and_resume_completes(tmp_path: Path, mock_server) -> None:
    server = await mock_server(latency_ms=2)
    spec = make_spec(tmp_path, server, n=100, concurrency=4)
    prepared = prepare_job(spec)
    prepared.store = JournalFullStore(prepared.store.dir)
    summary = await Job(prepared, progress=False).run()
    assert summary.stopped == "write_error" and summary.exit_code == 3
    assert summary.ok == 30
    resumed = await arun_job(spec, progress=False)
    assert (resumed.ok, resumed.failed) == (100, 0)
    assert server.stats.duplicates() <= 4  # only what was in flight when the disk filled
