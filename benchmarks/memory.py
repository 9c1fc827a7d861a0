"""Peak memory of a job against the size of its input: 100,000 rows vs 1,000,000 rows.

    python benchmarks/memory.py            # 100k and 1M rows, 3 interleaved repetitions, 1M runs capped at 45 s
    python benchmarks/memory.py --full     # let the 1M job finish (about 6 minutes a run on 2 cores)
    python benchmarks/memory.py --smoke    # 1,000 and 5,000 rows, once

Each job is `python -m batchhub run INPUT.csv --quiet` in a fresh process and a
fresh job directory, against the simulator in its own process (no latency, no
limits), at a high concurrency. Its peak resident set size is the kernel's
(wait4's ru_maxrss of that one child); /proc is also polled to tell when the
peak was reached.

A job that has not finished after --max-seconds is stopped with SIGINT (as
Ctrl-C: requests in flight finish, everything is written down); its peak then
covers start-up (row count, fingerprint, first input blocks) and that many
seconds of steady state, and the block says how many rows it had done.
Targets: the 1M job under 300 MB, and within 20% of the 100k job.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c


def _rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def watch(max_seconds: float):  # type: ignore[no-untyped-def]
    """A `while_running` callback: sample RSS every 0.25 s; SIGINT the job after max_seconds."""

    def callback(proc: subprocess.Popen[bytes], t0: float) -> dict:
        samples: list[tuple[float, int]] = []
        stopped_at = None
        while c.running(proc):
            now = time.perf_counter() - t0
            rss = _rss_kib(proc.pid)
            if rss is not None:
                samples.append((now, rss))
            if stopped_at is None and now >= max_seconds:
                proc.send_signal(2)  # SIGINT: a graceful stop, as Ctrl-C
                stopped_at = now
            time.sleep(0.25)
        return {"samples": samples, "stopped_at": stopped_at}

    return callback


def run_job(input_path: Path, job_dir: Path, base_url: str, concurrency: int, max_seconds: float) -> dict:
    shutil.rmtree(job_dir, ignore_errors=True)
    result = c.run_child(
        c.batchhub_run_cmd(input_path, job_dir, base_url, concurrency),
        timeout=max_seconds + 120,
        while_running=watch(max_seconds),
    )
    info = result.extra
    assert isinstance(info, dict)
    stopped = info["stopped_at"] is not None
    c.check_ok(result, "batchhub run", allowed=(0, 3) if stopped else (0,))
    run = c.last_run(job_dir)
    samples = info["samples"]
    peak_t = max(samples, key=lambda s: s[1])[0] if samples else float("nan")
    shutil.rmtree(job_dir, ignore_errors=True)
    return {
        "maxrss": result.maxrss_kib,
        "wall": result.wall_s,
        "done": int(run.get("results") or 0),
        "stopped": stopped,
        "peak_t": peak_t,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: 1,000 and 5,000 rows, once")
    parser.add_argument("--small", type=int, help="rows of the small input (default 100,000)")
    parser.add_argument("--large", type=int, help="rows of the large input (default 1,000,000)")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--repeat", type=int, help="interleaved repetitions (default 3; smoke 1)")
    parser.add_argument("--max-seconds", type=float, help="stop a job still running after this (default 45)")
    parser.add_argument("--full", action="store_true", help="no time limit: every job runs to its end")
    parser.add_argument("--workdir", help="keep the inputs here instead of a temp folder")
    args = parser.parse_args()
    small = args.small or (1_000 if args.smoke else 100_000)
    large = args.large or (5_000 if args.smoke else 1_000_000)
    repeat = args.repeat or (1 if args.smoke else 3)
    max_seconds = 3600.0 if args.full else (args.max_seconds or 45.0)
    machine = c.machine_line()
    print(machine, flush=True)

    results: dict[int, list[dict]] = collections.defaultdict(list)
    with c.workdir("batchhub-bench-memory-", args.workdir) as work, c.Simulator() as sim:
        inputs = {n: c.write_csv(work / f"input-{n}.csv", n) for n in (small, large)}
        for rep in range(repeat):
            for n in c.order(rep, [small, large]):
                r = run_job(inputs[n], work / "job", sim.base_url, args.concurrency, max_seconds)
                results[n].append(r)
                how = f"stopped after {r['wall']:.0f} s" if r["stopped"] else f"finished in {r['wall']:.0f} s"
                c.log(
                    f"  run {rep + 1}/{repeat} {n:,} rows: peak RSS {c.mb(r['maxrss'])} "
                    f"(reached at {r['peak_t']:.1f} s), {r['done']:,} rows done, {how}"
                )

    def med(n: int, key: str) -> float:
        return c.median([r[key] for r in results[n]])

    def how(n: int) -> str:
        stopped = [r for r in results[n] if r["stopped"]]
        if stopped:
            return (
                f"stopped by SIGINT after {med(n, 'wall'):.0f} s with {med(n, 'done'):,.0f} rows done "
                f"({100 * med(n, 'done') / n:.0f}%): its peak so far, a lower bound for the complete job (--full)"
            )
        return f"complete job, {med(n, 'wall'):.0f} s"

    peak_small, peak_large = med(small, "maxrss"), med(large, "maxrss")
    ratio = peak_large / peak_small
    ok_abs = peak_large < 300 * 1024
    ok_rel = ratio <= 1.2
    partial = any(r["stopped"] for rs in results.values() for r in rs)

    def verdict(ok: bool) -> str:
        return ("met" if ok else "NOT met") + (" (so far: a job was stopped)" if partial and ok else "")

    c.print_block(
        "memory",
        [
            machine,
            f"memory: peak RSS {c.mb(peak_large)} at {large:,} rows, {c.mb(peak_small)} at {small:,} rows, "
            f"ratio {ratio:.2f} (median of {repeat}; CSV input, concurrency {args.concurrency}, simulator in its own "
            "process, no latency)",
            f"memory {large:,} rows: {how(large)}; peak reached at {med(large, 'peak_t'):.1f} s",
            f"memory {small:,} rows: {how(small)}; peak reached at {med(small, 'peak_t'):.1f} s",
            f"memory targets: {large:,} rows under 300 MB: {verdict(ok_abs)}; "
            f"within 20% of {small:,} rows: {verdict(ok_rel)}",
        ],
    )


if __name__ == "__main__":
    main()
