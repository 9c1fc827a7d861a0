"""`--via batch` attacked as a demanding user and a hostile provider would: each test asserts what must hold."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest
from batchjobs import (
    lines_sent,
    no_row_in_two_live_batches,
    server_batches,
    spec_for,
    stopped_once_a_batch_is_live,
    uploaded,
)

from batchhub import arun_job, export_job
from batchhub.batch_ledger import BatchLedger
from batchhub.batch_list import job_batches
from batchhub.errors import JobStateError
from batchhub.mock.batches import HUB
from batchhub.runner import Job, prepare_job
from batchhub.spec import JobSpec


def exported(tmp_path: Path) -> pd.DataFrame:
    export_job(tmp_path / "job", tmp_path / "out.parquet", force=True)
    return pd.read_parquet(tmp_path / "out.parquet")


# -- duplicates ------------------------------------------------------------------------------------


async def test_the_copies_of_a_row_whose_reply_failed_are_sent_in_the_same_run(tmp_path, mock_server):
    server = await mock_server(seed=1, batch_seconds=0.05, models=["m"])
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["same", "same", "same"], "mdl": ["nope"] * 3}).to_csv(data, index=False)
    summary = await arun_job(spec_for(tmp_path, server, data, param_columns={"model": "mdl"}))
    # the first's reply is a 404: the rows that asked the same are sent themselves, in this run
    assert (summary.ok, summary.failed, summary.pending) == (0, 3, 0)
    no_row_in_two_live_batches(server)


# -- the ledger damaged ----------------------------------------------------------------------------


async def test_events_written_after_a_torn_last_line_of_the_ledger_are_read_back(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=0.5)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data)
    ledger_path = tmp_path / "job" / "batches" / "ledger.jsonl"
    with ledger_path.open("ab") as fh:
        fh.write(b'{"event":"ended","n":1,"sta')  # a kill in the middle of writing an event
    summary = await arun_job(spec_for(tmp_path, server, data))
    assert summary.ok == 10
    # what the second run wrote down is what the next run reads: batch 1 recorded and ended
    entry = BatchLedger.read(tmp_path / "job").entries[1]
    assert entry.recording and entry.ended == "completed"
    lines = ledger_path.read_bytes().splitlines()
    torn = [line for line in lines if not line.startswith(b"{") or not line.endswith(b"}")]
    assert torn == [b'{"event":"ended","n":1,"sta']


@pytest.mark.parametrize("lost", [["rows.parquet"], ["rows.parquet", "jsonl"]])
async def test_a_live_batch_whose_rows_table_is_gone_has_its_rows_sent_once(tmp_path, mock_server, prompts_csv, lost):
    server = await mock_server(seed=1, batch_seconds=0.5)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data)
    for name in lost:  # the rows table, and the input file it is read again from (then the provider's copy)
        (tmp_path / "job" / "batches" / f"000001.{name}").unlink()
    summary = await arun_job(spec_for(tmp_path, server, data))
    assert (summary.ok, summary.pending) == (10, 0)
    sent = lines_sent(server)
    assert len(sent) == len(set(sent)) == 10  # no row in two batches
    assert server.stats.duplicates() == 0
    frame = exported(tmp_path)
    assert frame["batch_id"].nunique() == 1
    no_row_in_two_live_batches(server)


# -- the budget ------------------------------------------------------------------------------------

PRICES = {"m": {"input_per_million": 1000.0, "output_per_million": 1000.0}}


async def test_a_live_run_keeps_the_worst_case_of_live_batches_within_the_budget(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=1.0)
    data = prompts_csv(tmp_path / "in.csv", 40)
    settings = {"max_tokens": 10, "prices": PRICES, "max_cost": 0.4, "batch_requests": 20}
    job = Job(prepare_job(spec_for(tmp_path, server, data, **settings)), progress=False)
    task = asyncio.create_task(job.run())
    await server.wait_until(lambda stats: len(server.app[HUB].batches) >= 2)
    job.request_stop()
    await task
    held = BatchLedger.read(tmp_path / "job")
    worst = sum(float(held.rows(e.n).worst.sum()) for e in held.held())
    assert worst > 0
    live = await arun_job(spec_for(tmp_path, server, data, via="live", **settings))
    # what the live run may spend is what the budget leaves once the live batches' worst case is held
    assert live.budget_spent_usd + worst <= 0.4 + 1e-9
    assert live.stopped == "budget" and live.ok < 40


async def test_adopted_batches_over_the_budget_are_still_counted_as_spent(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=0.5)
    data = prompts_csv(tmp_path / "in.csv", 20)
    await stopped_once_a_batch_is_live(tmp_path, server, data, max_tokens=10, prices=PRICES, batch_requests=100)
    # resumed with a budget smaller than the live batch's worst case: it is collected (it is paid for), and
    # no batch is created after it
    summary = await arun_job(spec_for(tmp_path, server, data, max_tokens=10, prices=PRICES, max_cost=0.01))
    assert summary.ok == 20 and len(server_batches(server)) == 1
    assert summary.cost_usd > 0 and summary.budget_spent_usd == pytest.approx(summary.cost_usd)


# -- output files the provider writes oddly --------------------------------------------------------


def test_the_simulator_refuses_an_unknown_output_quirk():
    from batchhub.mock import MockConfig

    with pytest.raises(ValueError, match="batch_output_quirks"):
        MockConfig(batch_output_quirks=["sideways"])


@pytest.mark.parametrize("quirks", [["shuffle", "blank"], ["foreign"], ["repeat"]])
async def test_odd_output_lines_give_each_row_its_own_one_result(tmp_path, mock_server, prompts_csv, quirks):
    server = await mock_server(seed=3, batch_seconds=0.05, echo=True, batch_output_quirks=quirks)
    data = prompts_csv(tmp_path / "in.csv", 30)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=100))
    assert (summary.ok, summary.failed, summary.pending) == (30, 0, 0)
    frame = exported(tmp_path)
    # each row holds the answer to its own prompt (echo), whatever the order of the lines
    assert all(f"row {i}:" in text for i, text in zip(frame.index, frame["content"], strict=True))
    assert not frame["content"].str.contains("a second, other answer").any()  # the first answer stands
    assert len(server_batches(server)) == 1 and server.stats.duplicates() == 0


async def test_a_torn_last_output_line_sends_only_its_row_again(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=3, batch_seconds=0.05, echo=True, batch_output_quirks=["torn"])
    data = prompts_csv(tmp_path / "in.csv", 30)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=100, max_attempts=3))
    # every batch's last line is torn here, a batch of one line too: the row is sent alone in a new batch
    # until max_attempts, then fails saying why; no other row is sent twice
    assert (summary.ok, summary.failed, summary.pending) == (29, 1, 0)
    sent = lines_sent(server)
    assert len(sent) == 30 + 2 and len(set(sent)) == 30
    failed = exported(tmp_path).query("status == 'error'")
    assert failed["error_message"].str.contains("before answering it").all()
    assert sent.count(f"row-{failed.index[0]}") == 3
    no_row_in_two_live_batches(server)


async def test_a_200_line_that_is_not_a_chat_completion_is_sent_again_as_live_retries_it(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=3, batch_seconds=0.05, batch_output_quirks=["not_completion"])
    data = prompts_csv(tmp_path / "in.csv", 5)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=100, max_attempts=2))
    # the first line of each batch's output is not a completion: its row goes in a new batch (as a live
    # run retries a bad response), and fails for good only once max_attempts batches answered it so
    assert (summary.ok, summary.failed, summary.pending) == (4, 1, 0)
    assert len(server_batches(server)) == 2
    failed = exported(tmp_path).query("status == 'error'")
    assert failed["error_type"].tolist() == ["bad_response"]
    no_row_in_two_live_batches(server)


async def test_a_completed_batch_without_its_output_file_loses_no_row(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=3, batch_seconds=0.05, batch_output_quirks=["no_output"])
    data = prompts_csv(tmp_path / "in.csv", 5)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=100, max_attempts=2))
    assert (summary.ok, summary.failed, summary.pending) == (0, 5, 0)
    # sent again (its replies cannot be had), then failed saying what the provider did
    assert len(server_batches(server)) == 2
    failed = exported(tmp_path)
    assert failed["error_message"].str.contains("completed 5 requests, and has no output file").all()
    no_row_in_two_live_batches(server)


# -- through the CLI -------------------------------------------------------------------------------


def invoke(*args: str):
    from click.testing import CliRunner

    from batchhub.cli import main

    return CliRunner().invoke(main, list(args), env={"BATCHHUB_API_KEY": "k"}, catch_exceptions=False)


def cli_run(tmp_path: Path, base_url: str, *extra: str):
    args = ["run", str(tmp_path / "in.csv"), "--model", "m", "--base-url", base_url, "--job-dir", str(tmp_path / "job")]
    return invoke(*args, "--via", "batch", "--batch-poll", "0.05", "--no-cache", "--quiet", *extra)


@pytest.mark.slow
def test_batches_cancel_records_what_finished_and_the_next_run_sends_the_rest_once(
    tmp_path, threaded_mock, prompts_csv
):
    mock = threaded_mock(seed=4, batch_seconds=3.0, models=["*"])
    hub = mock.server.app[HUB]
    prompts_csv(tmp_path / "in.csv", 40)

    async def leave_a_batch_live() -> None:
        spec = spec_for(tmp_path, mock, tmp_path / "in.csv", batch_requests=100)
        job = Job(prepare_job(spec), progress=False)
        task = asyncio.create_task(job.run())
        answered = asyncio.run_coroutine_threadsafe(
            mock.server.wait_until(lambda stats: any(b.completed >= 5 for b in hub.batches.values())), mock.loop
        )
        await asyncio.wrap_future(answered)
        job.request_stop()
        await task

    asyncio.run(leave_a_batch_live())
    cancelled = invoke("batches", str(tmp_path / "job"), "--cancel")
    assert cancelled.exit_code == 0, cancelled.output
    (batch,) = hub.batches.values()
    assert batch.status == "cancelled"
    assert "cancelled" in cancelled.output
    entry = BatchLedger.read(tmp_path / "job").entries[1]
    assert entry.ended == "cancelled"
    done = exported(tmp_path)
    finished = int((done["status"] == "ok").sum())
    assert finished == batch.completed and 5 <= finished < 40
    assert done["status"].isna().sum() == 40 - finished  # the rest are pending, in no batch: none was created
    again = cli_run(tmp_path, mock.base_url)
    assert again.exit_code == 0, again.output
    frame = exported(tmp_path)
    assert (frame["status"] == "ok").sum() == 40
    sent = lines_sent(mock.server)
    assert len(sent) == 40 + (40 - finished) and mock.stats.duplicates() == 0
    no_row_in_two_live_batches(mock.server)


# -- settings changed while a batch is live --------------------------------------------------------


async def test_a_template_changed_while_a_batch_is_live_ends_with_every_row_answering_the_new_one(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=1, batch_seconds=0.5, echo=True)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data, template="old: {prompt}")
    summary = await arun_job(spec_for(tmp_path, server, data, template="new: {prompt}"))
    assert (summary.ok, summary.pending) == (10, 0)
    frame = exported(tmp_path)
    assert frame["content"].str.contains("new: row").all(), frame["content"].tolist()
    sent = lines_sent(server)
    assert len(sent) == 20 and server.stats.duplicates() == 0  # the old batch's, then each row once more
    no_row_in_two_live_batches(server)


async def test_a_run_stopped_before_it_sends_the_changed_rows_again_leaves_the_job_unchecked(
    tmp_path, mock_server, prompts_csv
):
    """Their batch answered the old template: until they are sent as they are now, those answers are not the
    rows' (export refuses, as after any change of settings a run has not checked through)."""
    server = await mock_server(seed=1, batch_seconds=0.5, echo=True)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data, template="old: {prompt}")
    server.app[HUB].state.config.file_max_bytes = 10  # the new batch's upload is refused: the run stops there
    summary = await arun_job(spec_for(tmp_path, server, data, template="new: {prompt}"))
    assert summary.stopped == "fatal" and summary.ok == 10  # the old batch's answers, recorded
    assert json.loads((tmp_path / "job" / "job.json").read_text())["results_checked"] is False
    with pytest.raises(JobStateError, match="stopped before it checked every row"):
        export_job(tmp_path / "job", tmp_path / "out.parquet")
    server.app[HUB].state.config.file_max_bytes = 10**8
    assert (await arun_job(spec_for(tmp_path, server, data, template="new: {prompt}"))).ok == 10
    assert exported(tmp_path)["content"].str.contains("new: row").all()


