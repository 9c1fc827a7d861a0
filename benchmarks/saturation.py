"""Saturation benchmark: how close does a job get to a server's rate limit, and at how many 429s?

Each case runs `batchhub run` (a subprocess) against the simulator (`batchhub mock-server`, another
subprocess) that enforces an RPM or TPM limit with some latency, samples the simulator's
`/mock/stats` every half second, and measures the steady part only:

- the simulator's bucket starts full (a minute's worth), and a job may spend part of it in its
  first seconds (a burst above the limit), or keep it unused for good (a job that paces from its
  start). The benchmark follows the simulator's bucket level from what it has admitted
  (level = min(limit, level + refill) - admitted) and starts the measuring window a few seconds
  after that first bucket-full has drained, or its level has stopped falling;
- over the window: throughput = admitted units per second / (limit / 60), and 429s = rate-limit
  refusals / requests received.

Cases: RPM- and TPM-bound with the right limit given; with a limit twice too high; and with no
limit given (the job learns it from the x-ratelimit-* headers). Run from the repository root:

    python benchmarks/saturation.py            # the real measurement (~7 minutes)
    python benchmarks/saturation.py --smoke    # tiny windows, proves it runs (~20 s)
    python benchmarks/saturation.py --only rpm-right tpm-right --window 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _sim import JobRun, Sample, Sampler, simulator, write_prompts  # noqa: E402

LATENCY_MS = 200.0
#: completion tokens the simulator answers with: uniform in 4..48
MEAN_COMPLETION_TOKENS = 26


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    kind: str  # "rpm" or "tpm": the limit the simulator enforces
    told: str  # "right", "2x" or "nothing"
    target_pct: float
    target_429_pct: float


CASES = (
    Case("rpm-right", "rpm-bound, told limit", "rpm", "right", 99.0, 0.5),
    Case("tpm-right", "tpm-bound, told limit", "tpm", "right", 99.0, 0.5),
    Case("rpm-2x", "rpm-bound, told 2x limit", "rpm", "2x", 0.0, 2.0),
    Case("tpm-2x", "tpm-bound, told 2x limit", "tpm", "2x", 0.0, 2.0),
    Case("rpm-none", "rpm-bound, told nothing", "rpm", "nothing", 95.0, 2.0),
    Case("tpm-none", "tpm-bound, told nothing", "tpm", "nothing", 95.0, 2.0),
)


@dataclass(frozen=True)
class Scale:
    rpm: int  # simulator limit of the RPM cases
    tpm: int  # simulator limit of the TPM cases
    words: int  # words per prompt of the TPM cases (the RPM cases use short prompts)
    window_s: float  # length of the measuring window
    settle_s: float  # wait after the first bucket-full drained, before the window starts
    max_drain_s: float  # start the window anyway if the bucket has not drained by then
    interval_s: float  # stats sampling period
    concurrency: int


REAL = Scale(
    rpm=1200, tpm=300_000, words=280, window_s=60.0, settle_s=3.0, max_drain_s=30.0, interval_s=0.5, concurrency=64
)
SMOKE = Scale(
    rpm=60, tpm=10_000, words=60, window_s=1.0, settle_s=0.25, max_drain_s=2.5, interval_s=0.25, concurrency=32
)


@dataclass
class Result:
    case: str
    label: str
    kind: str
    limit: int
    job_rpm: int | None
    job_tpm: int | None
    throughput_pct: float = 0.0
    window_429_pct: float = 0.0
    run_429_pct: float = 0.0
    window_s: float = 0.0
    drained_at_s: float | None = None
    level_at_start: float = 0.0
    level_at_end: float = 0.0
    failed_rows: int | None = None
    requests: int = 0
    rate_limited: int = 0
    notes: list[str] = field(default_factory=list)
    series: list[dict] = field(default_factory=list)

    def met(self, case: Case) -> bool:
        return (
            self.throughput_pct >= case.target_pct
            and self.window_429_pct < case.target_429_pct
            and (case.told != "2x" or self.failed_rows == 0)
            and not self.notes
        )


def bucket_levels(samples: list[Sample], kind: str, limit: int) -> list[float]:
    """The simulator's bucket level at each sample, from what it admitted (it starts full)."""
    rate = limit / 60.0
    levels: list[float] = []
    level, prev_t, prev_served = float(limit), samples[0].t, samples[0].served(kind)
    level -= prev_served
    for s in samples:
        # the refill is clamped after the charge: when admissions began inside this step, the bucket
        # refilled from then on, so this is an upper bound (the window never starts too early)
        level = min(float(limit), level + (s.t - prev_t) * rate - (s.served(kind) - prev_served))
        prev_t, prev_served = s.t, s.served(kind)
        levels.append(level)
    return levels


