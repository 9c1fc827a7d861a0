"""Capacity benchmark: `--concurrency auto` against servers that serve N requests at once.

Each run is `batchhub run` (a subprocess) against a fresh simulator (`batchhub mock-server`, another
subprocess) and is measured on the simulator's side: the completions it served per second over a
window that starts `settle` seconds after the job did (its start-up and the first rounds of
`auto` are outside it; `from start` counts them too), the mean wait in the server's queue over
that window, its peak queue over the whole run, and the requests that took longer than their
timeout (`timeouts`: a client that gave up while queued or while answered; an answer whose
client left is not counted as served) or were refused (503s).

Servers:

- capacity N = 16 and N = 64, latency 200 ms (uniform +-50%) x (1 + 0.5 x served/N): a batching
  server 1.5x slower at its full batch. Fixed concurrencies 4 .. 256 and auto, side by side; the
  figure is auto / the best fixed (target >= 0.9);
- the same server of capacity 16 with a client timeout of 2 s: the largest fixed concurrency
  (its queue is longer than that) and auto;
- no capacity, a 1,200 RPM limit, latency 200 ms: the default (32) and auto, told the limit and
  told nothing (is auto a good default?), measured from 65 s on: the simulator's bucket starts a
  minute's worth full, and that first burst is not what is compared here.

    python benchmarks/capacity.py            # the real measurement (~10 minutes)
    python benchmarks/capacity.py --smoke    # tiny windows, proves it runs (~30 s)
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _common import API_KEY, MODEL, REPO, Simulator, child_env, machine_line, print_block, workdir, write_csv  # noqa: E402

#: how long a stopped job may take to exit before it is killed
STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Scale:
    capacities: tuple[int, ...]
    fixed: tuple[int, ...]
    latency_ms: float
    slowdown: float
    rpm: int
    rows: int
    settle_s: float
    window_s: float
    #: the rate-limited server's bucket starts a minute's worth full: its window starts after that minute
    rate_settle_s: float
    #: a client timeout shorter than the queue a large fixed concurrency builds (first capacity only)
    short_timeout_s: float


REAL = Scale(
    capacities=(16, 64),
    fixed=(4, 8, 16, 32, 64, 128, 256),
    latency_ms=200.0,
    slowdown=0.5,
    rpm=1200,
    rows=20_000,
    settle_s=8.0,
    window_s=20.0,
    rate_settle_s=65.0,
    short_timeout_s=2.0,
)
SMOKE = Scale(
    capacities=(4,),
    fixed=(2, 8),
    latency_ms=50.0,
    slowdown=0.5,
    rpm=600,
    rows=2_000,
    settle_s=2.0,
    window_s=1.5,
    rate_settle_s=2.0,
    short_timeout_s=0.3,
)


@dataclass
class Run:
    server: str
    concurrency: str
    told_rpm: int | None
    timeout_s: float | None
    per_s: float  # completions per second over the window
    per_s_from_start: float  # ... from the job's start to the window's end
    queue_wait_ms: float  # mean wait in the server's queue of the window's completions
    peak_queue: int
    timeouts: int  # requests whose client gave up while they waited
    refused: int  # 503s (a full queue) and 429s (a rate limit)
    requests: int


def measure(
    sim_args: list[str],
    server: str,
    concurrency: str,
    input_path: Path,
    workdir_: Path,
    scale: Scale,
    rpm: int | None = None,
    settle_s: float | None = None,
    timeout_s: float | None = None,
) -> Run:
    """One job against a fresh simulator, measured over [settle, settle + window] of the job's life."""
    with Simulator(*sim_args) as sim:
        job_dir = workdir_ / f"job-{server.replace(' ', '_').replace(',', '')}-{concurrency}-{rpm or 0}-{timeout_s}"
        cmd = [sys.executable, "-m", "batchhub", "run", str(input_path), "--model", MODEL, "--base-url", sim.base_url]
        cmd += ["--api-key", API_KEY, "--job-dir", str(job_dir), "--concurrency", concurrency, "--quiet"]
        if rpm:
            cmd += ["--rpm", str(rpm)]
        if timeout_s:
            cmd += ["--timeout", str(timeout_s)]
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO
        )
        try:
            time.sleep(scale.settle_s if settle_s is None else settle_s)
            first, t1 = sim.stats(), time.monotonic()
            time.sleep(scale.window_s)
            last, t2 = sim.stats(), time.monotonic()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate(timeout=10)
        if proc.returncode not in (0, 1, 3, -signal.SIGINT, 130):
            raise SystemExit(f"batchhub run exited {proc.returncode}: {err[-2000:]}")
        end = sim.stats()
    served = answered(last) - answered(first)
    waited = last["queue_wait_s"] - first["queue_wait_s"]
    by_status = end["by_status"]
    return Run(
        server=server,
        concurrency=concurrency,
        told_rpm=rpm,
        timeout_s=timeout_s,
        per_s=served / (t2 - t1),
        per_s_from_start=answered(last) / (t2 - t0),
        queue_wait_ms=1000 * waited / served if served else 0.0,
        peak_queue=int(end["max_queue_length"]),
        timeouts=int(end["queue_abandoned"]) + int(end["service_abandoned"]),
        refused=int(by_status.get("503", 0)) + int(by_status.get("429", 0)),
        requests=int(end["requests"]),
    )