async def test_rows_of_a_file_that_made_no_batch_are_sent_by_the_run_that_finds_so(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=0.5)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data)
    # as if killed after the upload was written down and before the batch was made: no batch at the server
    ledger_path = tmp_path / "job" / "batches" / "ledger.jsonl"
    lines = ledger_path.read_bytes().splitlines(keepends=True)
    ledger_path.write_bytes(b"".join(line for line in lines if b'"event":"batch"' not in line))
    server.app[HUB].batches.clear()
    summary = await arun_job(spec_for(tmp_path, server, data))
    assert BatchLedger.read(tmp_path / "job").entries[1].dropped
    assert (summary.ok, summary.pending) == (10, 0)
    no_row_in_two_live_batches(server)


# -- structured output -----------------------------------------------------------------------------


async def test_retry_invalid_through_batches_sends_an_invalid_reply_again_at_most_that_often(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=6, batch_seconds=0.05, batch_line_faults={"bad_json": 0.5})
    data = prompts_csv(tmp_path / "in.csv", 30)
    json_mode = {"response_format": {"type": "json_object"}}
    spec = spec_for(tmp_path, server, data, batch_requests=100, json=True, retry_invalid=2, params=json_mode)
    summary = await arun_job(spec)
    assert summary.pending == 0 and summary.ok + summary.failed == 30
    assert summary.ok > 15 and summary.failed >= 1  # 0.5 ** 3 of the rows stay invalid
    sent = pd.Series(lines_sent(server)).value_counts()
    assert sent.max() == 3  # the first reply and at most retry_invalid more
    frame = exported(tmp_path)
    invalid = frame.query("status == 'invalid_output'")
    assert len(invalid) == summary.failed
    assert (sent[[f"row-{i}" for i in invalid.index]] == 3).all()
    assert sent.sum() == server.stats.completions  # every reply was paid for: each is a result in the journal
    assert summary.invalid_retries == sent.sum() - 30  # the summary counts them, as for a live run
    no_row_in_two_live_batches(server)


