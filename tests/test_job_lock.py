"""One writer per job directory: a second run is refused (exit 2, naming pid and host); a kill frees it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from jobprocs import child_env, mock_stats, run_args, wait_for_results

import batchhub
from batchhub.cli import main
from batchhub.errors import JobStateError
from batchhub.lock import LOCK_NAME, STALE_S, lock_job_dir, remove_stale_temps

ROWS = 600


@pytest.fixture
def simulator(simulator_process) -> str:
    """`batchhub mock-server` in its own process on 127.0.0.1 (it counts requests across job processes)."""
    return simulator_process("--latency-ms", "20", "--seed", "5").base_url


def test_a_second_run_is_refused_and_a_killed_run_frees_the_job(tmp_path: Path, simulator: str) -> None:
    pd.DataFrame({"prompt": [f"row {i}" for i in range(ROWS)]}).to_csv(tmp_path / "in.csv", index=False)
    job = tmp_path / "job"
    # slow enough (2 at a time, 20 ms each) to be running still when the second run starts
    args = run_args(tmp_path, simulator, api_key="sk-lock-test", concurrency=2, flush_rows=20)
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    wait_for_results(job, 30, first)
    assert first.poll() is None, "the first run ended before the second could start"
    manifest = (job / "job.json").read_bytes()

    second = subprocess.run(args, capture_output=True, text=True, env=child_env(), timeout=60)
    assert second.returncode == 2, second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert "is running" in line and f"pid {first.pid}" in line and socket.gethostname() in line, line
    assert (job / "job.json").read_bytes() == manifest  # the refused run wrote nothing

    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)
    args = run_args(tmp_path, simulator, api_key="sk-lock-test", concurrency=16, flush_rows=50)
    resumed = subprocess.run(args, capture_output=True, text=True, env=child_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert len(mock_stats(simulator)["completed_keys"]) == ROWS
    status = subprocess.run(
        [sys.executable, "-m", "batchhub", "status", str(job), "--json"],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    )
    counts = json.loads(status.stdout)
    assert (counts["ok"], counts["pending"]) == (ROWS, 0)
    assert (job / LOCK_NAME).read_bytes() == b""  # released cleanly


def _job(tmp_path: Path) -> Path:
    pd.DataFrame({"prompt": ["a", "b", "c"]}).to_csv(tmp_path / "in.csv", index=False)
    return tmp_path / "job"


def test_cli_and_api_refuse_a_held_job_with_the_same_message(tmp_path: Path) -> None:
    job = _job(tmp_path)
    with lock_job_dir(job):
        args = ["run", str(tmp_path / "in.csv"), "--mock", "--model", "m", "--job-dir", str(job), "--quiet"]
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert f"is running (pid {os.getpid()} on host {socket.gethostname()}" in result.output
        with pytest.raises(JobStateError, match=f"is running \\(pid {os.getpid()} on host"):
            batchhub.run(tmp_path / "in.csv", mock=True, model="m", job_dir=job, progress=False)
    out = batchhub.run(tmp_path / "in.csv", mock=True, model="m", job_dir=job, progress=False)
    assert len(out) == 3


def test_a_lock_left_by_another_host_is_explained_while_the_job_looks_alive(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.json").write_text("{}")
    (job / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "node-b.example", "started_at": "x"}))
    changed = (job / "job.json").stat().st_mtime
    with pytest.raises(JobStateError, match=r"may be running on another host .*pid 4242 on host node-b") as info:
        lock_job_dir(job, now=changed + 5)
    assert "shared storage" in str(info.value)
    with lock_job_dir(job, now=changed + STALE_S + 1):  # idle long enough: the holder is gone
        assert json.loads((job / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.csv.tmp-{dead.pid}"
    live = tmp_path / f".out.csv.tmp-{os.getpid()}"
    other = tmp_path / f".out.csv.gz.tmp-{dead.pid}"
    for path in (stale, live, other):
        path.write_bytes(b"half")
    assert remove_stale_temps(tmp_path, target="out.csv") == 1
    assert not stale.exists() and live.exists() and other.exists()


def test_the_lock_file_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    job = tmp_path / "job"
    code = f"from batchhub.lock import lock_job_dir; lock_job_dir({str(job)!r}); print('held', flush=True); input()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    with pytest.raises(JobStateError, match=f"pid {holder.pid}"):
        lock_job_dir(job)
    holder.kill()
    holder.communicate(timeout=10)
    with lock_job_dir(job):  # the kernel dropped the dead holder's lock
        assert json.loads((job / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_an_export_removes_the_temp_file_a_killed_export_left(tmp_path: Path) -> None:
    _job(tmp_path)
    job = tmp_path / "job"
    run = ["run", str(tmp_path / "in.csv"), "--mock", "--model", "m", "--job-dir", str(job), "--quiet"]
    assert CliRunner().invoke(main, run, catch_exceptions=False).exit_code == 0
    out = tmp_path / "out.csv"
    code = (
        "import os, signal, pyarrow as pa; from batchhub.output import OutputWriter; "
        f"w = OutputWriter({str(out)!r}); w.write_batch(pa.record_batch({{'a': [1]}})); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", code], env=child_env(), timeout=60)
    assert killed.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".out.csv.tmp-*")
    result = CliRunner().invoke(main, ["export", str(job), "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not left.exists() and out.exists()
    assert list(tmp_path.glob(".*tmp*")) == []


async def test_a_run_prepared_while_another_ran_keeps_that_runs_record(tmp_path: Path) -> None:
    """A run prepared before another run of the job ended writes job.json under the lock
    afterwards: the other run's record must still be in it."""
    from batchhub import Job, prepare_job
    from batchhub.spec import JobSpec

    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"q{i}" for i in range(6)]}).to_csv(data, index=False)
    spec = JobSpec(input=data, base_url="mock://", model="gpt-4o-mini", job_dir=tmp_path / "job", quiet=True)
    first = await Job(prepare_job(spec)).run()  # creates the job
    assert first.exit_code == 0
    later = prepare_job(spec)  # prepared now, run after the next one
    between = await Job(prepare_job(spec)).run()
    assert between.exit_code == 0
    assert (await Job(later).run()).exit_code == 0
    runs = json.loads((tmp_path / "job" / "job.json").read_text())["runs"]
    assert len(runs) == 3
