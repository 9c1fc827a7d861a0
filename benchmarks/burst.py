"""Burst benchmark: a job told the limit, against a server that enforces its per-minute limit per second.

Each case runs `batchhub run` (a subprocess) against the simulator (`batchhub mock-server
--limit-window 1`, another subprocess): its bucket holds one second of the limit, starts full at
that and refills at limit / 60 a second, while its `x-ratelimit-*` headers speak of the minute, as
OpenAI documents (60,000 RPM may be enforced as 1,000 a second). The simulator's `/mock/stats` are
sampled every half second. For each case:

- the first minute: the 429s of the run's first `first_s` seconds (60 in the real run), counted
  apart, since that is where a job that bursts meets them;
- the steady state: over a window starting `settle_s` after the start, throughput = admitted
  units per second / (limit / 60), and 429s = rate-limit refusals / requests received.

Cases: RPM- and TPM-bound told the limit (`--rpm`, `--tpm`), RPM-bound told it per second
(`--rps`), all at the default burst (or `--burst`); and the RPM case with a minute's burst
(`--burst 60`, what every job did before bursts were settable), for comparison. Run from the
repository root:

    python benchmarks/burst.py             # the real measurement (~6 minutes)
    python benchmarks/burst.py --smoke     # tiny windows, proves it runs (~20 s)
    python benchmarks/burst.py --burst 0.5 --only rpm tpm
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _common import Simulator  # noqa: E402
from _sim import JobRun, Sample, Sampler, write_prompts  # noqa: E402

from batchhub import defaults  # noqa: E402

LATENCY_MS = 200.0
#: completion tokens the simulator answers with: uniform in 4..48
MEAN_COMPLETION_TOKENS = 26


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str  # "rpm" or "tpm": the limit the simulator enforces
    told: str  # the job's flag: "rpm", "tpm" or "rps"
    #: the job's --burst; None: the default (or the script's --burst)
    burst: float | None
    target_pct: float | None
    target_429_pct: float | None


CASES = (
    Case("rpm", "rpm per second, told --rpm", "rpm", "rpm", None, 99.0, 0.5),
    Case("tpm", "tpm per second, told --tpm", "tpm", "tpm", None, 99.0, 0.5),
    Case("rps", "rpm per second, told --rps", "rpm", "rps", None, 99.0, 0.5),
    Case("rpm-minute", "rpm per second, told --rpm, --burst 60", "rpm", "rpm", 60.0, None, None),
)


@dataclass(frozen=True)
class Scale:
    rpm: int  # simulator limit of the RPM cases (a multiple of 60, for --rps)
    tpm: int  # simulator limit of the TPM cases
    words: int  # words per prompt of the TPM case (the RPM cases use short prompts)
    first_s: float  # the "first minute": its 429s are counted apart
    settle_s: float  # the steady window starts this long after the first sample
    window_s: float  # length of the steady window
    interval_s: float  # stats sampling period
    concurrency: int


REAL = Scale(
    rpm=1800, tpm=300_000, words=280, first_s=60.0, settle_s=15.0, window_s=60.0, interval_s=0.5, concurrency=64
)
SMOKE = Scale(rpm=600, tpm=60_000, words=60, first_s=2.0, settle_s=1.0, window_s=2.0, interval_s=0.25, concurrency=32)


@dataclass
class Result:
    case: str
    label: str
    kind: str
    limit: int
    job_flags: list[str]
    throughput_pct: float = 0.0
    window_429_pct: float = 0.0
    window_429: int = 0
    first_429: int = 0
    first_requests: int = 0
    run_429_pct: float = 0.0
    window_s: float = 0.0
    failed_rows: int | None = None
    requests: int = 0
    rate_limited: int = 0
    notes: list[str] = field(default_factory=list)

    def met(self, case: Case) -> bool | None:
        if case.target_pct is None or case.target_429_pct is None:
            return None
        return self.throughput_pct >= case.target_pct and self.window_429_pct < case.target_429_pct and not self.notes


def job_flags(case: Case, limit: int, burst: float | None) -> list[str]:
    flags = [f"--{case.told}", str(limit // 60 if case.told == "rps" else limit)]
    chosen = case.burst if case.burst is not None else burst
    if chosen is not None:
        flags += ["--burst", f"{chosen:g}"]
    return flags


def rows_needed(scale: Scale, kind: str, limit: int) -> int:
    seconds = max(scale.first_s, scale.settle_s + scale.window_s) + 15
    units = limit / 60.0 * seconds * 1.5
    per_row = 1 if kind == "rpm" else scale.words + 12 + MEAN_COMPLETION_TOKENS
    return int(units / per_row) + 200


def run_case(case: Case, scale: Scale, burst: float | None, workdir: Path) -> Result:
    limit = scale.rpm if case.kind == "rpm" else scale.tpm
    flags = job_flags(case, limit, burst)
    res = Result(case.key, case.label, case.kind, limit, flags)
    input_path = workdir / f"{case.key}.csv"
    write_prompts(input_path, rows_needed(scale, case.kind, limit), 0 if case.kind == "rpm" else scale.words)
    sim_args = [f"--{case.kind}", str(limit), "--limit-window", "1", "--latency-ms", str(LATENCY_MS), "--seed", "1"]
    sim = Simulator(*sim_args)
    try:
        sampler = Sampler(sim, scale.interval_s)
        job = JobRun.start(
            input_path, workdir / f"{case.key}-job", sim.base_url, concurrency=scale.concurrency, options=tuple(flags)
        )
        try:
            samples = _wait(scale, sampler, job, res)
        finally:
            sampler.stop()
            job.stop()
        final = sim.stats()
    finally:
        sim.close()
    if samples:
        first = [s for s in samples if s.t <= scale.first_s][-1]
        res.first_429, res.first_requests = first.rate_limited, first.requests
        s0 = next(s for s in samples if s.t >= scale.settle_s)
        s1 = samples[-1]
        res.window_s = s1.t - s0.t
        res.throughput_pct = 100.0 * (s1.served(case.kind) - s0.served(case.kind)) / res.window_s / (limit / 60.0)
        res.window_429 = s1.rate_limited - s0.rate_limited
        res.window_429_pct = 100.0 * res.window_429 / max(1, s1.requests - s0.requests)
    res.requests, res.rate_limited = int(final["requests"]), int(final["rate_limited"])
    res.run_429_pct = 100.0 * res.rate_limited / max(1, res.requests)
    res.failed_rows = job.failed_rows()
    if job.returncode not in (0, 3):
        res.notes.append(f"job exited {job.returncode}: {job.stderr.strip()[-300:]}")
    return res


def _wait(scale: Scale, sampler: Sampler, job: JobRun, res: Result) -> list[Sample] | None:
    """Sample until both the first minute and the steady window are over; the samples."""
    end = max(scale.first_s, scale.settle_s + scale.window_s)
    deadline = time.monotonic() + end + 30
    while time.monotonic() < deadline:
        time.sleep(scale.interval_s / 2)
        samples = sampler.series()
        if not job.running():
            res.notes.append("the job ended before the window did")
            return None
        if samples[-1].t >= end:
            return samples
    res.notes.append("timed out")
    return None


def summary_line(r: Result) -> str:
    return (
        f"{r.label}: {r.throughput_pct:.1f}% of {r.limit:,} {r.kind}, {r.window_429_pct:.2f}% 429s; "
        f"first minute {r.first_429} 429s of {r.first_requests:,} requests"
    )


def detail_line(r: Result, case: Case) -> str:
    met = r.met(case)
    mark = "-" if met is None else "ok" if met else "MISSED"
    text = (
        f"[{mark:>6}] {r.case:<10} limit {r.limit:,} {r.kind} per second, job {' '.join(r.job_flags)}: "
        f"{r.throughput_pct:6.2f}% over {r.window_s:.1f}s, 429s {r.window_429} ({r.window_429_pct:.2f}%) in window, "
        f"{r.first_429} in the first {r.first_requests:,} requests, {r.rate_limited} of {r.requests:,} "
        f"({r.run_429_pct:.2f}%) in the run; failed rows {r.failed_rows}"
    )
    for note in r.notes:
        text += f"\n         note: {note}"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny limits and windows: proves it runs end to end")
    ap.add_argument("--only", nargs="+", choices=[c.key for c in CASES], help="run only these cases")
    ap.add_argument("--burst", type=float, help=f"the job's --burst in most cases (default {defaults.BURST_S:g})")
    ap.add_argument("--window", type=float, help="seconds of the steady window (default 60, smoke 2)")
    args = ap.parse_args(argv)
    scale = SMOKE if args.smoke else REAL
    if args.window:
        scale = Scale(**{**asdict(scale), "window_s": args.window})
    cases = [c for c in CASES if not args.only or c.key in args.only]
    from saturation import machine_info

    started = time.monotonic()
    print(f"machine: {machine_info()}", flush=True)
    print(
        f"mode: {'smoke' if args.smoke else 'real'}; simulator --limit-window 1, latency {LATENCY_MS:g} ms "
        f"(uniform 0.5x-1.5x); job --concurrency {scale.concurrency}, burst "
        f"{args.burst if args.burst is not None else defaults.BURST_S:g}s unless the case says; "
        f"first minute {scale.first_s:g}s; steady window {scale.window_s:g}s from {scale.settle_s:g}s",
        flush=True,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="batchhub-burst-") as tmp:
        for case in cases:
            r = run_case(case, scale, args.burst, Path(tmp))
            results.append(r)
            print(detail_line(r, case), flush=True)
    print(f"total time {time.monotonic() - started:.1f}s", flush=True)
    print()
    print(f"Bursts ({machine_info()}; per-second enforcement, latency {LATENCY_MS:g} ms, window {scale.window_s:g}s):")
    for r in results:
        print(summary_line(r))
    broken = [r for r in results if any("exited" in n or "timed out" in n for n in r.notes)]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