# -- status, cost, export, report ------------------------------------------------------------------


async def test_status_cost_export_and_report_of_a_job_run_through_batches(tmp_path, mock_server, prompts_csv):
    from openai.types.chat import ChatCompletion
    from openai_shapes import openai_parse
    from test_openai_batch import BatchLine

    from batchhub.export import export_openai_batch
    from batchhub.report import write_report
    from batchhub.status import job_status

    server = await mock_server(seed=8, batch_seconds=0.05, echo=True)
    data = prompts_csv(tmp_path / "in.csv", 12)
    summary = await arun_job(spec_for(tmp_path, server, data, prices=PRICES, batch_requests=5))
    st = job_status(tmp_path / "job")
    assert (st.ok, st.failed, st.pending, st.state) == (12, 0, 0, "finished")
    assert st.spent_usd == pytest.approx(summary.cost_usd) and st.spent_usd > 0
    out = tmp_path / "out.jsonl"
    assert export_openai_batch(tmp_path / "job", out) == 12
    hub = server.app[HUB]
    served = {}
    for batch in hub.batches.values():
        for raw in uploaded(server, batch.output_file_id).splitlines():
            served[json.loads(raw)["custom_id"]] = json.loads(raw)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    for line in lines:
        BatchLine.model_validate(line)
        openai_parse(ChatCompletion, line["response"]["body"])
        # what the provider's batch answered is what the export holds
        assert line["response"]["body"] == served[line["custom_id"]]["response"]["body"]
        assert line["response"]["request_id"] == served[line["custom_id"]]["response"]["request_id"]
    report = write_report(tmp_path / "job", tmp_path / "report.html")
    assert report is not None and (tmp_path / "report.html").stat().st_size > 0