def rows_needed(scale: Scale, kind: str, limit: int) -> int:
    """Enough rows that the job cannot run out before the window ends."""
    seconds = scale.max_drain_s + scale.settle_s + scale.window_s + 10
    units = (limit + limit / 60.0 * seconds) * 1.5
    per_row = 1 if kind == "rpm" else scale.words + 12 + MEAN_COMPLETION_TOKENS
    return int(units / per_row) + 200


def run_case(case: Case, scale: Scale, workdir: Path, keep_series: bool) -> Result:
    limit = scale.rpm if case.kind == "rpm" else scale.tpm
    told = {"right": limit, "2x": 2 * limit, "nothing": None}[case.told]
    job_rpm = told if case.kind == "rpm" else None
    job_tpm = told if case.kind == "tpm" else None
    res = Result(case.key, case.label, case.kind, limit, job_rpm, job_tpm)
    input_path = workdir / f"{case.key}.csv"
    write_prompts(input_path, rows_needed(scale, case.kind, limit), 0 if case.kind == "rpm" else scale.words)
    sim_limits = {"rpm": limit, "tpm": None} if case.kind == "rpm" else {"rpm": None, "tpm": limit}
    with simulator(**sim_limits, latency_ms=LATENCY_MS) as sim:
        sampler = Sampler(sim, scale.interval_s)
        job = JobRun.start(
            input_path,
            workdir / f"{case.key}-job",
            sim.base_url,
            concurrency=scale.concurrency,
            rpm=job_rpm,
            tpm=job_tpm,
        )
        try:
            window = _measure(case, scale, limit, sampler, job, res)
        finally:
            sampler.stop()
            job.stop()
        final = sim.stats()
    if window is not None:
        s0, s1, levels, samples = window
        res.window_s = s1.t - s0.t
        res.throughput_pct = 100.0 * (s1.served(case.kind) - s0.served(case.kind)) / res.window_s / (limit / 60.0)
        d_requests = s1.requests - s0.requests
        res.window_429_pct = 100.0 * (s1.rate_limited - s0.rate_limited) / max(1, d_requests)
        if keep_series:
            res.series = [{**asdict(s), "level": round(lv, 1)} for s, lv in zip(samples, levels, strict=True)]
    res.requests, res.rate_limited = int(final["requests"]), int(final["rate_limited"])
    res.run_429_pct = 100.0 * res.rate_limited / max(1, res.requests)
    res.failed_rows = job.failed_rows()
    if job.returncode not in (0, 3):
        res.notes.append(f"job exited {job.returncode}: {job.stderr.strip()[-300:]}")
    return res


def _measure(
    case: Case, scale: Scale, limit: int, sampler: Sampler, job: JobRun, res: Result
) -> tuple[Sample, Sample, list[float], list[Sample]] | None:
    """Wait for the drain, then for the window; return its first and last samples."""
    threshold = 0.02 * limit
    flat_for = max(2.0, 8 * scale.interval_s)
    start_at: float | None = None
    deadline = time.monotonic() + scale.max_drain_s + scale.settle_s + scale.window_s + 30
    while time.monotonic() < deadline:
        time.sleep(scale.interval_s / 2)
        samples = sampler.series()
        if not job.running():
            res.notes.append("the job ended before the window did")
            return None
        if start_at is None:
            levels = bucket_levels(samples, case.kind, limit)
            drained = _drained_at(samples, levels, case.kind, limit, threshold, flat_for)
            if drained is not None:
                res.drained_at_s = round(drained, 2)
                start_at = drained + scale.settle_s
            elif samples[-1].t >= scale.max_drain_s:
                res.notes.append(f"the first bucket-full had not drained after {scale.max_drain_s:.0f}s")
                start_at = samples[-1].t
        if start_at is not None and samples[-1].t >= start_at + scale.window_s:
            levels = bucket_levels(samples, case.kind, limit)
            i0 = next(i for i, s in enumerate(samples) if s.t >= start_at)
            i1 = len(samples) - 1
            res.level_at_start, res.level_at_end = round(levels[i0], 1), round(levels[i1], 1)
            return samples[i0], samples[i1], levels, samples
    res.notes.append("timed out")
    return None


