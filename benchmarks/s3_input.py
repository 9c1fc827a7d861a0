"""Inputs read from an S3 bucket against the same files on local disk: rows/s, and what a shard fetches.

    python benchmarks/s3_input.py            # 200,000 rows, 3 repetitions
    python benchmarks/s3_input.py --smoke    # 4,000 rows, once

The bucket is on moto's S3 server (a child process on 127.0.0.1, as in the tests), behind a proxy
that counts the bytes the store sends back (tests/s3proxy.py). So the rates are those of a store on
this machine: they show what batchhub's reading costs beside a local file, not a real store's
bandwidth or latency (every GET here is a Python server's reply over loopback).

- read: every row of the input through `InputSource.iter_rows` (the job's one column), from the
  file and from the object, interleaved, median of the repetitions;
- shard: one Ray task's rows (`--shard-rows`, in the middle of the input) read as a task reads them
  (`open_input`, then `iter_rows(start=...)` up to its last row): the bytes the store sent, beside
  the object's size. Parquet reads the row groups holding the shard and the footer; CSV and JSON
  Lines read from the start up to the shard's last row (a streamed text file has no row index).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _common as c
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from s3proxy import CountingProxy
from s3server import MotoProcess, S3Bucket, s3_env

NAMES = ("in.csv", "in.parquet", "in.jsonl.gz")


def write_inputs(folder: Path, rows: int, group_rows: int) -> dict[str, Path]:
    prompts = [c.prompt_text(i) * 4 for i in range(rows)]
    table = pa.table({"id": list(range(rows)), "prompt": prompts})
    pacsv.write_csv(table, folder / "in.csv")
    pq.write_table(table, folder / "in.parquet", row_group_size=group_rows)
    lines = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    (folder / "in.jsonl.gz").write_bytes(gzip.compress(lines.encode(), compresslevel=6))
    return {name: folder / name for name in NAMES}


def read_all(location: str | Path) -> tuple[int, float]:
    from batchhub.io import open_input

    started = time.perf_counter()
    source = open_input(location)
    rows = sum(len(batch) for batch in source.iter_rows(["prompt"], 2048))
    return rows, time.perf_counter() - started


def read_shard(location: str | Path, start: int, rows: int) -> int:
    """Read `rows` rows from `start` as a task does; the rows read."""
    from batchhub.io import open_input

    source = open_input(location)
    seen = 0
    batches = source.iter_rows(["prompt"], 2048, start=start)
    for batch in batches:
        seen += len(batch)
        if seen >= rows:
            break
    batches.close()
    return min(seen, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a small input, once (the tests run this)")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--group-rows", type=int, default=10_000, help="rows per Parquet row group")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    rows = args.rows or (4_000 if args.smoke else 200_000)
    reps = args.reps or (1 if args.smoke else 3)
    shard_rows = min(args.shard_rows, rows // 4)
    group_rows = min(args.group_rows, max(1, rows // 8))
    print(c.machine_line(), flush=True)
    server = MotoProcess()
    proxy = CountingProxy(server.endpoint)
    try:
        bucket = S3Bucket(server.endpoint).create()
        os.environ.update(s3_env(proxy.endpoint))
        with c.workdir("batchhub-s3-input-") as folder:
            files = write_inputs(folder, rows, group_rows)
            for name, path in files.items():
                bucket.put(name, path.read_bytes())
            figures: dict[str, dict[str, float]] = {}
            lines = []
            for name, path in files.items():
                times: dict[str, list[float]] = {"local": [], "bucket": []}
                for rep in range(reps):
                    for where in c.order(rep, ["local", "bucket"]):
                        got, seconds = read_all(path if where == "local" else bucket.url(name))
                        assert got == rows, (name, where, got)
                        times[where].append(seconds)
                local_rate = rows / c.median(times["local"])
                bucket_rate = rows / c.median(times["bucket"])
                start = rows // 2 - shard_rows // 2
                proxy.reset()
                assert read_shard(bucket.url(name), start, shard_rows) == shard_rows
                fetched, size = proxy.get_bytes, path.stat().st_size
                figures[name] = {
                    "local_rows_per_s": local_rate,
                    "bucket_rows_per_s": bucket_rate,
                    "shard_bytes": fetched,
                    "object_bytes": size,
                    "gets": proxy.gets,
                }
                lines.append(
                    f"{name + ':':13s} read {local_rate:>10,.0f} rows/s local, {bucket_rate:>10,.0f} rows/s bucket "
                    f"({bucket_rate / local_rate:.2f}x); a {shard_rows:,}-row shard mid-input fetched "
                    f"{fetched / 1e6:,.2f} MB of {size / 1e6:,.2f} MB ({100 * fetched / size:.0f}%), {proxy.gets} GETs"
                )
        title = f"S3 input ({rows:,} rows, Parquet row groups of {group_rows:,}, {reps} repetitions)"
        c.print_block(title, lines)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        proxy.close()
        server.stop()


if __name__ == "__main__":
    main()
