"""How a job's cost grows with its rows, its concurrency and the size of its prompts.

    python benchmarks/growth.py            # three sweeps, 3 interleaved repetitions, writes docs/performance-growth.png
    python benchmarks/growth.py --smoke    # tiny sweeps, once; the plot goes to the temp folder
    python benchmarks/growth.py --only concurrency --repeat 5

Each point is one `python -m batchhub run INPUT.csv --quiet` in a fresh process and a
fresh job directory, against the simulator in its own process on 127.0.0.1 with no
limits. The sweeps:

- rows: 2,000, 10,000 and 50,000 short prompts (~45 characters), concurrency 64, no latency;
- concurrency: 8, 32, 128 and 512, on 5,000 short prompts, with 20 ms of latency (uniform
  10-30 ms) so that the number of requests in flight matters;
- prompt size: 100, 1,000 and 10,000 characters a prompt, 5,000 rows, concurrency 64, no latency.

Per point: the job's CPU time (user + system, every thread, from wait4) per 1,000 rows,
start-up included; rows per second end to end (process start to exit) and in the loop
(the run's `elapsed_s` in job.json: without imports, row count and fingerprint); and the
job's peak resident set size (wait4's ru_maxrss, that one process). Each figure is the
median of the repetitions; within a repetition the points run in one order, in the next
in the reverse order, so that a slow patch of a shared machine does not land on one end
of a sweep.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

PLOT = c.REPO / "docs" / "performance-growth.png"
#: --smoke never overwrites the docs' figure
SMOKE_PLOT = Path(tempfile.gettempdir()) / "batchhub-performance-growth-smoke.png"
_WORDS = " ".join(
    (
        "the a of to and in is it that for on with as this by be are from at or data model result value batch",
        "prompt answer token request response rate limit order queue worker signal record column table field",
        "summary quickly clearly simply carefully harbour ocean river mountain letter garden window morning evening",
    )
).split()


@dataclass(frozen=True)
class Sweep:
    key: str
    title: str  # of the plot's column
    axis: str  # the x axis
    values: tuple[int, ...]
    rows: int | None  # rows of every point (None: the value is the rows)
    concurrency: int | None  # None: the value is the concurrency
    chars: int | None  # characters a prompt (None: the value; 0: the short prompts of _common)
    latency_ms: float


REAL = (
    Sweep("rows", "rows", "rows in the input", (2_000, 10_000, 50_000), None, 64, 0, 0.0),
    Sweep("concurrency", "concurrency (20 ms latency)", "--concurrency", (8, 32, 128, 512), 5_000, None, 0, 20.0),
    Sweep("prompt", "prompt size", "characters a prompt", (100, 1_000, 10_000), 5_000, 64, None, 0.0),
)
SMOKE = (
    Sweep("rows", "rows", "rows in the input", (200, 400), None, 16, 0, 0.0),
    Sweep("concurrency", "concurrency (5 ms latency)", "--concurrency", (4, 16), 200, None, 0, 5.0),
    Sweep("prompt", "prompt size", "characters a prompt", (100, 1_000), 200, 16, None, 0.0),
)


@dataclass
class Point:
    sweep: str
    value: int
    rows: int
    concurrency: int
    chars: int
    cpu_ms_per_1k: float
    rows_per_s: float
    loop_rows_per_s: float
    peak_rss_kib: float


def write_input(path: Path, rows: int, chars: int, seed: int = 11) -> Path:
    """A one-column CSV: the shared short prompts (chars=0), or prompts of exactly `chars` characters."""
    if chars <= 0:
        return c.write_csv(path, rows)
    import csv

    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt"])
        for i in range(rows):
            text = f"row {i}: summarise this."
            while len(text) < chars:
                text += " " + " ".join(rng.choices(_WORDS, k=64))
            writer.writerow([text[:chars]])
    return path


def run_point(input_path: Path, job_dir: Path, base_url: str, concurrency: int, rows: int) -> dict[str, float]:
    shutil.rmtree(job_dir, ignore_errors=True)
    result = c.run_child(c.batchhub_run_cmd(input_path, job_dir, base_url, concurrency), timeout=900)
    c.check_ok(result, "batchhub run")
    run = c.last_run(job_dir)
    done = int(run.get("results") or 0)
    if done != rows:
        raise SystemExit(f"batchhub run recorded {done} results for {rows} rows")
    shutil.rmtree(job_dir, ignore_errors=True)
    return {
        "cpu_ms_per_1k": 1000 * result.cpu_s / rows * 1000,
        "rows_per_s": rows / result.wall_s,
        "loop_rows_per_s": rows / float(run["elapsed_s"]),
        "peak_rss_kib": float(result.maxrss_kib),
    }


def run_sweep(sweep: Sweep, repeat: int, work: Path) -> list[Point]:
    figures: dict[int, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    setups = {}
    for v in sweep.values:
        rows = sweep.rows if sweep.rows is not None else v
        chars = sweep.chars if sweep.chars is not None else v
        concurrency = sweep.concurrency if sweep.concurrency is not None else v
        path = work / f"{sweep.key}-{rows}-{chars}.csv"
        if not path.exists():
            write_input(path, rows, chars)
        setups[v] = (path, rows, chars, concurrency)
    extra = ["--latency-ms", str(sweep.latency_ms)] if sweep.latency_ms else []
    with c.Simulator(*extra) as sim:
        # warm-up, not counted: page cache, imports compiled, the simulator's first connections
        path, rows, _chars, concurrency = setups[sweep.values[0]]
        run_point(path, work / "job", sim.base_url, concurrency, rows)
        for rep in range(repeat):
            for v in c.order(rep, list(sweep.values)):
                path, rows, chars, concurrency = setups[v]
                f = run_point(path, work / "job", sim.base_url, concurrency, rows)
                for key, value in f.items():
                    figures[v][key].append(value)
                c.log(
                    f"  {sweep.key} {v:,} (run {rep + 1}/{repeat}): CPU {f['cpu_ms_per_1k']:,.0f} ms per 1,000 rows, "
                    f"{f['rows_per_s']:,.0f} rows/s end to end, {f['loop_rows_per_s']:,.0f} in the loop, "
                    f"peak RSS {c.mb(f['peak_rss_kib'])}"
                )
    points = []
    for v in sweep.values:
        _path, rows, chars, concurrency = setups[v]
        m = {key: c.median(vals) for key, vals in figures[v].items()}
        points.append(Point(sweep.key, v, rows, concurrency, chars, **m))
    return points


def describe(sweep: Sweep, p: Point) -> str:
    what = {
        "rows": f"{p.rows:,} rows",
        "concurrency": f"concurrency {p.concurrency}",
        "prompt": f"{p.chars:,}-character prompts",
    }[sweep.key]
    return (
        f"growth {sweep.key} {what}: CPU {p.cpu_ms_per_1k:,.0f} ms per 1,000 rows, {p.rows_per_s:,.0f} rows/s end to "
        f"end ({p.loop_rows_per_s:,.0f} in the loop), peak RSS {c.mb(p.peak_rss_kib)}"
    )


def marginal(points: list[Point]) -> str:
    """CPU time against rows, fitted by a line: the start-up every job pays and the cost of each row."""
    xs = [p.rows for p in points]
    ys = [p.cpu_ms_per_1k * p.rows / 1000 for p in points]  # ms of CPU of the whole job
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    return (
        f"growth rows fit: {fixed / 1000:,.2f} s of CPU every job pays (imports, start-up) "
        f"+ {slope * 1000:,.0f} ms per 1,000 rows (a line through the {len(points)} points)"
    )


def plot(sweeps: list[Sweep], results: dict[str, list[Point]], path: Path, machine: str) -> None:
    """One column per sweep; rows: CPU per 1,000 rows, rows per second, peak RSS."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(13, 9.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, len(sweeps), squeeze=False)
    metrics = (
        ("cpu_ms_per_1k", "CPU ms per 1,000 rows", "#1f77b4"),
        ("rows_per_s", "rows per second", "#2ca02c"),
        ("peak_rss_kib", "peak RSS, MB", "#d62728"),
    )
    thousands = FuncFormatter(lambda x, _pos: f"{x:,.0f}")
    for col, sweep in enumerate(sweeps):
        points = results[sweep.key]
        xs = [p.value for p in points]
        for row, (key, label, colour) in enumerate(metrics):
            ax = axes[row][col]
            ys = [getattr(p, key) / (1024 if key == "peak_rss_kib" else 1) for p in points]
            top = max(ys)
            ax.plot(xs, ys, marker="o", color=colour, linewidth=2, label="end to end" if key == "rows_per_s" else None)
            if key == "rows_per_s":
                loop = [p.loop_rows_per_s for p in points]
                top = max(top, *loop)
                ax.plot(xs, loop, marker="s", color=colour, linestyle="--", alpha=0.6, label="in the loop")
                ax.legend(fontsize=9, loc="best")
            for x, y in zip(xs, ys, strict=True):
                ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
            ax.set_xscale("log")
            ax.margins(x=0.12)
            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(thousands)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda _x, _pos: ""))
            ax.yaxis.set_major_formatter(thousands)
            ax.set_ylim(bottom=0, top=top * 1.25)
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.set_title(f"by {sweep.title}", fontsize=12, fontweight="bold")
            if row == len(metrics) - 1:
                ax.set_xlabel(sweep.axis)
            if col == 0:
                ax.set_ylabel(label, fontsize=11)
    fig.suptitle(f"batchhub: cost by rows, concurrency and prompt size\n{machine}", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sweeps, once; the plot goes to {SMOKE_PLOT}")
    parser.add_argument("--only", nargs="+", choices=[s.key for s in REAL], help="run only these sweeps")
    parser.add_argument("--repeat", type=int, help="interleaved repetitions (default 3; smoke 1)")
    parser.add_argument("--plot", type=Path, help=f"where the PNG goes (default {PLOT})")
    parser.add_argument("--workdir", help="keep the inputs here instead of a temp folder")
    args = parser.parse_args()
    sweeps = [s for s in (SMOKE if args.smoke else REAL) if not args.only or s.key in args.only]
    repeat = args.repeat or (1 if args.smoke else 3)
    machine = c.machine_line()
    print(machine, flush=True)

    results: dict[str, list[Point]] = {}
    with c.workdir("batchhub-bench-growth-", args.workdir) as work:
        for sweep in sweeps:
            results[sweep.key] = run_sweep(sweep, repeat, work)
        target = args.plot or (SMOKE_PLOT if args.smoke else PLOT)
        plot(sweeps, results, target, machine.removeprefix("machine: "))

    lines = [machine]
    for sweep in sweeps:
        lines += [describe(sweep, p) for p in results[sweep.key]]
        if sweep.key == "rows" and len(results["rows"]) >= 2:
            lines.append(marginal(results["rows"]))
    lines.append("| sweep | point | CPU ms per 1,000 rows | rows/s end to end | rows/s in the loop | peak RSS |")
    lines.append("|---|---|---|---|---|---|")
    for sweep in sweeps:
        for p in results[sweep.key]:
            lines.append(
                f"| {sweep.key} | {p.value:,} | {p.cpu_ms_per_1k:,.0f} | {p.rows_per_s:,.0f} | "
                f"{p.loop_rows_per_s:,.0f} | {c.mb(p.peak_rss_kib)} |"
            )
    lines.append(f"growth plot: {target} (median of {repeat})")
    c.print_block("growth", lines)


if __name__ == "__main__":
    main()
