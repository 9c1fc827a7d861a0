"""Helpers for tests that run jobs and the simulator as real subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """The environment for a `python -m batchhub` child: this checkout first, no inherited key."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("BATCHHUB_API_KEY", None)
    return env


def mock_stats(base_url: str) -> dict:
    """What the simulator served so far (GET /mock/stats)."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/mock/stats", timeout=5) as resp:
        return json.load(resp)


def results_on_disk(job: Path) -> int:
    """Results a reader sees now: distinct seqs in journal lines and shards (while a compaction
    finishes, its rows are in both the new shard and the segment not yet deleted)."""
    seqs: set[int] = set()
    for shard in (job / "results").glob("part-*.parquet"):
        seqs.update(pq.read_table(shard, columns=["seq"])["seq"].to_pylist())
    for seg in job.glob("journal-*.jsonl"):
        for line in seg.read_bytes().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line being written
                seqs.add(int(json.loads(line)["seq"]))
    return len(seqs)


def wait_for_results(job: Path, at_least: int, proc: subprocess.Popen, deadline_s: float = 60) -> None:
    """Wait until the job has written at least this many results, or ended."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if results_on_disk(job) >= at_least:
                return
        except (OSError, ValueError):
            pass  # a shard being renamed in place; look again
        time.sleep(0.01)
    if proc.poll() is None:
        raise AssertionError(f"the job did not reach {at_least} results in {deadline_s}s")
