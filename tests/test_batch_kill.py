"""A run through the Batch API killed hard (SIGKILL) at each of its steps, then run again.

The simulator runs in a process of its own, so it keeps the batches across the job's deaths and
counts every line it answered: a row sent in two batches would be paid twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from jobprocs import REPO, child_env, mock_stats

ROWS = 120
KEY = "sk-batch-kill"


@pytest.fixture
def simulator(simulator_process) -> str:
    return simulator_process("--seed", "3", "--batch-seconds", "0.3").base_url


def run(tmp_path: Path, base_url: str, kill_at: str = "none") -> subprocess.CompletedProcess[str]:
    args = [str(tmp_path / "in.csv"), "--model", "m", "--base-url", base_url]
    args += ["--api-key", KEY, "--job-dir", str(tmp_path / "job"), "--via", "batch", "--batch-requests", "50"]
    args += ["--batch-poll", "0.2", "--no-cache", "--quiet"]
    return subprocess.run(
        [sys.executable, str(REPO / "tests" / "batch_child.py"), kill_at, "--", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )


def server_batches(base_url: str) -> list[dict]:
    request = urllib.request.Request(f"{base_url}/batches?limit=100", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.load(resp)["data"]


def results(job: Path) -> list[dict]:
    rows = []
    for part in sorted((job / "results").glob("part-*.parquet")):
        rows += pq.read_table(part, columns=["row_id", "status", "batch_id"]).to_pylist()
    for segment in sorted(job.glob("journal-*.jsonl")):
        rows += [json.loads(line) for line in segment.read_text().splitlines() if line.strip()]
    return rows


@pytest.mark.parametrize("kill_at", ["upload", "create", "poll", "download"])
def test_killed_at_any_step_the_next_run_sends_no_row_twice_and_loses_no_result(
    tmp_path: Path, simulator: str, prompts_csv, kill_at: str
) -> None:
    prompts_csv(tmp_path / "in.csv", ROWS)
    killed = run(tmp_path, simulator, kill_at)
    assert killed.returncode == -9, killed.stderr
    again = run(tmp_path, simulator)
    assert again.returncode == 0, again.stderr
    recorded = results(tmp_path / "job")
    # every row once: no result recorded twice, none lost
    assert sorted(r["row_id"] for r in recorded) == list(range(ROWS))
    assert all(r["status"] == "ok" and r["batch_id"] for r in recorded)
    # no row went in two batches: the lines the server was given are the rows, each once
    batches = server_batches(simulator)
    assert sum(b["request_counts"]["total"] for b in batches) == ROWS
    assert mock_stats(simulator)["duplicates"] == 0
    # the batch made but not written down (create) was found by its metadata, not made again
    assert len(batches) == 3
    assert len({b["metadata"]["batchhub_batch"] for b in batches}) == 3
    # what an ended batch needs no more is gone from the job directory
    assert sorted(p.name for p in (tmp_path / "job" / "batches").iterdir()) == ["ledger.jsonl"]
