"""What reporting reuse costs: `batchhub cost` and `batchhub status` of a 1,000,000-result job.

    python benchmarks/reuse_bill.py            # 1,000,000 results, 3 repetitions
    python benchmarks/reuse_bill.py --smoke    # 20,000 results, once

Four copies of one finished job, built directly in the layout a real run leaves
(job.json, ok results written with `write_part` in parts of 5,000 rows, the default
flush_rows), differ only in their `reused` column:

* before: parts written before the column existed (it reads as nulls);
* none reused: the column, all null (a job that reused nothing);
* half reused: every other result reused (from this job and from the cache in turn);
* all reused: every result reused (a job run again with every reply reusable).

Each command runs as a fresh process, the four jobs interleaved, and the median wall
time (process start included) is compared with the job from before. Targets: a job
that reused nothing is read as fast as one from before (ratio within 1.10), and a job
with reuse within 1.5x of it: splitting out what was reused costs no more than a
second pass over the usage columns.
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

JOBS = ("before", "none reused", "half reused", "all reused")
COMMANDS = ("cost", "status")


def reused_column(kind: str, n: int) -> pa.Array | None:
    """The reused column of a job of `n` results, None for a job from before the column."""
    if kind == "before":
        return None
    if kind == "none reused":
        return pa.nulls(n, pa.string())
    if kind == "all reused":
        return pa.array(np.where(np.arange(n) % 2 == 0, "job", "cache").astype(object), pa.string())
    values = np.full(n, None, dtype=object)
    values[1::4], values[3::4] = "job", "cache"
    return pa.array(values, pa.string())


def build_job(job_dir: Path, kind: str, n: int) -> None:
    """A finished job of `n` ok results (see the module docstring)."""
    column = reused_column(kind, n)
    extra = {"reused": column} if column is not None else {}
    c.write_finished_job(job_dir, n, {"name": "bill", "model": c.MODEL}, extra)


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

    with c.workdir("batchhub-bench-reuse-bill-", args.workdir) as work:
        walls, answers = c.time_job_commands(work, JOBS, COMMANDS, lambda path, kind: build_job(path, kind, n), repeat)
    for (kind, cmd), answer in answers.items():
        if "saved" not in json.dumps(answer):
            raise SystemExit(f"batchhub {cmd} --json of the job '{kind}' says nothing of reuse:\n{str(answer)[:2000]}")

    lines = [machine]
    met = True
    for cmd in COMMANDS:
        base = c.median(walls["before", cmd])
        figures = []
        for kind in JOBS:
            wall = c.median(walls[kind, cmd])
            ratio = wall / base
            limit = 1.10 if kind == "none reused" else 1.5
            met = met and (kind == "before" or ratio <= limit)
            figures.append(f"{kind} {wall:.2f} s" + ("" if kind == "before" else f" ({ratio:.2f}x)"))
        lines.append(f"reuse bill: batchhub {cmd} of {n:,} results: {', '.join(figures)} (median of {repeat})")
    lines.append(
        f"reuse bill target: none reused within 1.10x, reused within 1.5x of before: {'met' if met else 'NOT met'}"
    )
    c.print_block("reuse_bill", lines)


if __name__ == "__main__":
    main()