def answered(stats: dict) -> int:
    """Completions whose client was still there at the end (a client that timed out mid-answer is not served)."""
    return int(stats["completions"]) - int(stats["service_abandoned"])


def row(run: Run, best: float | None = None) -> str:
    ratio = f"  {run.per_s / best:5.2f} of best" if best else ""
    return (
        f"  concurrency {run.concurrency:>4}: {run.per_s:7.1f}/s ({run.per_s_from_start:6.1f}/s from start){ratio}, "
        f"queue wait {run.queue_wait_ms:6.0f} ms, peak queue {run.peak_queue:4d}, "
        f"timeouts {run.timeouts}, refused {run.refused}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny windows: proves it runs")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument("--keep", help="keep the job directories in this folder")
    args = parser.parse_args()
    scale = SMOKE if args.smoke else REAL
    print(machine_line(), flush=True)
    runs: list[Run] = []
    lines: list[str] = []
    with workdir("batchhub-capacity-", args.keep) as work:
        data = write_csv(work / "in.csv", scale.rows)
        for capacity in scale.capacities:
            server = f"capacity {capacity}"
            sim_args = ["--capacity", str(capacity), "--latency-ms", str(scale.latency_ms)]
            sim_args += ["--capacity-slowdown", str(scale.slowdown), "--seed", "1"]
            these = []
            for concurrency in [*map(str, scale.fixed), "auto"]:
                run = measure(sim_args, server, concurrency, data, work, scale)
                print(row(run), flush=True)
                these.append(run)
            best = max(r.per_s for r in these if r.concurrency != "auto")
            auto = these[-1]
            lines.append(f"{server}, {scale.latency_ms:.0f} ms x (1 + {scale.slowdown} x served/{capacity}):")
            lines += [row(r, best) for r in these]
            lines.append(
                f"capacity {capacity}: auto / best fixed = {auto.per_s / best:.2f} (target >= 0.9), "
                f"timeouts {auto.timeouts}, peak queue {auto.peak_queue}"
            )
            runs += these
            if capacity == scale.capacities[0]:
                lines.append(f"{server}, client timeout {scale.short_timeout_s:g} s:")
                for concurrency in (str(max(scale.fixed)), "auto"):
                    run = measure(sim_args, server, concurrency, data, work, scale, timeout_s=scale.short_timeout_s)
                    print(row(run), flush=True)
                    runs.append(run)
                    lines.append(row(run, best))
        server = f"no capacity, {scale.rpm} rpm"
        sim_args = ["--rpm", str(scale.rpm), "--latency-ms", str(scale.latency_ms), "--seed", "1"]
        lines.append(f"{server}, {scale.latency_ms:.0f} ms (the limit's rate: {scale.rpm / 60:.1f}/s):")
        for told in (scale.rpm, None):
            for concurrency in ("32", "auto"):
                run = measure(sim_args, server, concurrency, data, work, scale, rpm=told, settle_s=scale.rate_settle_s)
                print(row(run), flush=True)
                runs.append(run)
                told_text = f"told {told} rpm" if told else "told nothing"
                lines.append(
                    f"  {told_text}, concurrency {concurrency:>4}: {run.per_s / (scale.rpm / 60):6.1%} of the limit, "
                    f"{run.refused / max(1, run.requests):.1%} 429s"
                )
    print_block(f"Capacity ({'smoke' if args.smoke else 'real'}: {scale.window_s:.0f} s windows)", lines)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2))


if __name__ == "__main__":
    main()
