"""Reuse: a job whose every reply is already paid for, and the cost of looking up a job that reuses nothing.

1. A new job of N rows (default 1,000,000) whose every request the reply cache already answered: the
   time of `batchhub run` (it must send nothing) and of `batchhub export`, and its peak memory.
2. The same job after a row is inserted at the top of its input: every row moved, so every result is
   checked, found not to be its row's, and the row's reply found among the job's own.
3. A job of M rows (default 20,000) that reuses nothing, sent to the simulator, with the reply cache
   (looked up and written), with `--fresh` (written, not looked up) and with `--no-cache` (neither),
   interleaved: CPU per row and wall time side by side. The look-up's cost is the first against the
   second; the cost of writing the replies into the cache, the second against the third.

    python benchmarks/reuse.py                  # 1,000,000 rows; 20,000 for the look-up cost
    python benchmarks/reuse.py --rows 200000
    python benchmarks/reuse.py --smoke          # small, one repetition (the test suite runs this)

The cache is seeded directly (batchhub.reply_cache), with the keys the job's rows hash to: sending a
million requests to the simulator first would measure the simulator. Figures go to stdout in a final
`== reuse ==` block; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import (
    API_KEY,
    MODEL,
    REPO,
    Simulator,
    batchhub_run_cmd,
    check_ok,
    last_run,
    log,
    machine_line,
    mb,
    median,
    order,
    print_block,
    prompt_text,
    run_child,
    workdir,
    write_csv,
)

from batchhub import defaults
from batchhub.reply_cache import ReplyCache
from batchhub.requests import RequestBuilder
from batchhub.spec import JobSpec


def seed_cache(folder: Path, base_url: str, rows: int) -> float:
    """Put a reply for the request of each of `rows` rows into the reply cache in `folder`; seconds taken."""
    builder = RequestBuilder(JobSpec(model=MODEL, base_url=base_url), ["prompt"])
    cache = ReplyCache.open(folder)
    assert cache.problem is None, cache.problem
    started = time.perf_counter()
    chunk: list[tuple[str, str, str | None, dict[str, object]]] = []
    for i in range(rows):
        text = prompt_text(i)
        reply = {
            "content": f"A sentence about the sea, for row {i}.",
            "finish_reason": "stop",
            "extra": None,
            "model": MODEL,
            "response_id": f"chatcmpl-seed{i}",
            "request_id": None,
            "prompt_tokens": 20,
            "completion_tokens": 10,
            "total_tokens": 30,
            "cached_tokens": None,
            "latency_s": 0.5,
            "http_status": 200,
            "finished_at": time.time(),
        }
        chunk.append((builder.build({"prompt": text}).request_hash, builder.endpoint, MODEL, reply))
        if len(chunk) == 50_000:
            cache.put_many(chunk)
            chunk = []
    cache.put_many(chunk)
    cache.close()
    return time.perf_counter() - started


def insert_first_row(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0] + "a new first question about the sea\n" + "".join(lines[1:]), encoding="utf-8")


def requests_seen(sim: Simulator) -> int:
    return int(sim.stats()["requests"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the job whose replies are all cached")
    parser.add_argument("--lookup-rows", type=int, default=20_000, help="rows of the job that reuses nothing")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the look-up comparison")
    parser.add_argument("--smoke", action="store_true", help="2,000 and 1,000 rows, one repetition")
    parser.add_argument("--keep", help="work in this folder and leave it")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.lookup_rows, args.reps = 2_000, 1_000, 1
    lines = [machine_line()]
    with workdir("batchhub-reuse-", args.keep) as work, Simulator() as sim:
        cache = work / "cache"
        os.environ["BATCHHUB_CACHE"] = str(cache)  # the children's reply cache
        data = write_csv(work / "prompts.csv", args.rows)
        log(f"seeding the reply cache with {args.rows:,} replies")
        seeded = seed_cache(cache, sim.base_url, args.rows)
        size = sum(p.stat().st_size for p in cache.iterdir())
        lines.append(f"cache seeded: {args.rows:,} replies in {seeded:.1f} s, {size / 1e6:,.0f} MB on disk")

        job = work / "job"
        log("a new job whose every reply is cached")
        before = requests_seen(sim)
        run = run_child(batchhub_run_cmd(data, job, sim.base_url, defaults.CONCURRENCY), timeout=3600, cwd=REPO)
        check_ok(run, "the cached job")
        sent = requests_seen(sim) - before
        record = last_run(job)
        out = work / "out.parquet"
        export = run_child(
            [sys.executable, "-m", "batchhub", "export", str(job), "-o", str(out)], timeout=3600, cwd=REPO
        )
        check_ok(export, "export")
        lines.append(
            f"all {args.rows:,} rows from the cache: run {run.wall_s:.1f} s ({args.rows / run.wall_s:,.0f} rows/s, "
            f"peak {mb(run.maxrss_kib)}), export {export.wall_s:.1f} s, "
            f"run + export {run.wall_s + export.wall_s:.1f} s; "
            f"requests sent {sent}, ok {record.get('ok'):,}"
        )

        log("the same job, a row inserted at the top of its input")
        insert_first_row(data)
        before = requests_seen(sim)
        moved = run_child(batchhub_run_cmd(data, job, sim.base_url, defaults.CONCURRENCY), timeout=3600, cwd=REPO)
        check_ok(moved, "the moved job")
        sent = requests_seen(sim) - before
        lines.append(
            f"every row moved by one: run {moved.wall_s:.1f} s ({(args.rows + 1) / moved.wall_s:,.0f} rows/s, "
            f"peak {mb(moved.maxrss_kib)}); requests sent {sent} (the new row)"
        )

        log(f"{args.lookup_rows:,} rows that reuse nothing: with the reply cache, --fresh and --no-cache")
        fresh_data = work / "fresh.csv"
        figures: dict[str, list[tuple[float, float]]] = {"cache": [], "fresh": [], "no-cache": []}
        for rep in range(args.reps):
            for name in order(rep, list(figures)):
                # prompts no cache holds: another text per repetition and per side
                with open(fresh_data, "w", encoding="utf-8") as fh:
                    fh.write("prompt\n" + "".join(f"{name} {rep} {prompt_text(i)}\n" for i in range(args.lookup_rows)))
                extra = {"cache": (), "fresh": ("--fresh",), "no-cache": ("--no-cache",)}[name]
                target = work / f"lookup-{name}-{rep}"
                child = run_child(
                    batchhub_run_cmd(fresh_data, target, sim.base_url, defaults.CONCURRENCY, *extra),
                    timeout=3600,
                    cwd=REPO,
                )
                check_ok(child, f"the job that reuses nothing ({name})")
                figures[name].append((child.cpu_s / args.lookup_rows * 1e6, child.wall_s))
        cpu = {name: median([c for c, _ in values]) for name, values in figures.items()}
        wall = {name: median([w for _, w in values]) for name, values in figures.items()}
        lines.append(
            f"reusing nothing, {args.lookup_rows:,} rows (median of {args.reps}): CPU per row {cpu['cache']:.0f} µs "
            f"with the cache, {cpu['fresh']:.0f} µs writing it only (--fresh), {cpu['no-cache']:.0f} µs without "
            f"(--no-cache); wall {wall['cache']:.1f} / {wall['fresh']:.1f} / {wall['no-cache']:.1f} s"
        )
        lines.append(
            f"the look-up (cache vs --fresh): CPU x{cpu['cache'] / cpu['fresh']:.2f}, "
            f"wall x{wall['cache'] / wall['fresh']:.2f}; "
            f"writing the cache (--fresh vs --no-cache): CPU x{cpu['fresh'] / cpu['no-cache']:.2f}, "
            f"wall x{wall['fresh'] / wall['no-cache']:.2f}"
        )
        lines.append(f"model {MODEL}, key {API_KEY[:3]}..., simulator without latency; {json.dumps(vars(args))}")
    print_block("reuse", lines)


if __name__ == "__main__":
    main()
