"""What pricing Batch API replies apart costs: `batchhub cost` and `batchhub status` of a 1,000,000-result
job, and what the Batch API saves on the demo job.

    python benchmarks/batch_bill.py            # 1,000,000 results, 3 repetitions
    python benchmarks/batch_bill.py --smoke    # 20,000 results, once

Four copies of one finished job of gpt-4o-mini, built directly in the layout a real run
leaves (job.json, ok results written with `write_part` in parts of 5,000 rows), differ
only in their `batch_id` column:

* before: parts written before the column existed (it reads as nulls);
* live: the column, all null (a job sent live);
* half batch: every other result answered by a batch (a job resumed the other way);
* all batch: every result answered by a batch (`--via batch`).

Each command runs as a fresh process, the four jobs interleaved, and the median wall time
(process start included) is compared with the job from before. Targets: a live job is read
as fast as one from before (within 1.10x), a job with batch replies within 1.5x of it (one
more pass over the usage columns); the all-batch bill is the live bill at gpt-4o-mini's
batch price (genai-prices: half, input and output). Then `estimate jobs/demo.toml`, live
and `--via batch`: the demo's cost both ways.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

JOBS = ("before", "live", "half batch", "all batch")
COMMANDS = ("cost", "status")
#: what each command's --json calls the bill
TOTAL = {"cost": "total_usd", "status": "spent_usd"}


def batch_column(kind: str, n: int) -> pa.Array | None:
    """The batch_id column of a job of `n` results, None for a job from before the column."""
    if kind == "before":
        return None
    if kind == "live":
        return pa.nulls(n, pa.string())
    ids = np.array([f"batch_{i // 50_000:04d}" for i in range(0, n, 50_000)], dtype=object)
    values = ids[np.arange(n) // 50_000]
    if kind == "half batch":
        values[1::2] = None
    return pa.array(values, pa.string())


def build_job(job_dir: Path, kind: str, n: int) -> None:
    """A finished job of `n` ok results (see the module docstring)."""
    column = batch_column(kind, n)
    extra = {"batch_id": column} if column is not None else {}
    c.write_finished_job(
        job_dir, n, {"name": "bill", "model": c.MODEL, "via": "live" if kind in ("before", "live") else "batch"}, extra
    )


def demo_estimate(via: str) -> dict:
    """`batchhub estimate jobs/demo.toml --via VIA --no-cache --json` (offline: the demo's tokens counted, no
    request; every row counted, none left out as answered by a reply cache of earlier demo runs)."""
    demo = str(c.REPO / "jobs" / "demo.toml")
    result = c.run_child(
        [sys.executable, "-m", "batchhub", "estimate", demo, "--via", via, "--no-cache", "--json"], timeout=300
    )
    c.check_ok(result, f"batchhub estimate jobs/demo.toml --via {via}")
    data: dict = json.loads(result.stdout)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: 20,000 results, once")
    parser.add_argument("--rows", type=int, help="results in each job (default 1,000,000; smoke 20,000)")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; smoke 1)")
    parser.add_argument("--workdir", help="keep the jobs here instead of a temp folder")
    args = parser.parse_args()
    n = args.rows or (20_000 if args.smoke else 1_000_000)
    repeat = args.repeat or (1 if args.smoke else 3)
    machine = c.machine_line()
    print(machine, flush=True)

    with c.workdir("batchhub-bench-batch-bill-", args.workdir) as work:
        walls, answers = c.time_job_commands(work, JOBS, COMMANDS, lambda path, kind: build_job(path, kind, n), repeat)
    bills = {key: float(answer[TOTAL[key[1]]]) for key, answer in answers.items()}
    live_demo, batch_demo = demo_estimate("live"), demo_estimate("batch")

    lines = [machine]
    met = True
    for cmd in COMMANDS:
        base = c.median(walls["before", cmd])
        figures = []
        for kind in JOBS:
            wall = c.median(walls[kind, cmd])
            ratio = wall / base
            limit = 1.10 if kind == "live" else 1.5
            met = met and (kind == "before" or ratio <= limit)
            figures.append(f"{kind} {wall:.2f} s" + ("" if kind == "before" else f" ({ratio:.2f}x)"))
        lines.append(f"batch bill: batchhub {cmd} of {n:,} results: {', '.join(figures)} (median of {repeat})")
    for cmd in COMMANDS:
        live, half, batch = (bills[kind, cmd] for kind in ("live", "half batch", "all batch"))
        met = met and bills["before", cmd] == live and abs(batch / live - 0.5) < 1e-9
        lines.append(
            f"batch bill: {cmd}'s bill: live ${live:,.4f}, half batch ${half:,.4f}, "
            f"all batch ${batch:,.4f} ({batch / live:.2f}x live)"
        )
    low, high = (batch_demo[f"total_cost_{end}"] for end in ("low", "high"))
    live_low, live_high = (live_demo[f"total_cost_{end}"] for end in ("low", "high"))
    lines.append(
        f"batch bill: the demo (jobs/demo.toml, {live_demo['rows']:,} rows) estimated live ${live_low:,.4f} .. "
        f"${live_high:,.4f}, --via batch ${low:,.4f} .. ${high:,.4f} ({high / live_high:.2f}x live)"
    )
    met = met and batch_demo["total_live_cost_high"] == live_high
    lines.append(
        "batch bill target: live within 1.10x, batch replies within 1.5x of before; all batch at half the "
        f"live bill: {'met' if met else 'NOT met'}"
    )
    c.print_block("batch_bill", lines)


if __name__ == "__main__":
    main()
