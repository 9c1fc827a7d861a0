"""A model named by the row (a model column, a Batch JSONL line) that does not exist fails that row, not the job."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from batchhub.cli import main
from batchhub.store import JobStore


def run(data: Path, job: Path, *extra: str):
    args = ["run", str(data), "--mock", "--job-dir", str(job), "-q", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def latest(job: Path) -> pd.DataFrame:
    return JobStore(job).latest_results(["row_id", "status", "error_type", "error_message"]).to_pandas()


def test_one_unknown_model_in_a_model_column_fails_its_row_only(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    models = ["gpt-4o-mini"] * 40
    models[5] = models[31] = "gpt-nope"
    pd.DataFrame({"prompt": [f"q {i}" for i in range(40)], "model": models}).to_csv(data, index=False)
    job = tmp_path / "job"
    result = run(data, job, "--param-column", "model=model")
    assert result.exit_code == 1, result.output  # finished with failed rows (was: exit 3 on every resume)
    rows = latest(job)
    assert len(rows) == 40
    failed = rows[rows["status"] != "ok"]
    assert failed["row_id"].tolist() == [5, 31]
    assert set(failed["error_type"]) == {"not_found"}
    assert all("'gpt-nope' not found" in m for m in failed["error_message"])
    again = run(data, job, "--param-column", "model=model")
    assert again.exit_code == 1 and len(JobStore(job).results(["row_id"])) == 40  # nothing sent again


def test_an_unknown_model_in_a_batch_line_fails_its_row_only(tmp_path: Path) -> None:
    data = tmp_path / "batch.jsonl"
    lines = []
    for i in range(12):
        body = {"model": "gpt-nope" if i == 3 else "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]}
        lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    data.write_text("\n".join(lines) + "\n")
    job = tmp_path / "job"
    result = run(data, job)
    assert result.exit_code == 1, result.output
    rows = latest(job)
    assert rows[rows["status"] != "ok"]["row_id"].tolist() == [3]


def test_the_same_unknown_model_on_the_first_rows_still_stops_the_job(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"q {i}" for i in range(40)], "model": ["gpt-nope"] * 40}).to_csv(data, index=False)
    job = tmp_path / "job"
    result = run(data, job, "--param-column", "model=model")
    assert result.exit_code == 3, result.output
    assert "'gpt-nope' not found" in result.output
    assert len(JobStore(job).results(["row_id"])) == 0  # left pending, not failed
