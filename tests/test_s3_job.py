"""A job directory in a bucket (`--job-dir s3://...`), against a real S3 API server on 127.0.0.1 (moto)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from jobprocs import child_env, mock_stats
from s3server import S3Bucket

from batchhub.cli import main

ROWS = 300


@pytest.fixture
def simulator(simulator_process) -> str:
    return simulator_process("--latency-ms", "20", "--seed", "5").base_url


def run_args(data: Path, base_url: str, job_url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "batchhub", "run", str(data), "--model", "m", "--base-url", base_url,
        "--api-key", "sk-s3-test", "--job-dir", job_url, "--concurrency", "8", "--flush-rows", "40", "--quiet", *extra,
    ]  # fmt: skip


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def committed_rows(s3: S3Bucket, prefix: str) -> int:
    parts = [key for key in s3.objects(prefix) if key.endswith(".parquet") and "/results/part-" in f"/{key}"]
    return sum(pq.read_table(pd.io.common.BytesIO(s3.get(key)), columns=["row_id"]).num_rows for key in parts)


def test_a_job_runs_into_a_bucket_and_every_reader_reads_it_there(
    s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path
) -> None:
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    job = s3.url("jobs/sea")
    proc = subprocess.run(run_args(data, simulator, job), env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    keys = s3.objects("jobs/sea/")
    assert "jobs/sea/job.json" in keys and "jobs/sea/job.lease" not in keys  # released at the end
    assert all(not key.endswith(".jsonl") for key in keys)  # the journal stays on the machine
    assert committed_rows(s3, "jobs/sea/") == ROWS

    code, out = cli("status", job, "--json")
    assert code == 0, out
    status = json.loads(out)
    assert (status["ok"] + status["failed"], status["pending"], status["job_dir"]) == (ROWS, 0, job)
    code, out = cli("export", job, "-o", s3.url("out/sea.parquet"))
    assert code == 0, out
    exported = pq.read_table(pd.io.common.BytesIO(s3.get("out/sea.parquet")))
    assert exported.num_rows == ROWS and exported["prompt"].to_pylist()[7] == "row 7: say something about the sea"
    code, out = cli("cost", job)
    assert code == 0 and "m" in out, out
    code, out = cli("jobs", s3.url("jobs"))
    assert code == 0 and job in out and "finished" in out, out
    code, out = cli("report", job)
    assert code == 0 and "jobs/sea/report.html" in s3.objects("jobs/sea/"), out


def kill_after_commits(args: list[str], s3: S3Bucket, prefix: str, rows: int, env: dict[str, str]) -> None:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while committed_rows(s3, prefix) < rows:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()


@pytest.mark.parametrize("machine", ["same", "another"])
def test_a_killed_run_resumes_from_the_bucket(
    s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path, machine: str
) -> None:
    """SIGKILL after some parts are committed; resume on the same machine (its stage holds the journal)
    or on another (only the bucket): nothing is lost, and only what was not committed is paid again."""
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    job = s3.url("jobs/killed")
    env = child_env()
    kill_after_commits(run_args(data, simulator, job), s3, "jobs/killed/", 80, env)
    if machine == "another":  # a cache folder of its own: nothing of the first run's stage
        env["BATCHHUB_CACHE"] = str(tmp_path / "other-machine-cache")
    paid_before = mock_stats(simulator)["completions"]
    proc = subprocess.run(run_args(data, simulator, job), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    code, out = cli("status", job, "--json")
    status = json.loads(out)
    assert (status["ok"] + status["failed"], status["pending"]) == (ROWS, 0)
    paid = mock_stats(simulator)["completions"]
    # at most what was in flight (8) and, on another machine, what was journalled and not committed (< 40 + 8)
    assert paid - ROWS <= (8 if machine == "same" else 8 + 40 + 8), (paid, paid_before)
    exported = tmp_path / "out.parquet"
    code, out = cli("export", job, "-o", str(exported))
    assert code == 0, out
    assert pd.read_parquet(exported)["status"].notna().all()
