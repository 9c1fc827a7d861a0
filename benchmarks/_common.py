"""Shared helpers of the benchmark scripts: the machine, the simulator, child processes, figures.

Every script runs the things it compares as fresh child processes, interleaved
(A B, B A, A B, ...), and reports the median, because a shared machine is noisy.
The simulator (`batchhub mock-server`) always runs in a process of its own, on
127.0.0.1, with no latency and no limits unless a script says otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a clone without installing: the scripts import batchhub too
    sys.path.insert(0, str(REPO))
from batchhub.mock.process import SimulatorProcess  # noqa: E402

MODEL = "gpt-4o-mini"
API_KEY = "sk-bench"


def child_env() -> dict[str, str]:
    """The environment of a child process: this repository first on PYTHONPATH, no real keys or endpoints."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("BATCHHUB_API_KEY", "OPENAI_API_KEY", "BATCHHUB_BASE_URL", "OPENAI_BASE_URL"):
        env.pop(name, None)
    return env


# -- the machine ---------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def batchhub_version() -> str:
    out = subprocess.run(
        [sys.executable, "-c", "import batchhub; print(batchhub.__version__)"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    return out.stdout.strip() or "unknown"


def machine_line() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {cpu_model()}, {cores} cores ({os.cpu_count()} CPUs), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, batchhub {batchhub_version()}"
    )


# -- figures --------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def order(rep: int, names: Sequence[str]) -> list[str]:
    """The compared runs of repetition `rep`, interleaved: the order flips every repetition."""
    return list(names) if rep % 2 == 0 else list(reversed(names))


def mb(kib: float) -> str:
    return f"{kib / 1024:,.0f} MB"


def print_block(title: str, lines: Sequence[str]) -> None:
    """The final block of a script: lines that can be pasted into docs as they are."""
    print()
    print(f"== {title} ==")
    for line in lines:
        print(line)
    sys.stdout.flush()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- input ----------------------------------------------------------------------------------


def prompt_text(i: int) -> str:
    return f"row {i}: write one short sentence about the sea"


def write_csv(path: Path, rows: int) -> Path:
    """A one-column CSV (`prompt`) of `rows` short prompts, the same for every script."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt"])
        writer.writerows([prompt_text(i)] for i in range(rows))
    return path


@contextlib.contextmanager
def workdir(prefix: str, keep: str | None = None) -> Iterator[Path]:
    """A scratch folder (removed afterwards), or `keep` if given (left in place)."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# -- the simulator --------------------------------------------------------------------------


class Simulator(SimulatorProcess):
    """`batchhub mock-server` in its own process on a free port of 127.0.0.1, in the benchmarks' child environment.

    The launcher is `batchhub.mock.SimulatorProcess`, the one the tests use too.
    """

    def __init__(self, *extra: str) -> None:
        super().__init__(*extra, env=child_env())


# -- child processes ------------------------------------------------------------------------


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    #: user + system CPU seconds of the child (and of its threads)
    cpu_s: float
    #: the child's peak resident set size, KiB (from wait4's rusage: this child only)
    maxrss_kib: int
    stdout: str
    stderr: str
    #: what the `while_running` callback returned, if any
    extra: object = None


def run_child(
    cmd: Sequence[str],
    *,
    timeout: float,
    cwd: Path | None = None,
    while_running: Callable[[subprocess.Popen[bytes], float], object] | None = None,
) -> ChildResult:
    """Run a command, measuring its wall time (from just before the fork), CPU time and peak RSS.

    Output goes to temporary files (no pipe can fill up). `while_running(proc, t0)` is
    called right after the start (t0 = time.perf_counter() just before it) and may wait
    for something, or stop the child (checking it with `running(proc)`, not `proc.poll()`,
    which would reap it); its return value is kept in `extra`. A child still
    running after `timeout` seconds is sent SIGINT, then killed.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=child_env(), cwd=cwd)
        extra = while_running(proc, t0) if while_running is not None else None
        status, usage = _wait4(proc, timeout)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildResult(
            returncode=proc.returncode,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            maxrss_kib=int(usage.ru_maxrss),
            stdout=out.read().decode("utf-8", "replace"),
            stderr=err.read().decode("utf-8", "replace"),
            extra=extra,
        )


def running(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child still runs, without reaping it (run_child reaps it, to read its rusage).

    Use this, never proc.poll(), inside a `while_running` callback.
    """
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def _wait4(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, resource.struct_rusage]:
    """Reap the child with its own rusage; SIGINT it after `timeout`, SIGKILL 30 s later."""
    deadline = time.monotonic() + timeout
    signalled = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            return status, usage
        now = time.monotonic()
        if now > deadline and not signalled:
            proc.send_signal(signal.SIGINT)
            signalled = True
            deadline = now + 30
        elif now > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            return status, usage
        time.sleep(0.005)


def batchhub_run_cmd(
    input_path: Path, job_dir: Path, base_url: str, concurrency: int, *extra: str, python: str | None = None
) -> list[str]:
    """`python -m batchhub run` as a user would type it, quiet, on the given endpoint."""
    return [
        python or sys.executable,
        "-m",
        "batchhub",
        "run",
        str(input_path),
        "--model",
        MODEL,
        "--base-url",
        base_url,
        "--api-key",
        API_KEY,
        "--job-dir",
        str(job_dir),
        "--concurrency",
        str(concurrency),
        "--quiet",
        *extra,
    ]


def check_ok(result: ChildResult, what: str, allowed: Sequence[int] = (0,)) -> None:
    if result.returncode not in allowed:
        raise SystemExit(
            f"{what} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )


def last_run(job_dir: Path) -> dict:
    """The record of the job's last run, from its job.json."""
    manifest = json.loads((job_dir / "job.json").read_text())
    return manifest["runs"][-1]


# -- a finished job written directly (the bills of cost and status) --------------------------------

#: results per part of a job written by `write_finished_job`
FINISHED_PART_ROWS = 5_000


def write_finished_job(job_dir: Path, n: int, spec: dict, extra: dict | None = None) -> None:
    """A finished job of `n` ok results of MODEL, written as its parts and job.json (no run needed): usage,
    latency and times drawn from a fixed seed; `extra` result columns (name -> Arrow array) added, and result
    columns neither here nor in `extra` left out of the parts (as a part from before they existed)."""
    import numpy as np
    import pyarrow as pa

    from batchhub.parts import write_part
    from batchhub.result_schema import RESULT_SCHEMA
    from batchhub.store import JobStore

    rng = np.random.default_rng(0)
    seq = np.arange(1, n + 1)
    columns: dict[str, pa.Array] = {
        "row_id": pa.array(np.arange(n)),
        "status": pa.array(np.full(n, "ok", dtype=object), pa.string()),
        "content": pa.array(np.full(n, "The sea is wide and restless.", dtype=object), pa.string()),
        "finish_reason": pa.array(np.full(n, "stop", dtype=object), pa.string()),
        "model": pa.array(np.full(n, MODEL, dtype=object), pa.string()),
        "prompt_tokens": pa.array(rng.integers(15, 40, n)),
        "completion_tokens": pa.array(rng.integers(4, 60, n)),
        "latency_s": pa.array(rng.lognormal(-2.0, 0.5, n)),
        "attempts": pa.array(np.ones(n, dtype=np.int32)),
        "rate_limit_retries": pa.array(np.zeros(n, dtype=np.int32)),
        "http_status": pa.array(np.full(n, 200, dtype=np.int32)),
        "finished_at": pa.array(1_767_225_600_000_000 + seq * 1_000).cast(pa.timestamp("us", tz="UTC")),
        "seq": pa.array(seq),
    }
    columns["total_tokens"] = pa.array(
        columns["prompt_tokens"].to_numpy() + columns["completion_tokens"].to_numpy()  # type: ignore[attr-defined]
    )
    added = extra or {}
    columns.update(added)
    optional = {"reused", "batch_id"}
    fields = [f for f in RESULT_SCHEMA if f.name not in optional or f.name in added]
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in fields]
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    results = job_dir / "results"
    results.mkdir(parents=True)
    for number, start in enumerate(range(0, n, FINISHED_PART_ROWS), 1):
        write_part(results / f"part-{number:06d}.parquet", table.slice(start, FINISHED_PART_ROWS))
    JobStore(job_dir).write_manifest(
        {
            "format_version": 1,
            "input": {"path": "input.csv", "rows": n},
            "spec": spec,
            "runs": [
                {
                    "batchhub_version": "0.1.0",
                    "started_at": "2026-01-01T00:00:00Z",
                    "ended_at": "2026-01-01T00:20:00Z",
                    "elapsed_s": 1200.0,
                }
            ],
        }
    )


def time_job_commands(
    work: Path, kinds: Sequence[str], commands: Sequence[str], build: Callable[[Path, str], None], repeat: int
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], dict]]:
    """Build a job of each kind under WORK (kept when there already), then time `batchhub CMD JOB --json` for
    every command and job, `repeat` times, the jobs in a new order each time: the wall times, and each
    command's last JSON answer, by (kind, command)."""
    t = time.perf_counter()
    dirs = {}
    for kind in kinds:
        dirs[kind] = work / kind.replace(" ", "-")
        if not (dirs[kind] / "job.json").exists():
            build(dirs[kind], kind)
    log(f"  built the {len(kinds)} jobs in {time.perf_counter() - t:.1f} s")
    walls: dict[tuple[str, str], list[float]] = {(kind, cmd): [] for kind in kinds for cmd in commands}
    answers: dict[tuple[str, str], dict] = {}
    for rep in range(repeat):
        for cmd in commands:
            for kind in order(rep, kinds):
                result = run_child([sys.executable, "-m", "batchhub", cmd, str(dirs[kind]), "--json"], timeout=600)
                check_ok(result, f"batchhub {cmd} of the job '{kind}'")
                walls[kind, cmd].append(result.wall_s)
                answers[kind, cmd] = json.loads(result.stdout)
        log(f"  repetition {rep + 1}/{repeat} done")
    return walls, answers