async def test_status_of_a_job_with_a_live_batch_is_not_finished(tmp_path, mock_server, prompts_csv):
    from batchhub.status import job_status

    server = await mock_server(seed=1, batch_seconds=30)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data)
    st = job_status(tmp_path / "job")
    assert st.pending == 10 and st.state != "finished"


# -- reuse -----------------------------------------------------------------------------------------


async def test_batch_replies_fill_the_reply_cache_and_a_live_job_reuses_them(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=2, batch_seconds=0.05, echo=True)
    data = prompts_csv(tmp_path / "in.csv", 15)
    first = await arun_job(spec_for(tmp_path, server, data, no_cache=False))
    assert first.ok == 15
    live = await arun_job(spec_for(tmp_path, server, data, no_cache=False, via="live", job_dir=tmp_path / "live"))
    assert live.ok == 15 and live.http_requests == 0 and live.reused == {"cache": 15}
    assert server.stats.completions == 15
    # and the other way: a batch job asking what the cache holds creates no batch
    again = await arun_job(spec_for(tmp_path, server, data, no_cache=False, job_dir=tmp_path / "again"))
    assert again.ok == 15 and again.reused == {"cache": 15}
    assert len(server_batches(server)) == 1 and "none created" in again.batch_note


async def test_retry_failed_leaves_failed_rows_that_are_in_a_live_batch_to_it(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=6, batch_seconds=0.3, batch_line_faults={"bad_json": 0.5})
    data = prompts_csv(tmp_path / "in.csv", 20)
    json_mode = {"json": True, "retry_invalid": 1, "params": {"response_format": {"type": "json_object"}}}
    job = Job(prepare_job(spec_for(tmp_path, server, data, batch_requests=100, **json_mode)), progress=False)
    task = asyncio.create_task(job.run())
    await server.wait_until(lambda stats: len(server.app[HUB].batches) >= 2)
    job.request_stop()
    first = await task
    held = BatchLedger.read(tmp_path / "job").held_requests()[0]
    assert first.failed == len(held) > 0  # the invalid ones, sent again in the live batch
    live = await arun_job(spec_for(tmp_path, server, data, via="live", retry_failed=True, **json_mode))
    assert live.http_requests == 0 and live.failed == len(held)
    last = await arun_job(spec_for(tmp_path, server, data, retry_failed=True, **json_mode))
    assert last.pending == 0 and last.ok + last.failed == 20
    sent = pd.Series(lines_sent(server)).value_counts()
    # batch 2 answered the invalid rows; --retry-failed sends the ones still invalid once more (and once again
    # under retry_invalid): a row never went in two live batches, so at most 4 lines
    assert sent.max() <= 4 and sent.sum() == server.stats.completions
    no_row_in_two_live_batches(server)


