"""The share of a job's CPU time spent checkpointing: journal lines, fsyncs, new segments, Parquet parts.

    python benchmarks/checkpoint.py            # 50,000 rows, default flush settings, 3 repetitions
    python benchmarks/checkpoint.py --smoke    # 2,000 rows, a part every 500 rows, once

Each repetition runs one job in a fresh process, in-process through
`batchhub.run_job` (quiet), against the simulator in its own process (no latency,
no limits). Before the job, the JobStore methods that write to the job directory
are wrapped with timers, each in the thread that calls it:

- journal append: `JobStore.append` (orjson.dumps of the row) and `JobStore.write_journal`
  (one os.write for the lines of all results finished in one event-loop pass), on the event loop
- journal fsync: `JobStore.fsync_journal` and `JobStore.close`, on the event loop
- new segment: `JobStore.open_segment` (open, fsync and close the previous one), on the event loop
- parts: `JobStore.compact` / `JobStore.write_part` (journal segment -> Arrow by pyarrow's
  JSON reader -> zstd Parquet, fsync, rename), in the worker thread the runner hands it to
- manifest and recovery: `JobStore.write_manifest`, `JobStore.recover`

A call nested in another wrapped call counts once, for the outer one. Per call
the CPU time of the calling thread (time.thread_time) and the wall time are
taken, less what the timers themselves cost (measured on a no-op first); the
job's CPU time is the process's user + system time (all threads) over `run_job`.
The share is checkpoint CPU / job CPU (the target is < 3%). The wall time the
event loop itself was blocked in checkpoint calls is shown too (an fsync costs
little CPU but stalls every request while it waits; so does waiting for the GIL
while the compaction thread holds it).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

CATEGORIES = {
    "append": "journal append",
    "write_journal": "journal append",
    "fsync_journal": "journal fsync",
    "close": "journal fsync",
    "open_segment": "new segment",
    "compact": "parts",
    "write_part": "parts",
    "write_manifest": "manifest and recovery",
    "recover": "manifest and recovery",
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(input_path: Path, job_dir: Path, base_url: str, concurrency: int, flush_rows: int | None) -> None:
    """Run one job with JobStore instrumented; print the figures as JSON."""
    import batchhub
    from batchhub import store as store_module

    cpu: dict[str, float] = collections.defaultdict(float)
    loop_wall: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    local = threading.local()
    main_thread = threading.main_thread()

    def wrap(name: str, fn: Any) -> Any:
        category = CATEGORIES[name]

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if getattr(local, "depth", 0):
                return fn(*args, **kwargs)
            local.depth = 1
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                c1, w1 = time.thread_time(), time.perf_counter()
                local.depth = 0
                cpu[category] += c1 - c0
                calls[category] += 1
                if threading.current_thread() is main_thread:
                    loop_wall[category] += w1 - w0

        return timed

    # what the timers themselves add to each call they time: measured on a no-op, then taken off
    CATEGORIES["_noop"] = "_noop"
    noop = wrap("_noop", lambda: None)
    for _ in range(20_000):
        noop()
    bias = cpu.pop("_noop") / calls.pop("_noop")
    loop_bias = loop_wall.pop("_noop") / 20_000
    del CATEGORIES["_noop"]

    for name in CATEGORIES:
        setattr(store_module.JobStore, name, wrap(name, getattr(store_module.JobStore, name)))

    options: dict[str, Any] = {}
    if flush_rows:
        options["flush_rows"] = flush_rows
    spec = batchhub.JobSpec(
        input=input_path,
        model=c.MODEL,
        base_url=base_url,
        api_key=c.API_KEY,
        job_dir=job_dir,
        concurrency=concurrency,
        quiet=True,
        **options,
    )
    cpu0, wall0 = _cpu(), time.perf_counter()
    summary = batchhub.run_job(spec)
    total_cpu, total_wall = _cpu() - cpu0, time.perf_counter() - wall0
    if summary.exit_code != 0:
        raise SystemExit(f"the job ended with exit code {summary.exit_code}: {summary.message}")
    parts = len(list((job_dir / "results").glob("part-*.parquet")))
    for category, n in calls.items():
        cpu[category] = max(0.0, cpu[category] - n * bias)
        if category in loop_wall:
            loop_wall[category] = max(0.0, loop_wall[category] - n * loop_bias)
    print(
        json.dumps(
            {
                "rows": summary.ok,
                "parts": parts,
                "total_cpu": total_cpu,
                "total_wall": total_wall,
                "cpu": cpu,
                "loop_wall": loop_wall,
                "calls": calls,
                "timer_bias_us": 1e6 * bias,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: 2,000 rows, parts of 500, once")
    parser.add_argument("--rows", type=int, help="rows in the input (default 50,000; smoke 2,000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--flush-rows", type=int, help="rows per part (default: batchhub's, 5,000; smoke 500)")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; smoke 1)")
    parser.add_argument("--workdir", help="keep the input and job directory here instead of a temp folder")
    parser.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        i, j, url, conc, flush = args._child
        child(Path(i), Path(j), url, int(conc), int(flush) or None)
        return
    rows = args.rows or (2_000 if args.smoke else 50_000)
    repeat = args.repeat or (1 if args.smoke else 3)
    flush_rows = args.flush_rows or (500 if args.smoke else 0)
    machine = c.machine_line()
    print(machine, flush=True)

    reports: list[dict[str, Any]] = []
    with c.workdir("batchhub-bench-checkpoint-", args.workdir) as work, c.Simulator() as sim:
        input_path = c.write_csv(work / "input.csv", rows)
        job_dir = work / "job"
        for rep in range(repeat):
            shutil.rmtree(job_dir, ignore_errors=True)
            cmd = [
                sys.executable,
                __file__,
                "--_child",
                str(input_path),
                str(job_dir),
                sim.base_url,
                str(args.concurrency),
                str(flush_rows),
            ]
            result = c.run_child(cmd, timeout=900)
            c.check_ok(result, "the instrumented job")
            report = json.loads(result.stdout.strip().splitlines()[-1])
            report["share"] = sum(report["cpu"].values()) / report["total_cpu"]
            reports.append(report)
            c.log(
                f"  run {rep + 1}/{repeat}: checkpointing {100 * report['share']:.2f}% of "
                f"{report['total_cpu']:.2f} s CPU ({report['rows']:,} rows, {report['parts']} parts)"
            )
        shutil.rmtree(job_dir, ignore_errors=True)

    # the repetition with the median share, so that its parts add up to the figure shown
    mid = sorted(reports, key=lambda r: r["share"])[len(reports) // 2]
    share = mid["share"]
    order = ["journal append", "journal fsync", "new segment", "parts", "manifest and recovery"]
    parts = ", ".join(f"{name} {100 * mid['cpu'].get(name, 0.0) / mid['total_cpu']:.2f}%" for name in order)
    blocked = sum(mid["loop_wall"].values())
    blocked_parts = ", ".join(f"{name} {1000 * secs:,.0f} ms" for name, secs in sorted(mid["loop_wall"].items()))
    runs = ", ".join(f"{100 * r['share']:.2f}%" for r in reports)
    flush_note = f"parts of {flush_rows:,} rows" if flush_rows else "default flush settings"
    c.print_block(
        "checkpoint",
        [
            machine,
            f"checkpoint: {100 * share:.2f}% of the job's CPU time spent checkpointing "
            f"({sum(mid['cpu'].values()):.2f} s of {mid['total_cpu']:.2f} s; median of {repeat}; {rows:,} rows, "
            f"{mid['parts']} parts, {flush_note}, concurrency {args.concurrency}; "
            f"runs: {runs})",
            f"checkpoint parts (share of the job's CPU): {parts}",
            f"checkpoint timers: {mid['timer_bias_us']:.2f} us of CPU a call, measured and taken off "
            f"({sum(mid['calls'].values()):,} calls timed)",
            f"checkpoint on the event loop: blocked {1000 * blocked:,.0f} ms of {mid['total_wall']:.1f} s "
            f"wall ({blocked_parts})",
            f"checkpoint target: under 3%: {'met' if share < 0.03 else 'NOT met'}",
        ],
    )


if __name__ == "__main__":
    main()
