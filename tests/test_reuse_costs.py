"""Reused replies (the `reused` column) cost nothing in the job that reused them: `cost`, the budget,
`status` and the report leave them out of the spend and say apart what reuse saved.

The fixture is a job directory written by hand, priced at $1 per million prompt tokens and $2 per
million completion tokens, so that every figure is exact:

    seq  row  where                      result                   prompt     completion  cost
    1    0    old part (no reused col)   ok, sent                 1,000,000  500,000     $2 spent
    2    1    old part                   503, no usage            -          -           -
    3    1    part                       ok, sent (the retry)     2,000,000  0           $2 spent
    4    2    part                       ok, reused "job"         1,000,000  500,000     $2 saved
    5    3    journal                    ok, reused "cache"       3,000,000  1,000,000   $5 saved
    6    4    journal                    ok, sent                 500,000    250,000     $1 spent
         5    -                          pending

Spent $5 over 3 replies billed, saved $7 by 2 replies reused (1 from this job, 1 from the cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchhub.cli import main
from batchhub.cost import render, report, usage_table
from batchhub.parts import set_damaged_parts_aside, write_part
from batchhub.prepare import start_budget
from batchhub.pricing import PriceBook
from batchhub.report import job_report
from batchhub.report_html import render_html
from batchhub.result_schema import rows_to_table
from batchhub.spec import JobSpec
from batchhub.status import job_status
from batchhub.store import JobStore

MODEL = "my-model"
PRICES = {MODEL: {"input_per_million": 1.0, "output_per_million": 2.0}}
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SAVED_LINE = "saved by reuse: $7.0000 (2 replies reused: 1 from this job, 1 from the cache)"


def result(seq: int, row: int, prompt: int | None, completion: int | None, reused: str | None = None) -> dict[str, Any]:
    ok = prompt is not None
    return {
        "row_id": row,
        "status": "ok" if ok else "error",
        "content": f"answer {row}" if ok else None,
        "model": MODEL,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": None if prompt is None or completion is None else prompt + completion,
        "latency_s": None if reused else 0.5,
        "attempts": 0 if reused else 1,
        "rate_limit_retries": 0,
        "http_status": 200 if ok else 503,
        "error_type": None if ok else "server_error",
        "error_message": None if ok else "HTTP 503: overloaded",
        "request_hash": f"{row:064x}",
        "reused": reused,
        "finished_at": T0 + seq,
        "seq": seq,
    }


OLD_PART = [result(1, 0, 1_000_000, 500_000), result(2, 1, None, None)]
PART = [result(3, 1, 2_000_000, 0), result(4, 2, 1_000_000, 500_000, "job")]
JOURNAL = [result(5, 3, 3_000_000, 1_000_000, "cache"), result(6, 4, 500_000, 250_000)]


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """The job of the module docstring: an old part without the reused column, a part, a journal."""
    job_dir = tmp_path / "job"
    results = job_dir / "results"
    results.mkdir(parents=True)
    write_part(results / "part-000001.parquet", rows_to_table(OLD_PART).drop(["reused"]))
    write_part(results / "part-000002.parquet", rows_to_table(PART))
    (job_dir / "journal-000003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JOURNAL))
    JobStore(job_dir).write_manifest(
        {
            "format_version": 1,
            "input": {"path": "in.csv", "rows": 6},
            "spec": {"name": "reuse", "model": MODEL, "prices": PRICES},
            "runs": [
                {
                    "batchhub_version": "0.1.0",
                    "started_at": "2026-01-01T00:00:00Z",
                    "ended_at": "2026-01-01T00:00:10Z",
                    "elapsed_s": 10.0,
                }
            ],
        }
    )
    return job_dir


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_an_older_part_reads_as_not_reused(job: Path) -> None:
    table = usage_table(job)
    assert table.num_rows == 6
    assert table["reused"].to_pylist() == [None, None, None, "job", "cache", None]


def test_a_part_written_before_the_reused_column_is_not_damaged(job: Path) -> None:
    # else a run of any older job sets all its parts aside and pays for every row again
    assert set_damaged_parts_aside(job / "results") == []
    assert sorted(p.name for p in (job / "results").iterdir()) == ["part-000001.parquet", "part-000002.parquet"]


def test_cost_leaves_reused_replies_out_and_prices_them_as_saved(job: Path) -> None:
    rep = report(usage_table(job), PriceBook.build(PRICES))
    assert rep.total_usd == pytest.approx(5.0)
    [line] = rep.models
    assert (line.requests, line.prompt_tokens, line.completion_tokens) == (3, 3_500_000, 750_000)
    assert rep.saved_usd == pytest.approx(7.0)
    assert (rep.reused_replies, rep.reused_from_job, rep.reused_from_cache) == (2, 1, 1)
    [saved] = rep.saved_models
    assert (saved.model, saved.requests, saved.total_usd) == (MODEL, 2, pytest.approx(7.0))
    assert SAVED_LINE in render(rep)


def test_without_the_reused_column_nothing_is_saved() -> None:
    table = rows_to_table([*OLD_PART, *PART, *JOURNAL]).drop(["reused"])
    rep = report(table, PriceBook.build(PRICES))
    assert rep.total_usd == pytest.approx(12.0)
    assert (rep.reused_replies, rep.saved_usd, rep.saved_models) == (0, 0.0, [])
    assert "saved by reuse" not in render(rep)


def test_a_reused_reply_of_an_unknown_price_is_no_unknown_spend() -> None:
    table = rows_to_table([result(1, 0, 1_000_000, 0), {**result(2, 1, 10, 10, "cache"), "model": "made-up"}])
    rep = report(table, PriceBook.build(PRICES))
    assert rep.complete and rep.unknown_models == []
    assert rep.saved_unknown_models == ["made-up"]
    assert "saved by reuse: $0.0000 + unknown for made-up (1 replies reused" in render(rep)


def test_the_cost_command_says_what_reuse_saved(job: Path) -> None:
    text = invoke("cost", str(job))
    assert text.exit_code == 0, text.output
    assert SAVED_LINE in text.output
    assert "$5.0000" in text.output
    data = json.loads(invoke("cost", str(job), "--json").output)
    assert data["total_usd"] == pytest.approx(5.0)
    assert data["saved_usd"] == pytest.approx(7.0)
    assert (data["reused_replies"], data["reused_from_job"], data["reused_from_cache"]) == (2, 1, 1)


def test_an_exported_parquet_with_a_reused_column_is_priced_the_same_way(tmp_path: Path) -> None:
    latest = rows_to_table([OLD_PART[0], *PART, *JOURNAL]).to_pandas()
    latest.insert(0, "prompt", [f"question {i}" for i in range(len(latest))])
    export = tmp_path / "export.parquet"
    latest.to_parquet(export)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    out = invoke("cost", str(export), "--prices", str(prices), "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["total_usd"] == pytest.approx(5.0)
    assert data["saved_usd"] == pytest.approx(7.0)
    assert (data["reused_from_job"], data["reused_from_cache"]) == (1, 1)
    old = tmp_path / "old.parquet"
    latest.drop(columns=["reused"]).to_parquet(old)
    data = json.loads(invoke("cost", str(old), "--prices", str(prices), "--json").output)
    assert (data["total_usd"], data["reused_replies"]) == (pytest.approx(12.0), 0)


def test_a_folder_of_parquet_files_from_before_and_after_the_column(job: Path) -> None:
    # the part from before the column comes first: its schema alone would leave the column unread
    rep = report(usage_table(job / "results"), PriceBook.build(PRICES))
    assert rep.total_usd == pytest.approx(4.0)  # the journal's rows are in no part
    assert (rep.saved_usd, rep.reused_from_job, rep.reused_from_cache) == (pytest.approx(2.0), 1, 0)


def test_the_budget_counts_only_what_was_paid(job: Path) -> None:
    spec = JobSpec(input=job / "in.csv", model=MODEL, max_cost=100.0, prices=PRICES)
    budget = start_budget(spec, JobStore(job), PriceBook.build(PRICES))
    assert budget.spent == pytest.approx(5.0)


def test_status_counts_rows_reused_and_what_they_saved(job: Path) -> None:
    st = job_status(job)
    assert (st.ok, st.failed, st.pending) == (5, 0, 1)
    assert (st.reused_rows, st.reused_rows_from_job, st.reused_rows_from_cache) == (2, 1, 1)
    assert st.spent_usd == pytest.approx(5.0)
    assert st.saved_usd == pytest.approx(7.0) and st.reused_replies == 2
    # tokens paid for in this job: the reused results' were paid before
    assert (st.prompt_tokens, st.completion_tokens) == (3_500_000, 750_000)
    # the pending row will be sent: $5 over the 3 rows sent, times 1 more
    assert st.projected_usd == pytest.approx(5.0 + 5.0 / 3)
    text = invoke("status", str(job)).output
    assert "reused   2 rows (1 from this job, 1 from the cache); saved $7.0000" in text
    assert "over 4 results (and 2 reused, paid for before)" in text
    assert "cost     $5.0000 spent" in text
    data = json.loads(invoke("status", str(job), "--json").output)
    assert (data["reused_rows"], data["saved_usd"]) == (2, pytest.approx(7.0))
    assert data["saved"] == SAVED_LINE


def test_status_of_a_job_without_reuse_says_nothing_of_it(job: Path) -> None:
    (job / "journal-000003.jsonl").unlink()
    (job / "results" / "part-000002.parquet").unlink()
    st = job_status(job)
    assert (st.reused_rows, st.reused_replies, st.saved) == (0, 0, None)
    assert "reused" not in invoke("status", str(job)).output


def test_report_shows_rows_reused_and_what_they_saved(job: Path) -> None:
    rep = job_report(job)
    assert rep.bill is not None
    assert rep.bill.total_usd == pytest.approx(5.0) and rep.bill.saved_usd == pytest.approx(7.0)
    assert (rep.reused_rows, rep.reused_rows_from_job, rep.reused_rows_from_cache) == (2, 1, 1)
    assert (rep.prompt_tokens, rep.completion_tokens) == (3_500_000, 750_000)
    assert rep.requests == 4  # the reused results sent nothing
    assert len(rep.latency) == 3  # ok results that were sent
    assert rep.reuse_text == SAVED_LINE
    page = render_html(rep)
    assert "reused rows" in page and "1 from this job, 1 from the cache; saved $7.0000" in page
    assert "Saved by reuse: $7.0000 (2 replies reused: 1 from this job, 1 from the cache)." in page
    out = invoke("report", str(job), "-o", str(job / "r.html"))
    assert out.exit_code == 0, out.output
    assert out.output.strip().endswith(f"cost $5.0000; {SAVED_LINE}")


def test_a_job_whose_every_reply_was_reused_spent_nothing(tmp_path: Path, job: Path) -> None:
    for path in [*(job / "results").iterdir(), job / "journal-000003.jsonl"]:
        path.unlink()
    write_part(job / "results" / "part-000001.parquet", rows_to_table([PART[1], JOURNAL[0]]))
    st = job_status(job)
    assert st.spent_usd == pytest.approx(0.0) and st.saved_usd == pytest.approx(7.0)
    assert "cost     $0.0000 spent" in invoke("status", str(job)).output
    page = render_html(job_report(job))
    assert "Saved by reuse: $7.0000 (2 replies reused: 1 from this job, 1 from the cache)." in page
