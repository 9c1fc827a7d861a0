"""Helpers for tests that run jobs and the simulator as real subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """The environment for a `python -m batchhub` child: this checkout first, no inherited key or endpoint."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("BATCHHUB_API_KEY", "OPENAI_API_KEY", "BATCHHUB_BASE_URL", "OPENAI_BASE_URL"):
        env.pop(name, None)
    return env


def run_smoke(name: str, *args: str, cwd: Path = REPO, timeout: float = 300) -> list[str]:
    """Run `benchmarks/NAME.py --smoke ARGS...` and check it exits 0; the lines it printed. The
    timeout is a bound against a hang, not a speed check."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--smoke", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=cwd,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout.splitlines()


def summary_block(lines: list[str], heading: str) -> list[str]:
    """The lines from the first one starting with `heading` on (a benchmark's closing summary), after
    checking that the output begins with the machine it ran on."""
    assert lines and lines[0].startswith("machine: ") and "cores" in lines[0], lines[:1]
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    assert starts, (heading, lines)
    return lines[starts[0] :]


def line_per_label(lines: list[str], labels: tuple[str, ...]) -> list[str]:
    """The one line starting with each label, in the labels' order (a label on no line, or on two, fails)."""
    found = []
    for label in labels:
        matching = [line for line in lines if line.startswith(label)]
        assert len(matching) == 1, (label, lines)
        found.append(matching[0])
    return found


def run_benchmark(name: str, *args: str, cwd: Path, timeout: float = 240) -> list[str]:
    """Run `benchmarks/NAME.py --smoke ARGS...`; the lines of its `== NAME ==` block, which starts
    with the machine it ran on."""
    printed = "\n".join(run_smoke(name, *args, cwd=cwd, timeout=timeout)) + "\n"
    block = printed.split(f"== {name} ==\n", 1)
    assert len(block) == 2, printed
    lines = block[1].splitlines()
    assert lines[0].startswith("machine: ") and " cores " in lines[0], lines[0]
    return lines


def run_args(
    tmp_path: Path,
    base_url: str,
    *,
    api_key: str,
    concurrency: int,
    flush_rows: int,
    flush_seconds: float | None = None,
    job: str = "job",
) -> list[str]:
    """`python -m batchhub run TMP/in.csv` against `base_url`, into TMP/JOB, quiet."""
    args = [sys.executable, "-m", "batchhub", "run", str(tmp_path / "in.csv"), "--model", "m"]
    args += ["--base-url", base_url, "--api-key", api_key, "--job-dir", str(tmp_path / job)]
    args += ["--concurrency", str(concurrency), "--flush-rows", str(flush_rows)]
    if flush_seconds is not None:
        args += ["--flush-seconds", str(flush_seconds)]
    return [*args, "--quiet"]


def mock_stats(base_url: str) -> dict:
    """What the simulator served so far (GET /mock/stats)."""
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/mock/stats", timeout=5) as resp:
        return json.load(resp)


def results_on_disk(job: Path) -> int:
    """Results a reader sees now: distinct seqs in journal lines and parts (while a compaction
    finishes, its rows are in both the new part and the segment not yet deleted)."""
    seqs: set[int] = set()
    for part in (job / "results").glob("part-*.parquet"):
        seqs.update(pq.read_table(part, columns=["seq"])["seq"].to_pylist())
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
            pass  # a part being renamed in place; look again
        time.sleep(0.01)
    if proc.poll() is None:
        raise AssertionError(f"the job did not reach {at_least} results in {deadline_s}s")


RAY_PROCESS_MARKS = ("raylet", "gcs_server", "default_worker.py", "ray::", "dashboard_agent", "runtime_env_agent")


def ray_processes() -> set[int]:
    """Pids of this machine's processes that belong to a Ray instance."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mark in cmdline for mark in RAY_PROCESS_MARKS):
            found.add(int(entry.name))
    return found