async def test_a_batch_whose_output_file_the_provider_no_longer_has_sends_its_rows_again(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=1, batch_seconds=0.3)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data)
    hub = server.app[HUB]
    (batch,) = hub.batches.values()
    await asyncio.gather(*server.app[HUB].tasks)  # the batch has run to its end
    assert batch.status == "completed"
    del hub.files[batch.output_file_id]  # expired at the provider (30 days), or deleted
    summary = await arun_job(spec_for(tmp_path, server, data))
    # the job is not stuck on a file that will never come back: the rows go in a new batch
    assert (summary.ok, summary.pending) == (10, 0), summary.message
    assert len(server_batches(server)) == 2
    no_row_in_two_live_batches(server)


@pytest.mark.slow
async def test_the_budget_holds_across_a_stop_and_a_resume_with_batches_live(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=1, batch_seconds=0.5)
    data = prompts_csv(tmp_path / "in.csv", 60)
    settings = {"max_tokens": 10, "prices": PRICES, "max_cost": 0.5, "batch_requests": 10}
    job = Job(prepare_job(spec_for(tmp_path, server, data, **settings)), progress=False)
    task = asyncio.create_task(job.run())
    await server.wait_until(lambda stats: len(server.app[HUB].batches) >= 2)
    job.request_stop()
    first = await task
    second = await arun_job(spec_for(tmp_path, server, data, **settings))
    assert second.stopped == "budget"
    # every reply the provider answered is paid for: their cost, at the price the job knows, is within the budget
    spent = first.cost_usd + second.cost_usd
    assert 0 < spent <= 0.5 + 1e-9
    assert second.budget_spent_usd == pytest.approx(spent)
    assert server.stats.completions == second.ok
    no_row_in_two_live_batches(server)


