"""`--via batch` on a large input: time from start to the first batch created, memory while the files
are built, and the requests and bytes of each batch file.

A 1M-row CSV (the prompts every benchmark uses) is run with `--via batch` against the simulator in
its own process, whose batches take far longer than the run is watched (nothing is collected): the
simulator's batch list is read every 20 ms from the start; the run is stopped (SIGINT) once
`--batches` batches exist, or the whole input is submitted. Then the files the server received are
measured.

    python benchmarks/batch_files.py              # 1M rows, files of 50,000 requests (the default)
    python benchmarks/batch_files.py --smoke      # 60,000 rows, files of 20,000 (the test suite runs this)

Figures go to stdout in a final `== batch files ==` block; progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

from _common import (
    API_KEY,
    Simulator,
    batchhub_run_cmd,
    log,
    machine_line,
    mb,
    print_block,
    run_child,
    running,
    workdir,
    write_csv,
)


def server_batches(base_url: str) -> list[dict]:
    request = urllib.request.Request(f"{base_url}/batches?limit=100", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)["data"]


def file_lines(base_url: str, file_id: str) -> tuple[int, int]:
    """The requests (lines) and bytes of an uploaded batch file."""
    url = f"{base_url}/files/{file_id}/content"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        data = resp.read()
    return data.count(b"\n"), len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-requests", type=int, default=50_000)
    parser.add_argument("--batches", type=int, default=4, help="stop once this many batches exist")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--keep", help="a folder to keep the input and job in")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.batch_requests, args.batches = 60_000, 20_000, 2
    print(machine_line())
    with workdir("batchhub-batch-files-", args.keep) as tmp, Simulator("--batch-seconds", "3600") as sim:
        data = write_csv(tmp / "in.csv", args.rows)
        log(f"input: {args.rows:,} rows, {data.stat().st_size / 1e6:.1f} MB")
        job = tmp / "job"
        first: list[float] = []

        def watch(proc, t0: float) -> None:
            while running(proc):
                batches = server_batches(sim.base_url)
                if batches and not first:
                    first.append(time.perf_counter() - t0)
                if len(batches) >= args.batches:
                    proc.send_signal(2)
                    return
                time.sleep(0.02)

        cmd = batchhub_run_cmd(
            data, job, sim.base_url, 32, "--via", "batch", "--batch-requests", str(args.batch_requests)
        )
        result = run_child(cmd, timeout=600, while_running=watch)
        batches = server_batches(sim.base_url)
        if not first or not batches:
            raise SystemExit(f"no batch was created (exit {result.returncode})\n{result.stderr[-3000:]}")
        files = [file_lines(sim.base_url, b["input_file_id"]) for b in batches]
        requests = [n for n, _ in files]
        sizes = [size for _, size in files]
        lines = [
            f"input: {args.rows:,} rows (CSV), files of at most {args.batch_requests:,} requests",
            f"time from start to the first batch created: {first[0]:.2f} s",
            f"batches created before the stop: {len(batches)}; requests per file: "
            + ", ".join(f"{n:,}" for n in sorted(requests, reverse=True)),
            "bytes per file: " + ", ".join(f"{s / 1e6:.1f} MB" for s in sorted(sizes, reverse=True)),
            f"peak memory of the run (RSS, building and uploading the files): {mb(result.maxrss_kib)}",
            f"exit {result.returncode} (stopped with Ctrl-C: the batches stay live at the provider)",
        ]
        print_block("batch files", lines)
        if result.returncode < 0:
            log(result.stderr[-6000:])


if __name__ == "__main__":
    main()