def _drained_at(
    samples: list[Sample], levels: list[float], kind: str, limit: int, threshold: float, flat_for: float
) -> float | None:
    """When the first bucket-full is spent: the level is (nearly) empty, or has stopped falling.

    A job can keep part of the bucket unused for good (say, a reservation it counts twice, or a
    job that paces from its start after one short burst); then the burst is over once the level
    stays flat while the job sends, and the window measures the steady rate all the same.
    """
    for i, (s, lv) in enumerate(zip(samples, levels, strict=True)):
        if lv <= threshold:
            return s.t
        j = next((k for k in range(i, -1, -1) if samples[k].t <= s.t - flat_for), None)
        sending = j is not None and samples[j].served(kind) > 0
        if sending and max(levels[j : i + 1]) - min(levels[j : i + 1]) <= 0.01 * limit:
            return s.t
    return None


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, Python {platform.python_version()} ({platform.system()} {platform.release()})"


def unit(kind: str) -> str:
    return "rpm" if kind == "rpm" else "tpm"


def summary_line(r: Result) -> str:
    line = f"{r.label}: {r.throughput_pct:.1f}% of {r.limit:,} {unit(r.kind)}, {r.window_429_pct:.1f}% 429s"
    if r.case.endswith("-2x"):
        line += f", {r.failed_rows if r.failed_rows is not None else '?'} failed rows"
    return line


def detail_line(r: Result, case: Case) -> str:
    told = f"job --{r.kind} {r.job_rpm or r.job_tpm:,}" if (r.job_rpm or r.job_tpm) else "job told nothing"
    mark = "ok" if r.met(case) else "MISSED"
    text = (
        f"[{mark:>6}] {r.case:<9} limit {r.limit:,} {unit(r.kind)} ({told}): "
        f"{r.throughput_pct:6.2f}% over {r.window_s:.1f}s, 429s {r.window_429_pct:.2f}% in window / "
        f"{r.run_429_pct:.2f}% of the run ({r.rate_limited} of {r.requests} requests), "
        f"drained at {r.drained_at_s if r.drained_at_s is not None else '-'}s, "
        f"bucket level {r.level_at_start:g} -> {r.level_at_end:g}, failed rows {r.failed_rows}"
    )
    for note in r.notes:
        text += f"\n         note: {note}"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny limits and windows: proves it runs end to end")
    ap.add_argument("--only", nargs="+", choices=[c.key for c in CASES], help="run only these cases")
    ap.add_argument("--window", type=float, help="seconds of the measuring window (default 60, smoke 1)")
    ap.add_argument("--concurrency", type=int, help="job --concurrency (default 64, smoke 32)")
    ap.add_argument("--json", type=Path, help="also write the results and time series to this file")
    args = ap.parse_args(argv)
    scale = SMOKE if args.smoke else REAL
    if args.window:
        scale = Scale(**{**asdict(scale), "window_s": args.window})
    if args.concurrency:
        scale = Scale(**{**asdict(scale), "concurrency": args.concurrency})
    cases = [c for c in CASES if not args.only or c.key in args.only]
    started = time.monotonic()
    print(f"machine: {machine_info()}", flush=True)
    print(
        f"mode: {'smoke' if args.smoke else 'real'}; simulator latency {LATENCY_MS:g} ms (uniform 0.5x-1.5x); "
        f"job --concurrency {scale.concurrency}; window {scale.window_s:g}s after the first bucket-full drained "
        f"+ {scale.settle_s:g}s",
        flush=True,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="batchhub-saturation-") as tmp:
        for case in cases:
            r = run_case(case, scale, Path(tmp), keep_series=args.json is not None)
            results.append(r)
            print(detail_line(r, case), flush=True)
    print(f"total time {time.monotonic() - started:.1f}s", flush=True)
    print()
    print(f"Saturation ({machine_info()}; simulator latency {LATENCY_MS:g} ms, steady window {scale.window_s:g}s):")
    for r in results:
        print(summary_line(r))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine_info(), "scale": asdict(scale), "results": [asdict(r) for r in results]}, indent=1
            )
        )
    broken = [r for r in results if r.notes and any("exited" in n or "timed out" in n for n in r.notes)]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