async def test_live_and_batch_runs_in_turn_send_each_row_once(tmp_path, mock_server, prompts_csv):
    server = await mock_server(seed=3, batch_seconds=0.3, echo=True)
    data = prompts_csv(tmp_path / "in.csv", 30)
    budget = {"max_tokens": 10, "prices": PRICES}
    live = await arun_job(spec_for(tmp_path, server, data, via="live", max_cost=0.2, **budget))
    assert live.stopped == "budget" and 0 < live.ok < 30
    job = Job(prepare_job(spec_for(tmp_path, server, data, batch_requests=5, max_tokens=10)), progress=False)
    task = asyncio.create_task(job.run())
    await server.wait_until(lambda stats: len(server.app[HUB].batches) >= 1 and job._batch_run.counts.created)
    job.request_stop()
    await task
    again = await arun_job(spec_for(tmp_path, server, data, via="live", max_tokens=10))  # leaves the batch's rows
    last = await arun_job(spec_for(tmp_path, server, data, max_tokens=10))
    assert last.pending == 0 and last.ok == 30
    assert server.stats.completions == 30 and server.stats.duplicates() == 0
    assert again.http_requests + live.http_requests + len(lines_sent(server)) == 30
    frame = exported(tmp_path)
    assert all(f"row {i}:" in text for i, text in zip(frame.index, frame["content"], strict=True))
    no_row_in_two_live_batches(server)


async def test_a_batch_found_again_by_its_metadata_is_the_one_made_of_the_jobs_own_file(
    tmp_path, mock_server, prompts_csv
):
    from batchhub.mock.batches import Batch

    server = await mock_server(seed=1, batch_seconds=0.3, echo=True)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data)
    # as if killed after the batch was made and before its id was written down ...
    ledger_path = tmp_path / "job" / "batches" / "ledger.jsonl"
    lines = ledger_path.read_bytes().splitlines(keepends=True)
    ledger_path.write_bytes(b"".join(line for line in lines if b'"event":"batch"' not in line))
    # ... and a copy of the job directory (the same key) made a batch with the same number since, of its own file
    hub = server.app[HUB]
    (mine,) = hub.batches.values()
    text = hub.files[mine.input_file_id].data.replace(b"say something about the sea", b"a copy's other request")
    other = hub.add_file("copy.jsonl", "batch", text)
    decoy = Batch(f"batch_copy{len(hub.batches)}", other.id, dict(mine.metadata), mine.created_at + 1, False, False)
    hub.batches[decoy.id] = decoy
    hub.start(decoy)
    summary = await arun_job(spec_for(tmp_path, server, data))
    assert summary.ok == 10
    assert BatchLedger.read(tmp_path / "job").entries[1].batch_id == mine.id
    frame = exported(tmp_path)
    assert not frame["content"].str.contains("a copy's other request").any()


def test_batches_cancel_goes_on_past_a_batch_the_provider_no_longer_has(tmp_path, threaded_mock, prompts_csv):
    mock = threaded_mock(seed=4, batch_seconds=10.0, models=["*"])
    hub = mock.server.app[HUB]
    prompts_csv(tmp_path / "in.csv", 20)

    async def leave_two_batches_live() -> None:
        job = Job(prepare_job(spec_for(tmp_path, mock, tmp_path / "in.csv", batch_requests=10)), progress=False)
        task = asyncio.create_task(job.run())
        made = asyncio.run_coroutine_threadsafe(
            mock.server.wait_until(lambda stats: len(hub.batches) >= 2 and job._batch_run.counts.created >= 2),
            mock.loop,
        )
        await asyncio.wrap_future(made)
        job.request_stop()
        await task

    asyncio.run(leave_two_batches_live())
    first, second = sorted(hub.batches.values(), key=lambda b: b.made_at)
    mock.call(_forget(hub, first.id))
    cancelled = invoke("batches", str(tmp_path / "job"), "--cancel")
    assert cancelled.exit_code == 0, cancelled.output
    assert second.status == "cancelled"
    ledger = BatchLedger.read(tmp_path / "job")
    assert [e.ended for e in sorted(ledger.entries.values(), key=lambda e: e.n)] == ["not_found", "cancelled"]
    assert len(hub.batches) == 1  # none created by the cancel
    assert (exported(tmp_path)["status"] == "ok").sum() == second.completed  # the rest pending, for the next run


async def _forget(hub, batch_id: str) -> None:
    """The provider has the batch no more (its task stopped first, as a deletion would)."""
    hub.batches.pop(batch_id)


