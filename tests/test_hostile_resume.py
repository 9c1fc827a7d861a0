"""Ordinary resumes after the request-hash check: nothing that was kept on purpose is questioned again."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from batchhub.cli import main
from batchhub.store import JobStore


def run(data: Path, job: Path, *extra: str):
    args = ["run", str(data), "--mock", "--model", "m", "--job-dir", str(job), "-q", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def requests_sent(job: Path) -> int:
    return len(JobStore(job).results(["row_id"]))


def test_results_kept_by_force_are_not_refused_by_the_next_resume(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"q {i}" for i in range(30)]}).to_csv(data, index=False)
    job = tmp_path / "job"
    assert run(data, job).exit_code == 0
    # new settings, kept on purpose: --force resumes with them and keeps the 30 results as they are
    forced = run(data, job, "--temperature", "0.5", "--force")
    assert forced.exit_code == 0, forced.output
    # the same command without --force (the settings now match job.json) is an ordinary resume
    again = run(data, job, "--temperature", "0.5")
    assert again.exit_code == 0, again.output
    assert "did not match" not in again.output
    assert requests_sent(job) == 30


def test_only_results_up_to_the_forced_seq_go_unchecked(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"q {i}" for i in range(30)]}).to_csv(data, index=False)
    job = tmp_path / "job"
    assert run(data, job).exit_code == 0
    store = JobStore(job)
    table = store.latest_results(["row_id", "seq", "request_hash"]).to_pandas()
    cut = int(table["seq"].median())
    hashes, _ = store.row_request_hashes(30, trusted_seq=cut)
    for row_id, seq, request_hash in table.itertuples(index=False):
        assert hashes[row_id] == (b"" if seq <= cut else request_hash.encode())
