"""`--engine ray` with the job in a bucket, on a cluster of two Ray nodes on this machine that share no
folder of the job: a real S3 API server (moto) on 127.0.0.1, a `ray.cluster_utils.Cluster` in a process
of its own (tests/ray_cluster_child.py), and drivers run as `batchhub run --engine ray` processes.

Each task keeps its journal in a stage on its node's own disk (named after the node), so a node removed
here loses its stage as a lost machine would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobprocs import child_env, mock_stats
from ray_cluster_child import LOOPBACK_ENV, ClusterProcess
from s3server import MotoProcess, S3Bucket, s3_env

pytestmark = pytest.mark.slow

KEY = "sk-s3-ray-7c6b5a4d3e2f1a0b9c8d"
ROWS, SHARD_ROWS, IN_FLIGHT, CONCURRENCY, FLUSH_ROWS = 600, 100, 3, 4, 20


@pytest.fixture(scope="module")
def cluster(s3_server: MotoProcess) -> Iterator[ClusterProcess]:
    """Two Ray nodes whose every process has the S3 variables (as a cluster's pods would have theirs)."""
    env = {**child_env(), **s3_env(s3_server.endpoint), **LOOPBACK_ENV}
    started = ClusterProcess(env)
    yield started
    started.stop()  # it ends every process of its cluster before it exits


@pytest.fixture
def simulator(simulator_process) -> str:
    return simulator_process("--latency-ms", "75", "--seed", "6", "--api-key", KEY).base_url


def driver(cluster: ClusterProcess, data: str, job: str, base_url: str) -> subprocess.Popen:
    env = {**child_env(), **s3_env(os.environ["AWS_ENDPOINT_URL"]), **LOOPBACK_ENV, "BATCHHUB_API_KEY": KEY}
    return subprocess.Popen(
        [
            *[sys.executable, "-m", "batchhub", "run", data, "--model", "gpt-4o-mini", "--base-url", base_url],
            *["--job-dir", job, "--concurrency", str(CONCURRENCY), "--flush-rows", str(FLUSH_ROWS), "--quiet"],
            *["--engine", "ray", "--ray-address", cluster.address, "--shard-rows", str(SHARD_ROWS)],
            *["--max-shards-in-flight", str(IN_FLIGHT)],
            "--no-cache",  # the nodes share this machine's reply cache; a lost machine takes its own with it
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    _, err = proc.communicate(timeout=timeout)
    return err


def committed(s3: S3Bucket, prefix: str) -> pa.Table:
    """Every result committed under `prefix` (the parts in the bucket)."""
    import io

    tables = [
        pq.read_table(io.BytesIO(s3.get(key)), columns=["row_id", "status", "seq", "response_id"])
        for key in s3.objects(prefix)
        if "/results/part-" in key and key.endswith(".parquet")
    ]
    return pa.concat_tables(tables) if tables else pa.table({"row_id": pa.array([], pa.int64())})


def wait_committed(s3: S3Bucket, prefix: str, rows: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while committed(s3, prefix).num_rows < rows:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the job did not commit enough rows in time"
        time.sleep(0.1)


def shard_workers() -> set[int]:
    """Pids of the worker processes running a shard task now."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::run_shard"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def wait_no_tasks() -> None:
    deadline = time.monotonic() + 60
    while shard_workers():
        assert time.monotonic() < deadline, "the tasks kept running"
        time.sleep(0.1)


def assert_all_done_none_counted_twice(s3: S3Bucket, prefix: str, simulator: str, unrecorded: int) -> dict:
    """Every row has a result, no reply is recorded twice, and at most `unrecorded` replies the server
    sent are recorded nowhere (paid, and lost with what was in flight or on a lost node)."""
    table = committed(s3, prefix)
    rows = set(table["row_id"].to_pylist())
    assert rows == set(range(ROWS)), f"{ROWS - len(rows)} rows without a result"
    replies = [reply for reply in table["response_id"].to_pylist() if reply is not None]
    assert len(replies) == len(set(replies)), "a reply is recorded twice"
    stats = mock_stats(simulator)
    assert 0 <= stats["completions"] - len(replies) <= unrecorded, (stats["completions"], len(replies))
    return stats


def test_a_ray_job_with_input_and_job_in_a_bucket_resumes_after_its_driver_is_killed(
    cluster: ClusterProcess, s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path
) -> None:
    """The tasks' journals stay on their nodes: the resumed driver has the nodes commit them before it
    plans, so the kill costs only what was in flight."""
    s3.put("in/prompts.csv", prompts_csv(tmp_path / "in.csv", ROWS).read_bytes())
    data, job = s3.url("in/prompts.csv"), s3.url("jobs/ray-killed")
    first = driver(cluster, data, job, simulator)
    wait_committed(s3, "jobs/ray-killed/", 150, first)
    first.send_signal(signal.SIGKILL)
    finish(first)
    wait_no_tasks()  # Ray ends the tasks of a driver that died
    second = driver(cluster, data, job, simulator)
    err = finish(second)
    assert second.returncode == 0, err
    stats = assert_all_done_none_counted_twice(s3, "jobs/ray-killed/", simulator, IN_FLIGHT * CONCURRENCY)
    assert stats["duplicates"] <= IN_FLIGHT * CONCURRENCY, stats["duplicates"]
    status = subprocess.run(
        [sys.executable, "-m", "batchhub", "status", job, "--json"],
        capture_output=True,
        text=True,
        env={**child_env(), **s3_env(os.environ["AWS_ENDPOINT_URL"])},
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert (json.loads(status.stdout)["ok"], json.loads(status.stdout)["pending"]) == (ROWS, 0)
    print(f"driver killed: {stats['duplicates']} requests paid twice")


def test_a_killed_task_is_retried_with_nothing_lost_and_nothing_counted_twice(
    cluster: ClusterProcess, s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path
) -> None:
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    job = s3.url("jobs/task-killed")
    proc = driver(cluster, str(data), job, simulator)
    wait_committed(s3, "jobs/task-killed/", 2 * FLUSH_ROWS, proc)
    victims = shard_workers()
    assert victims
    os.kill(min(victims), signal.SIGKILL)  # Ray retries the task
    err = finish(proc)
    assert proc.returncode == 0, err
    stats = assert_all_done_none_counted_twice(s3, "jobs/task-killed/", simulator, CONCURRENCY)
    assert stats["duplicates"] <= CONCURRENCY, stats["duplicates"]
    print(f"task killed: {stats['duplicates']} requests paid twice")


def test_a_lost_node_costs_at_most_what_it_had_in_flight_and_not_committed(
    cluster: ClusterProcess, s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path
) -> None:
    """Last in this file: it removes the cluster's worker node (its two CPUs' tasks go to the head's one)."""
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    job = s3.url("jobs/node-lost")
    proc = driver(cluster, str(data), job, simulator)
    wait_committed(s3, "jobs/node-lost/", 3 * FLUSH_ROWS, proc)
    assert cluster.command("remove-worker") == "removed"
    err = finish(proc, timeout=300)
    assert proc.returncode == 0, err
    lost_tasks = 2  # the worker node's CPUs
    bound = lost_tasks * (CONCURRENCY + FLUSH_ROWS)
    stats = assert_all_done_none_counted_twice(s3, "jobs/node-lost/", simulator, bound)
    assert stats["duplicates"] <= bound, stats["duplicates"]
    print(f"node lost: {stats['duplicates']} requests paid twice")