async def test_rows_a_batch_never_answered_export_as_openai_batch_error_lines(tmp_path, mock_server, prompts_csv):
    from openai.types.chat import ChatCompletion
    from openai_shapes import openai_parse
    from test_openai_batch import BatchLine

    from batchhub.export import export_openai_batch

    server = await mock_server(seed=2, batch_seconds=0.05, batch_expire=1.0, batch_expire_after=0.5)
    data = prompts_csv(tmp_path / "in.csv", 10)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=100, max_attempts=1))
    assert (summary.ok, summary.failed) == (5, 5)
    out = tmp_path / "out.jsonl"
    assert export_openai_batch(tmp_path / "job", out) == 10
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    for line in lines:
        BatchLine.model_validate(line)
    ok = [x for x in lines if x["response"] and x["response"]["status_code"] == 200]
    assert len(ok) == 5
    for line in ok:
        openai_parse(ChatCompletion, line["response"]["body"])
    # the provider's expiry, as OpenAI's own output says it: an error line, no response
    failed = [x for x in lines if x not in ok]
    assert len(failed) == 5
    assert all(x["response"] is None and "expired" in x["error"]["message"] for x in failed), failed[0]


async def test_a_run_at_another_endpoint_leaves_the_batches_live_at_the_first_to_them(
    tmp_path, mock_server, prompts_csv
):
    first = await mock_server(seed=1, batch_seconds=0.5)
    other = await mock_server(seed=1, batch_seconds=0.05)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, first, data)
    elsewhere = await arun_job(spec_for(tmp_path, other, data))
    # the batch is not gone: it is at the other server. Its rows are not sent (and paid) a second time here
    assert not other.app[HUB].batches and other.stats.completions == 0
    assert elsewhere.pending == 10 and "live at the provider" in elsewhere.batch_note
    # `batchhub batches` asks no server about it (the job's server now does not have it), and says where it is
    (listed,) = await job_batches(spec_for(tmp_path, other, data))
    assert listed.status.startswith("live at another server") and listed.problem is None
    back = await arun_job(spec_for(tmp_path, first, data))
    assert back.ok == 10 and len(first.app[HUB].batches) == 1


def test_a_default_batch_file_is_within_200_mb_however_a_megabyte_is_counted():
    from batchhub import defaults
    from batchhub.mock import MockConfig

    # OpenAI's "200 MB": a file of 200 MiB (209,715,200 bytes) may be refused as "File is too large"
    assert defaults.BATCH_BYTES <= 200_000_000
    assert JobSpec(input=Path("x.csv"), model="m").batch_bytes <= 200_000_000
    assert MockConfig().file_max_bytes <= 200_000_000  # the simulator as strict as the strictest reading


async def test_prompts_with_line_separators_and_odd_unicode_stay_one_line_each(tmp_path, mock_server):
    server = await mock_server(seed=1, batch_seconds=0.05, echo=True)
    data = tmp_path / "in.jsonl"
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "g\rh", "i\nj", "emoji \U0001f30a", 'quote " and \\ slash']
    data.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    summary = await arun_job(spec_for(tmp_path, server, data))
    assert (summary.ok, summary.failed) == (len(texts), 0)
    frame = exported(tmp_path)
    assert frame["content"].tolist() == [f"echo: {t}" for t in texts]
    assert len(lines_sent(server)) == len(texts)


# -- the provider's queue is full --------------------------------------------------------------------


@pytest.mark.slow
async def test_batches_past_the_enqueued_token_limit_wait_for_room_and_spend_no_attempt(
    tmp_path, mock_server, prompts_csv
):
    # room for about one batch at a time: the others fail validation with token_limit_exceeded, as OpenAI's do
    server = await mock_server(seed=1, batch_seconds=0.3, batch_queue_tokens=200)
    data = prompts_csv(tmp_path / "in.csv", 40)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=10, max_attempts=2))
    assert (summary.ok, summary.failed, summary.pending) == (40, 0, 0)
    refused = [b for b in server_batches(server) if b.status == "failed"]
    assert all(b.errors[0]["code"] == "token_limit_exceeded" for b in refused)
    no_row_in_two_live_batches(server)


async def test_a_batch_too_large_for_the_providers_queue_on_its_own_fails_after_max_attempts(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=1, batch_seconds=0.05, batch_queue_tokens=20)
    data = prompts_csv(tmp_path / "in.csv", 10)
    summary = await arun_job(spec_for(tmp_path, server, data, batch_requests=100, max_attempts=2))
    assert (summary.ok, summary.failed, summary.pending) == (0, 10, 0)
    assert len(server_batches(server)) == 2  # no endless loop: alone in the queue, each refusal is an attempt
    assert exported(tmp_path)["error_message"].str.contains("Enqueued token limit reached").all()


