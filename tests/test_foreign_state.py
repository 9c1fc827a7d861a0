"""Damaged or foreign state is never adopted silently: results without job.json are refused,
and a result whose request_hash is not the request its row would send now is not trusted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from batchhub.cli import main
from batchhub.store import JobStore


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def run(data: Path, job: Path, *extra: str):
    return invoke("run", str(data), "--mock", "--model", "m", "--job-dir", str(job), "-q", *extra)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def latest(job: Path) -> pd.DataFrame:
    return JobStore(job).latest_results(["row_id", "request_hash", "status"]).to_pandas()


def foreign_job(tmp_path: Path, n: int, prompts_csv) -> tuple[Path, Path, list[str]]:
    """Job b, whose own results were replaced by a part copied from job a (another input).

    Returns b's job directory, its input, and the request hashes of b's own requests.
    """
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(prompts_csv(tmp_path / "a.csv", n, text="apples {i}"), a).exit_code == 0
    b_input = prompts_csv(tmp_path / "b.csv", n, text="pears {i}")
    assert run(b_input, b).exit_code == 0
    own = latest(b)["request_hash"].tolist()
    for part in (b / "results").iterdir():
        part.unlink()
    shutil.copy(next((a / "results").iterdir()), b / "results" / "part-000001.parquet")
    assert set(latest(b)["request_hash"]).isdisjoint(own)
    return b, b_input, own


def test_results_without_job_json_are_refused(tmp_path: Path, prompts_csv) -> None:
    job = tmp_path / "job"
    assert run(prompts_csv(tmp_path / "first.csv", 6, text="apples {i}"), job).exit_code == 0
    (job / "job.json").unlink()
    before = files(job)
    result = run(prompts_csv(tmp_path / "second.csv", 6, text="pears {i}"), job)
    assert result.exit_code == 2
    assert result.output == (
        f"error: results without job.json: {job} holds results but no job.json, so nothing tells which input "
        "and settings they belong to; use a new --job-dir, or restore job.json\n"
    )
    assert files(job) == before


def test_a_few_foreign_results_are_sent_again_and_counted(tmp_path: Path, prompts_csv) -> None:
    job, data, own = foreign_job(tmp_path, 6, prompts_csv)
    result = run(data, job)
    assert result.exit_code == 0, result.output
    assert "6 results no longer answer their rows' requests" in result.output
    assert latest(job)["request_hash"].tolist() == own
    assert len(JobStore(job).results(["row_id"])) == 12  # the 6 copied and the 6 sent again
    again = run(data, job)  # checked again on the next resume: all match now, nothing sent
    assert again.exit_code == 0 and "no longer answer" not in again.output
    assert len(JobStore(job).results(["row_id"])) == 12


def test_many_foreign_results_give_no_row_another_rows_reply(tmp_path: Path, prompts_csv) -> None:
    job, data, own = foreign_job(tmp_path, 30, prompts_csv)
    result = run(data, job)
    assert result.exit_code == 0, result.output
    assert "30 results no longer answer their rows' requests" in result.output
    # b's own replies are in the reply cache (its first run wrote them): found there, none paid again
    assert "30 replies reused (30 from the cache)" in result.output and "HTTP requests 0 " in result.output
    assert latest(job)["request_hash"].tolist() == own


def test_force_keeps_no_result_for_a_row_it_does_not_answer(tmp_path: Path, prompts_csv) -> None:
    job, data, own = foreign_job(tmp_path, 30, prompts_csv)
    result = run(data, job, "--force", "--no-cache")
    assert result.exit_code == 0, result.output
    assert latest(job)["request_hash"].tolist() == own  # each row its own request's reply, sent again
    assert "HTTP requests 30 " in result.output
