"""A job in a real subprocess, killed hard (SIGKILL) or stopped (SIGINT), then resumed.

The simulator runs in its own process too, so it counts across the job's
restarts how many completions were paid for more than once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from jobprocs import child_env, mock_stats, run_args, wait_for_results

CONCURRENCY = 8
ROWS = 600


@pytest.fixture
def simulator(simulator_process) -> str:
    """`batchhub mock-server` on a free port of 127.0.0.1, with some latency; yields its base URL."""
    return simulator_process("--latency-ms", "25", "--seed", "4").base_url


def start_job(tmp_path: Path, base_url: str) -> subprocess.Popen:
    return subprocess.Popen(
        run_args(tmp_path, base_url, api_key="sk-kill-test", concurrency=CONCURRENCY, flush_rows=50),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def test_sigkill_at_several_moments_then_resume_loses_nothing(tmp_path: Path, simulator: str, prompts_csv) -> None:
    prompts_csv(tmp_path / "in.csv", ROWS)
    job = tmp_path / "job"
    kills = 0
    for target in (60, 210, 380):
        proc = start_job(tmp_path, simulator)
        wait_for_results(job, target, proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        kills += 1
    final = start_job(tmp_path, simulator)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    export = tmp_path / "out.parquet"
    subprocess.run(
        [sys.executable, "-m", "batchhub", "export", str(job), "-o", str(export)], check=True, env=child_env()
    )
    df = pd.read_parquet(export)
    assert df["row_id"].tolist() == list(range(ROWS))
    assert (df["status"] == "ok").all()
    s = mock_stats(simulator)
    # every row was paid for at least once; a kill can re-pay at most the requests in flight
    assert len(s["completed_keys"]) == ROWS
    assert s["duplicates"] <= kills * CONCURRENCY, s["duplicates"]


def test_sigint_stops_gracefully_prints_resume_and_repays_nothing(tmp_path: Path, simulator: str, prompts_csv) -> None:
    prompts_csv(tmp_path / "in.csv", ROWS)
    job = tmp_path / "job"
    proc = start_job(tmp_path, simulator)
    wait_for_results(job, 100, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "resume with: batchhub run" in err
    assert "sk-kill-test" not in err + out
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "batchhub", "status", str(job), "--json"],
            capture_output=True,
            text=True,
            check=True,
            env=child_env(),
        ).stdout
    )
    assert status["ok"] >= 100 and status["pending"] > 0 and status["state"] == "stopped"
    final = start_job(tmp_path, simulator)
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    s = mock_stats(simulator)
    assert len(s["completed_keys"]) == ROWS
    assert s["duplicates"] == 0  # in-flight requests were finished and recorded, queued ones never sent