async def test_a_batch_reply_naming_a_cheaper_model_is_charged_at_the_requested_models_price(
    tmp_path, mock_server, prompts_csv
):
    server = await mock_server(seed=1, batch_seconds=0.05, batch_output_quirks=["other_model"])
    data = prompts_csv(tmp_path / "in.csv", 10)
    prices = {**PRICES, "gpt-4o-mini": {"input_per_million": 0.15, "output_per_million": 0.6}}
    summary = await arun_job(spec_for(tmp_path, server, data, max_tokens=10, prices=prices, max_cost=10))
    frame = exported(tmp_path)
    assert summary.ok == 10 and (frame["model"] == "gpt-4o-mini").all()
    # at m's batch price: its live price (1000 $ per million) at the published 50% Batch API discount
    billed = (frame["prompt_tokens"].sum() + frame["completion_tokens"].sum()) * 1000 * 0.5 / 1e6
    # the provider billed the model asked for: the budget counts that, as a live run's does
    assert summary.budget_spent_usd == pytest.approx(billed)


@pytest.mark.slow
def test_ctrl_c_during_a_download_records_what_came_and_the_next_run_sends_nothing_twice(
    tmp_path, simulator_process, prompts_csv
):
    import subprocess
    import sys

    from jobprocs import REPO, child_env, mock_stats

    base_url = simulator_process("--seed", "3", "--batch-seconds", "0.3").base_url
    prompts_csv(tmp_path / "in.csv", 120)
    args = [str(tmp_path / "in.csv"), "--model", "m", "--base-url", base_url, "--api-key", "sk-int"]
    args += ["--job-dir", str(tmp_path / "job"), "--via", "batch", "--batch-requests", "50", "--batch-poll", "0.2"]
    args += ["--no-cache", "--quiet"]

    def run(at: str) -> subprocess.CompletedProcess[str]:
        child = [sys.executable, str(REPO / "tests" / "batch_child.py"), at, "--", *args]
        return subprocess.run(child, capture_output=True, text=True, env=child_env(), timeout=120)

    stopped = run("interrupt")
    assert stopped.returncode == 3, stopped.stderr  # stopped: run it again to resume
    # the batch being downloaded was recorded to its end (the first Ctrl-C lets it finish)
    assert (exported(tmp_path)["status"] == "ok").sum() >= 50
    again = run("none")
    assert again.returncode == 0, again.stderr
    frame = exported(tmp_path)
    assert (frame["status"] == "ok").all() and len(frame) == 120
    assert mock_stats(base_url)["duplicates"] == 0


async def test_fresh_through_batches_reuses_nothing_and_sends_duplicates_once(tmp_path, mock_server):
    server = await mock_server(seed=2, batch_seconds=0.05, echo=True)
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["a", "b", "a", "c", "b"]}).to_csv(data, index=False)
    first = await arun_job(spec_for(tmp_path, server, data, no_cache=False))
    assert first.ok == 5 and first.reused == {"job": 2}
    fresh = await arun_job(spec_for(tmp_path, server, data, no_cache=False, fresh=True, job_dir=tmp_path / "f"))
    # nothing reused from the cache the first job filled; the rows of the run asking the same share one reply
    assert fresh.ok == 5 and fresh.reused == {"job": 2}
    assert len(lines_sent(server)) == 3 + 3
    no_row_in_two_live_batches(server)


async def test_a_live_run_refuses_to_send_rows_of_a_live_batch_it_cannot_read(tmp_path, mock_server, prompts_csv):
    from batchhub.errors import JobStateError

    server = await mock_server(seed=1, batch_seconds=30)
    data = prompts_csv(tmp_path / "in.csv", 10)
    await stopped_once_a_batch_is_live(tmp_path, server, data)
    for name in ("rows.parquet", "jsonl"):
        (tmp_path / "job" / "batches" / f"000001.{name}").unlink()
    # which rows the live batch holds is known to the provider only: a live run would send them a second time
    with pytest.raises(JobStateError, match="--via batch"):
        await arun_job(spec_for(tmp_path, server, data, via="live"))
    assert server.stats.completions == 0
