"""`--via batch` in-process against the simulator's Files and Batches API: files, results, faults, budget."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from batchjobs import server_batches, spec_for, stopped_once_a_batch_is_live, uploaded

from batchhub import arun_job, export_job
from batchhub.batch_ledger import BatchLedger
from batchhub.errors import UsageError
from batchhub.mock.batches import HUB
from batchhub.options import Engine
from batchhub.runner import prepare_job
from batchhub.spec import JobSpec
from batchhub.status import job_status, render

ROWS = 60


def exported(tmp_path: Path) -> pd.DataFrame:
    export_job(tmp_path / "job", tmp_path / "out.parquet")
    return pd.read_parquet(tmp_path / "out.parquet")


def all_results(job: Path) -> pd.DataFrame:
    frames = [pq.read_table(p).to_pandas() for p in sorted((job / "results").glob("part-*.parquet"))]
    return pd.concat(frames, ignore_index=True)


async def test_rows_go_in_files_within_the_limits_and_come_back_as_results(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=0.05)
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    summary = await arun_job(spec_for(tmp_path, server, data))
    assert (summary.ok, summary.failed, summary.pending) == (ROWS, 0, 0)
    batches = server_batches(server)
    assert [b.request_counts()["total"] if callable(getattr(b, "request_counts", None)) else None for b in batches]
    totals = [len(uploaded(server, b.input_file_id).splitlines()) for b in batches]
    assert totals == [25, 25, 10]  # batch_requests per file, the rest in the last
    for batch in batches:
        lines = [json.loads(x) for x in uploaded(server, batch.input_file_id).splitlines()]
        assert {line["url"] for line in lines} == {"/v1/chat/completions"}
        assert batch.metadata["batchhub_job"] == BatchLedger.read(tmp_path / "job").key
    frame = exported(tmp_path)
    assert (frame["status"] == "ok").all()
    assert frame["batch_id"].notna().all() and frame["batch_id"].nunique() == 3
    assert frame["latency_s"].isna().all()
    assert server.stats.completions == ROWS and server.stats.duplicates() == 0
    assert "3 created" in summary.batch_note and "3 completed" in summary.batch_note


async def test_a_file_is_closed_before_it_passes_batch_bytes(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=0.05)
    data = prompts_csv(tmp_path / "in.csv", 30)
    await arun_job(spec_for(tmp_path, server, data, batch_requests=1000, batch_bytes=2000))
    sizes = [len(uploaded(server, b.input_file_id)) for b in server_batches(server)]
    assert len(sizes) > 1 and max(sizes) <= 2000


async def test_a_row_the_batch_api_would_refuse_fails_alone_before_upload(tmp_path, mock_server):
    server = await mock_server(seed=1, batch_seconds=0.05)
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["short", "x" * 5000, "also short"]}).to_csv(data, index=False)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_bytes=3000))
    assert (summary.ok, summary.failed) == (2, 1)
    frame = exported(tmp_path)
    refused = frame.iloc[1]
    assert refused["error_type"] == "invalid_request" and "batch_bytes" in refused["error_message"]
    sent = b"".join(f.data for f in [*server.app[HUB].files.values(), *server.app[HUB].deleted_files.values()])
    assert b"x" * 5000 not in sent


async def test_an_expired_batch_keeps_what_it_answered_and_sends_the_rest_again(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=2, batch_seconds=0.05, batch_expire=1.0, batch_expire_after=0.5)
    data = prompts_csv(tmp_path / "in.csv", 20)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=100, max_attempts=2))
    batches = server_batches(server)
    assert [b.status for b in batches] == ["expired", "expired"]
    assert len(uploaded(server, batches[1].input_file_id).splitlines()) == 10  # the unanswered half
    # answered: 10 in the first, 5 in the second; the last 5 expired twice (max_attempts 2): failed, saying why
    assert (summary.ok, summary.failed, summary.pending) == (15, 5, 0)
    failed = exported(tmp_path).query("status == 'error'")
    assert failed["error_type"].eq("batch_error").all()
    assert failed["error_message"].str.contains("expired").all()
    assert server.stats.duplicates() == 0


async def test_a_batch_that_fails_validation_is_sent_again_then_its_rows_fail_with_the_servers_reason(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=2, batch_seconds=0.05, batch_fail=1.0)
    data = prompts_csv(tmp_path / "in.csv", 8)
    summary = await arun_job(spec_for(tmp_path, server, data, max_attempts=2))
    assert len(server_batches(server)) == 2
    assert (summary.ok, summary.failed) == (0, 8)
    messages = exported(tmp_path)["error_message"]
    assert messages.str.contains("failed validation").all()


async def test_error_lines_worth_retrying_go_in_a_new_batch_and_replies_without_usage_are_charged_worst_case(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=5, batch_seconds=0.05, batch_line_faults={"500": 0.3, "no_usage": 0.2})
    data = prompts_csv(tmp_path / "in.csv", 40)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=100, max_tokens=16, max_attempts=8))
    assert (summary.ok, summary.failed, summary.pending) == (40, 0, 0)
    assert len(server_batches(server)) >= 2  # the 500 lines went in a new batch
    frame = exported(tmp_path)
    no_usage = frame["prompt_tokens"].isna()
    assert no_usage.any()
    assert (frame.loc[no_usage, "assumed_completion_tokens"] == 16).all()
    assert frame.loc[~no_usage, "assumed_completion_tokens"].isna().all()


async def test_a_line_the_server_refuses_fails_its_row_with_the_servers_error(tmp_path, mock_server):
    server = await mock_server(seed=1, batch_seconds=0.05, models=["m", "m2"])
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["a", "b", "c"], "mdl": ["m", "nope", "m"]}).to_csv(data, index=False)
    summary = await arun_job(spec_for(tmp_path, server, data, param_columns={"model": "mdl"}))
    assert (summary.ok, summary.failed) == (2, 1)
    bad = exported(tmp_path).iloc[1]
    assert bad["http_status"] == 404 and "nope" in bad["error_message"]
    assert bad["batch_id"] and json.loads(bad["extra"])["error"]["code"] == "model_not_found"


async def test_rows_of_several_models_go_in_files_of_one_model_each(tmp_path, mock_server):
    server = await mock_server(seed=1, batch_seconds=0.05)
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"q{i}" for i in range(9)], "mdl": ["m1", "m2", "m3"] * 3}).to_csv(data, index=False)
    summary = await arun_job(spec_for(tmp_path, server, data, param_columns={"model": "mdl"}))
    assert summary.ok == 9
    models = sorted(b.model for b in server_batches(server))
    assert models == ["m1", "m2", "m3"]


async def test_a_batch_is_created_only_when_its_worst_case_fits_the_budget(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=0.05)
    data = prompts_csv(tmp_path / "in.csv", 40)
    prices = {"m": {"input_per_million": 1000.0, "output_per_million": 1000.0}}
    spec = spec_for(tmp_path, server, data, max_tokens=10, prices=prices, max_cost=0.2, batch_requests=100)
    summary = await arun_job(spec)
    assert summary.stopped == "budget"
    sent = sum(len(uploaded(server, b.input_file_id).splitlines()) for b in server_batches(server))
    assert 0 < sent < 40
    assert summary.budget_spent_usd <= 0.2
    assert summary.ok == sent and summary.pending == 40 - sent


async def test_a_live_run_leaves_the_rows_of_a_live_batch_to_it(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=30)
    data = prompts_csv(tmp_path / "in.csv", 10)
    summary = await stopped_once_a_batch_is_live(tmp_path, server, data)
    assert summary.pending == 10 and "live at the provider" in summary.batch_note
    live = await arun_job(spec_for(tmp_path, server, data, via="live"))
    assert live.http_requests == 0 and live.pending == 10
    assert "--via batch to collect" in live.batch_note
    status = job_status(tmp_path / "job")
    assert (status.live_batches, status.rows_in_batches, status.pending) == (1, 10, 10)
    assert "10 pending rows in 1 live batch (batchhub batches " in render(status)


async def test_a_batch_the_provider_no_longer_has_sends_its_rows_again(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=0.5)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data)
    server.app[HUB].batches.clear()  # another account, deleted, or the simulator of an earlier process
    summary = await arun_job(spec_for(tmp_path, server, data))
    assert summary.ok == 10
    assert BatchLedger.read(tmp_path / "job").entries[1].ended == "not_found"
    (again,) = server.app[HUB].batches.values()  # its rows, in one new batch
    assert len(uploaded(server, again.input_file_id).splitlines()) == 10


async def test_duplicate_rows_are_sent_once_and_copied(tmp_path, mock_server):
    server = await mock_server(seed=1, batch_seconds=0.05)
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["same", "other", "same", "same"]}).to_csv(data, index=False)
    summary = await arun_job(spec_for(tmp_path, server, data))
    assert summary.ok == 4 and summary.reused == {"job": 2}
    assert server.stats.completions == 2


async def test_files_and_batches_calls_that_fail_are_retried_and_make_one_batch_each(
    tmp_path, mock_server, prompts_csv
):
    faults = {"500": 0.1, "503": 0.1, "timeout": 0.1}
    server = await mock_server(seed=9, batch_seconds=0.05, batch_faults=faults, hang_seconds=0.2)
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    summary = await arun_job(spec_for(tmp_path, server, data, timeout=1))
    assert summary.ok == ROWS
    assert len(server_batches(server)) == 3
    assert sum(server.stats.faults_injected.values()) > 0
    assert server.stats.duplicates() == 0


async def test_a_dataframe_goes_through_the_batch_api_with_via_batch(tmp_path, mock_server):
    import batchhub

    server = await mock_server(seed=1, batch_seconds=0.05)
    frame = pd.DataFrame({"q": [f"question {i}" for i in range(12)]})
    out = await batchhub.arun(
        frame,
        model="m",
        template="Answer: {q}",
        base_url=server.base_url,
        api_key="k",
        via="batch",
        batch_requests=5,
        batch_poll=0.05,
        job_dir=tmp_path / "df-job",
        quiet=True,
    )
    assert (out["status"] == "ok").all() and out["batch_id"].nunique() == 3
    assert out.attrs["batchhub"]["via"] == "batch" and "3 created" in out.attrs["batchhub"]["batch_note"]


def test_the_cli_says_what_the_batches_answered_not_http_requests(tmp_path, threaded_mock, prompts_csv):
    from click.testing import CliRunner

    from batchhub.cli import main

    sim = threaded_mock(batch_seconds=0.05)
    data = prompts_csv(tmp_path / "in.csv", 6)
    args = ["run", str(data), "--model", "m", "--base-url", sim.base_url, "--api-key", "k", "--via", "batch"]
    result = CliRunner().invoke(main, [*args, "--job-dir", str(tmp_path / "job"), "--batch-poll", "0.05", "-q"])
    assert result.exit_code == 0, result.output
    assert "replies from the Batch API 6; " in result.output and "HTTP requests" not in result.output
    assert "batches: 1 created; ended: 1 completed" in result.output


async def test_a_batchs_files_are_deleted_at_the_provider_once_its_results_are_recorded(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=1, batch_seconds=0.05, batch_line_faults={"500": 0.2})
    data = prompts_csv(tmp_path / "in.csv", 20)
    await arun_job(spec_for(tmp_path, server, data))
    hub = server.app[HUB]
    assert hub.files == {} and len(hub.deleted_files) >= 4  # inputs, outputs and an error file
    kept = await mock_server(seed=1, batch_seconds=0.05)
    await arun_job(spec_for(tmp_path, kept, data, job_dir=tmp_path / "kept", keep_batch_files=True))
    assert kept.app[HUB].deleted_files == {} and len(kept.app[HUB].files) == 2  # the input and the output


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"via": "post"}, "via must be one of 'live', 'batch', not 'post'"),
        ({"batch_requests": 0}, "batch_requests must be a whole number of at least 1"),
        ({"batch_bytes": -5}, "batch_bytes must be a whole number of at least 1"),
        ({"batch_poll": 0}, "batch_poll must be a positive number of seconds"),
        ({"keep_batch_files": "yes"}, "keep_batch_files must be true or false"),
        ({"stream": True}, "--stream cannot go with --via batch"),
    ],
)
def test_batch_settings_are_checked_before_anything_runs(tmp_path, settings, message):
    spec = JobSpec(input=tmp_path / "in.csv", model="m", **{"via": "batch", **settings})
    with pytest.raises(UsageError, match=message):
        spec.validate()


def test_the_ray_engine_refuses_via_batch(tmp_path, prompts_csv):
    data = prompts_csv(tmp_path / "in.csv", 3)
    spec = JobSpec(input=data, model="m", base_url="mock://", via="batch", job_dir=tmp_path / "job", quiet=True)
    with pytest.raises(UsageError, match="--via batch runs in this process"):
        Engine("ray").make_job(prepare_job(spec))


async def test_no_two_polls_of_a_live_batch_are_further_apart_than_batch_poll(tmp_path, mock_server, prompts_csv):
    """The first wait after a change was a second whatever `batch_poll` said (a batch of half a second was seen
    once, after it ended)."""
    server = await mock_server(seed=1, batch_seconds=0.6)
    data = prompts_csv(tmp_path / "in.csv", 5)
    await arun_job(spec_for(tmp_path, server, data, batch_poll=0.05))
    # upload, create, download, the two deletes (input and output): the rest of the 200s are polls
    polls = server.stats.by_status[200] - 5
    assert polls >= 8, polls  # 0.6 s at most 0.05 s apart: about 12


async def test_what_reuse_saved_a_batch_job_is_counted_at_the_batch_price(tmp_path, mock_server):
    """A copy of a reply saves what this job would have paid for it: through the Batch API, half the live price."""
    server = await mock_server(seed=1, batch_seconds=0.05)
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["same", "other", "same", "same"]}).to_csv(data, index=False)
    prices = {"m": {"input_per_million": 1000.0, "output_per_million": 1000.0}}
    summary = await arun_job(spec_for(tmp_path, server, data, prices=prices))
    frame = exported(tmp_path)
    copies = frame[frame["reused"].notna()]
    at_batch_price = (copies["prompt_tokens"].sum() + copies["completion_tokens"].sum()) * 500 / 1e6
    assert summary.reused == {"job": 2} and at_batch_price > 0
    assert summary.saved_usd == pytest.approx(at_batch_price)
    assert job_status(tmp_path / "job").saved_usd == pytest.approx(at_batch_price)
    from click.testing import CliRunner

    from batchhub.cli import main

    shown = CliRunner().invoke(main, ["cost", str(tmp_path / "job"), "--json"])
    assert json.loads(shown.output)["saved_usd"] == pytest.approx(at_batch_price)


def test_cost_knows_a_batch_job_in_a_directory_with_a_dot_in_its_name(tmp_path):
    from batchhub.cost import job_via
    from batchhub.store import JobStore

    job = tmp_path / "jobs" / "reviews.v2"
    JobStore(job).write_manifest({"format_version": 1, "input": {"path": "in.csv"}, "spec": {"via": "batch"}})
    assert job_via(job) == "batch"
    assert job_via(tmp_path / "export.parquet") == "live"
