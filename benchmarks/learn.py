"""Learning benchmark: told nothing, how close does a job get to a limit it learns from 429s alone?

Each case runs `batchhub run` (a subprocess, told no limit) against the simulator (`batchhub
mock-server`, another subprocess) enforcing an RPM limit with some latency, samples the
simulator's `/mock/stats` every half second, and reports per 10 s window the requests it
admitted as a share of the limit then in force:

- bare: the server sends neither `x-ratelimit-*` headers nor Retry-After (bare 429s), so the
  job has only the 429s to learn from;
- headers: the same server sending both (an OpenAI-like server), the job paces itself by them;
- each steady (one limit) and changing (the limit lowered to half, then raised back, mid-run).

The simulator's bucket starts full (a minute's worth), so the first seconds are a burst far
above the limit, whoever the client; learning starts at the first 429. Figures per case: the
share of the limit in each window, when the job was at >= 90% of the limit for good after the
first 429 and after each change, and the 429s over the whole run. Run from the repository root:

    python benchmarks/learn.py            # the real measurement (~12 minutes)
    python benchmarks/learn.py --smoke    # small and short, proves it runs (~1 minute)
    python benchmarks/learn.py --only bare-steady headers-steady
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]

from _common import Simulator, machine_line  # noqa: E402
from _sim import JobRun, Sample, Sampler, write_prompts  # noqa: E402

LATENCY_MS = 200.0


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    bare: bool  # no x-ratelimit-* headers, no Retry-After
    changing: bool  # the limit is lowered to half, then raised back


CASES = (
    Case("bare-steady", "bare 429s, steady limit", True, False),
    Case("headers-steady", "headers, steady limit", False, False),
    Case("bare-changing", "bare 429s, limit lowered then raised", True, True),
    Case("headers-changing", "headers, limit lowered then raised", False, True),
)


@dataclass(frozen=True)
class Scale:
    rpm: int
    steady_s: float  # length of a steady case
    lower_at_s: float  # a changing case: the limit is halved then...
    raise_at_s: float  # ...raised back then...
    changing_s: float  # ...and the case ends then
    window_s: float  # the shares are given per window of this length
    settled_s: float  # the mean share is of the windows from this time on (before any change)
    interval_s: float
    concurrency: int


REAL = Scale(
    rpm=1200,
    steady_s=150,
    lower_at_s=90,
    raise_at_s=150,
    changing_s=240,
    window_s=10,
    settled_s=60,
    interval_s=0.5,
    concurrency=32,
)
SMOKE = Scale(
    rpm=300,
    steady_s=6,
    lower_at_s=4,
    raise_at_s=7,
    changing_s=10,
    window_s=2,
    settled_s=2,
    interval_s=0.25,
    concurrency=16,
)


@dataclass
class Result:
    case: str
    label: str
    limit: int
    seconds: float
    #: (window start, limit then, % of it admitted, 429s in it)
    windows: list[tuple[float, int, float, int]] = field(default_factory=list)
    first_429_s: float | None = None
    #: seconds from the first 429 (or a change) to the start of the window from which every window of that
    #: limit was >= 90% of it; None when never, or when no 429 came before the first change
    to_90: list[float | None] = field(default_factory=list)
    requests: int = 0
    rate_limited: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def pct_429(self) -> float:
        return 100.0 * self.rate_limited / max(1, self.requests)


def schedule(case: Case, scale: Scale) -> list[tuple[float, int]]:
    """The limit's changes after the start: [(seconds, rpm), ...]."""
    if not case.changing:
        return []
    return [(scale.lower_at_s, scale.rpm // 2), (scale.raise_at_s, scale.rpm)]


def limit_at(t: float, case: Case, scale: Scale) -> int:
    limit = scale.rpm
    for at, rpm in schedule(case, scale):
        if t >= at:
            limit = rpm
    return limit


def run_case(case: Case, scale: Scale, workdir: Path) -> Result:
    seconds = scale.changing_s if case.changing else scale.steady_s
    res = Result(case.key, case.label, scale.rpm, seconds)
    rows = int(scale.rpm + scale.rpm / 60 * seconds * 1.5) + 200  # more than the job can finish
    input_path = workdir / f"{case.key}.csv"
    write_prompts(input_path, rows, 0)
    args = ["--rpm", str(scale.rpm), "--latency-ms", str(LATENCY_MS), "--seed", "1"]
    if case.bare:
        args += ["--no-ratelimit-headers", "--no-retry-after"]
    for at, rpm in schedule(case, scale):
        args += ["--rpm-schedule", f"{at:g}={rpm}"]
    sim = Simulator(*args)  # the schedule's clock starts with the simulator, the job a moment later
    try:
        sampler = Sampler(sim, scale.interval_s)
        job = JobRun.start(input_path, workdir / f"{case.key}-job", sim.base_url, concurrency=scale.concurrency)
        try:
            while sampler.latest().t < seconds and job.running():
                time.sleep(scale.interval_s)
            if not job.running():
                res.notes.append("the job ended before the case did")
        finally:
            sampler.stop()
            job.stop()
        final = sim.stats()
    finally:
        sim.close()
    if job.returncode not in (0, 3, 130):
        res.notes.append(f"job exited {job.returncode}: {job.stderr.strip()[-300:]}")
    res.requests, res.rate_limited = int(final["requests"]), int(final["rate_limited"])
    _figures(res, case, scale, sampler.series())
    return res


def _figures(res: Result, case: Case, scale: Scale, samples: list[Sample]) -> None:
    """The shares per window, the first 429, and the time to 90% after it and after each change."""
    res.first_429_s = next((s.t for s in samples if s.rate_limited > 0), None)

    def at(t: float) -> Sample:
        return next((s for s in samples if s.t >= t), samples[-1])

    window = scale.window_s
    t = 0.0
    while t + window <= res.seconds + 1e-9:
        s0, s1 = at(t), at(t + window)
        limit = limit_at(t, case, scale)
        span = max(1e-9, s1.t - s0.t)
        pct = 100.0 * (s1.completions - s0.completions) / span / (limit / 60)
        res.windows.append((t, limit, round(pct, 1), s1.rate_limited - s0.rate_limited))
        t += window
    changes = [at_s for at_s, _ in schedule(case, scale)]
    ends = [*changes, res.seconds]
    first_429 = res.first_429_s if res.first_429_s is not None and res.first_429_s < ends[0] else None
    starts = [first_429, *changes]
    for start, end in zip(starts, ends, strict=True):
        if start is None:  # the job never met the limit before it changed: nothing to learn there
            res.to_90.append(None)
            continue
        phase = [w for w in res.windows if w[0] >= start - window and w[0] + window <= end + 1e-9]
        good = None
        for i in range(len(phase)):
            if all(w[2] >= 90.0 for w in phase[i:]):
                good = phase[i][0]
                break
        res.to_90.append(None if good is None else round(max(0.0, good - start), 1))


def _phase_names(case: Case) -> list[str]:
    return ["after the first 429", "after the lowering", "after the raise"][: 3 if case.changing else 1]


def detail_lines(r: Result, case: Case) -> list[str]:
    lines = [
        f"{r.case}: {r.label}; limit {r.limit:,} rpm"
        + (f" (halved at {SCALE.lower_at_s:g}s, back at {SCALE.raise_at_s:g}s)" if case.changing else "")
        + f"; first 429 at {r.first_429_s if r.first_429_s is not None else '-'}s"
    ]
    lines.append(
        f"  % of the limit per {SCALE.window_s:g} s window (429s): "
        + " ".join(f"{w[2]:.0f}({w[3]})" for w in r.windows)
    )
    for note in r.notes:
        lines.append(f"  note: {note}")
    return lines


def summary_line(r: Result, case: Case) -> str:
    no_429 = r.first_429_s is None or (case.changing and r.first_429_s >= SCALE.lower_at_s)
    names = _phase_names(case)
    reached = ", ".join(
        "no 429 at first (nothing to learn)" if i == 0 and no_429 else f"{'never' if t is None else f'{t:g}s'} {name}"
        for i, (name, t) in enumerate(zip(names, r.to_90, strict=False))
    )
    steady = [
        w[2]
        for w in r.windows
        if w[0] >= SCALE.settled_s and (not case.changing or w[0] + SCALE.window_s <= SCALE.lower_at_s)
    ]
    since = f"{SCALE.settled_s:g} s"
    mean = f"{sum(steady) / len(steady):.1f}% of the limit from {since}" if steady else f"no window from {since}"
    return (
        f"{r.label}: {mean}; >= 90% for good: {reached}; "
        f"{r.pct_429:.2f}% 429s ({r.rate_limited} of {r.requests} requests)"
    )


SCALE = REAL


def main(argv: list[str] | None = None) -> int:
    global SCALE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a small, short run: proves it runs end to end")
    ap.add_argument("--only", nargs="+", choices=[c.key for c in CASES], help="run only these cases")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args(argv)
    SCALE = SMOKE if args.smoke else REAL
    cases = [c for c in CASES if not args.only or c.key in args.only]
    started = time.monotonic()
    print(machine_line(), flush=True)
    print(
        f"mode: {'smoke' if args.smoke else 'real'}; simulator limit {SCALE.rpm:,} rpm (a minute-deep bucket, "
        f"starting full), latency {LATENCY_MS:g} ms; job told nothing, --concurrency {SCALE.concurrency}",
        flush=True,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="batchhub-learn-") as tmp:
        for case in cases:
            r = run_case(case, SCALE, Path(tmp))
            results.append(r)
            for line in detail_lines(r, case):
                print(line, flush=True)
    print(f"total time {time.monotonic() - started:.1f}s", flush=True)
    print()
    print(f"Learning ({SCALE.rpm:,} rpm, latency {LATENCY_MS:g} ms, job told nothing):")
    for r, case in zip(results, cases, strict=True):
        print(summary_line(r, case))
    if args.json:
        args.json.write_text(json.dumps({"scale": asdict(SCALE), "results": [asdict(r) for r in results]}, indent=1))
    broken = [r for r in results if any("exited" in n for n in r.notes)]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
