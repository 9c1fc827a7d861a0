"""How soon a resumed job sends again: a 1,000,000-row job with half its rows done.

    python benchmarks/resume.py            # 1,000,000 rows, 3 repetitions, + where the time goes
    python benchmarks/resume.py --smoke    # 20,000 rows, once

The half-done job is built directly, in the layout a real run leaves: job.json
from `prepare_job` (the input's real fingerprint and row count, one run record),
an ok result for every even row_id written with `JobStore.write_part` in parts of
5,000 rows (the default flush_rows), numbered by seq like a real run, except the
last 5,000 results, left in a journal segment as a SIGKILL leaves them (so the
resume also has to compact them). Each result carries the request_hash of the request
its row sends, as a real run's does: the resume checks each done row's request against
it as its reader passes. Each repetition resumes a fresh copy of it.

Measured: from just before the `batchhub run` process is started to the moment
the simulator (its own process, no latency) has seen the first POST, by polling
`GET /mock/stats` on a kept-alive connection every few milliseconds (so the
figure is late by at most one poll). The job is then stopped with SIGINT.
Target: the first request within 2 s.

Then, in one more fresh process, the phases of a resume are timed one by one
(imports, prepare_job, JobStore.recover, JobStore.row_states, JobStore.row_request_hashes,
the first input batch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

PART_ROWS = 5_000
POLL_S = 0.003


def synthetic_result(row_id: int, seq: int, now: float, request_hash: str) -> dict:
    """An ok result as the runner records it (see ResultRows.ok in batchhub/rows.py)."""
    return {
        "row_id": row_id,
        "status": "ok",
        "content": "The sea is wide and restless.",
        "finish_reason": "stop",
        "model": c.MODEL,
        "response_id": f"chatcmpl-{seq:024x}",
        "prompt_tokens": 19,
        "completion_tokens": 8,
        "total_tokens": 27,
        "cached_tokens": None,
        "latency_s": 0.012,
        "attempts": 1,
        "rate_limit_retries": 0,
        "http_status": 200,
        "error_type": None,
        "error_message": None,
        "request_hash": request_hash,
        "finished_at": now,
        "seq": seq,
    }


def build_half_done(input_path: Path, job_dir: Path, base_url: str, concurrency: int) -> tuple[int, int, int]:
    """A job with every even row done. Returns (rows, results in parts, results in the journal)."""
    from batchhub import JobSpec
    from batchhub.manifest import RunRecord
    from batchhub.runner import prepare_job

    spec = JobSpec(
        input=input_path, model=c.MODEL, base_url=base_url, api_key=c.API_KEY, job_dir=job_dir, concurrency=concurrency
    )
    prepared = prepare_job(spec)
    store = prepared.store
    store.recover()  # creates the folders
    n = prepared.rows()
    done = list(range(0, n, 2))
    # the hash of the request each done row sends: a resume trusts only results that match it
    hashes: list[str] = []
    offset = 0
    for batch in prepared.source.iter_rows(prepared.builder.needed_columns, 8192):
        hashes.extend(prepared.builder.build(row).request_hash for row in batch[offset % 2 :: 2])
        offset += len(batch)
    in_journal = min(PART_ROWS, len(done) // 10)
    cut = len(done) - in_journal
    now = time.time()
    for start in range(0, cut, PART_ROWS):
        ids = done[start : min(start + PART_ROWS, cut)]
        store.write_part([synthetic_result(rid, start + i + 1, now, hashes[rid // 2]) for i, rid in enumerate(ids)])
    with open(job_dir / "journal-000001.jsonl", "w", encoding="utf-8") as fh:
        for i, rid in enumerate(done[cut:]):
            row = synthetic_result(rid, cut + i + 1, now, hashes[rid // 2])
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
    prepared.manifest.runs = [
        RunRecord(
            started_at="2025-01-01T00:00:00Z",
            to_send=n,
            ended_at="2025-01-01T00:05:00Z",
            results=len(done),
            ok=len(done),
            failed=0,
            pending=n - len(done),
            stopped="interrupted",
            elapsed_s=300.0,
            http_requests=len(done),
        )
    ]
    store.write_manifest(prepared.manifest)
    return n, cut, in_journal


def first_request_watcher(sim: c.Simulator, baseline: int, limit_s: float):  # type: ignore[no-untyped-def]
    """A `while_running` callback: seconds from t0 until the simulator counts a new request; then SIGINT."""

    def callback(proc: subprocess.Popen[bytes], t0: float) -> float | None:
        seen = None
        while c.running(proc) and time.perf_counter() - t0 < limit_s:
            if sim.stats()["requests"] > baseline:
                seen = time.perf_counter() - t0
                break
            time.sleep(POLL_S)
        if c.running(proc):
            proc.send_signal(2)  # SIGINT: stop sending, finish what is in flight, write it down
        return seen

    return callback


def phases(input_path: Path, job_dir: Path, base_url: str) -> None:
    """In a fresh process: time each step a resume takes before its first request; print JSON."""
    t = time.perf_counter()
    out: dict[str, float] = {}
    import batchhub.cli  # what `python -m batchhub run` imports
    import batchhub.runner

    out["imports"] = time.perf_counter() - t
    t = time.perf_counter()
    spec = batchhub.JobSpec(input=input_path, model=c.MODEL, base_url=base_url, api_key=c.API_KEY, job_dir=job_dir)
    prepared = batchhub.runner.prepare_job(spec)
    out["prepare_job (fingerprint, manifest, prices)"] = time.perf_counter() - t
    store = prepared.store
    t = time.perf_counter()
    store.recover()
    out["JobStore.recover (journal -> part)"] = time.perf_counter() - t
    t = time.perf_counter()
    states = store.row_states(prepared.rows())
    out["JobStore.row_states (read every part)"] = time.perf_counter() - t
    t = time.perf_counter()
    store.row_request_hashes(prepared.rows())
    out["JobStore.row_request_hashes (read every part)"] = time.perf_counter() - t
    t = time.perf_counter()
    rows = prepared.source.iter_rows(prepared.builder.needed_columns, 2048)
    batch = next(rows)
    prepared.builder.build(batch[int((states[: len(batch)] == 0).argmax())])
    out["first input batch + first request body"] = time.perf_counter() - t
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny and fast: 20,000 rows, once, no phases")
    parser.add_argument("--rows", type=int, help="rows in the input (default 1,000,000; smoke 20,000)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeat", type=int, help="repetitions (default 3; smoke 1)")
    parser.add_argument(
        "--phases", action=argparse.BooleanOptionalAction, default=None, help="default: on, off with --smoke"
    )
    parser.add_argument("--workdir", help="keep the input and the half-done job here instead of a temp folder")
    parser.add_argument("--_phases", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._phases:
        phases(Path(args._phases[0]), Path(args._phases[1]), args._phases[2])
        return
    rows = args.rows or (20_000 if args.smoke else 1_000_000)
    repeat = args.repeat or (1 if args.smoke else 3)
    do_phases = (not args.smoke) if args.phases is None else args.phases
    machine = c.machine_line()
    print(machine, flush=True)

    firsts: list[float] = []
    exits: list[float] = []
    with c.workdir("batchhub-bench-resume-", args.workdir) as work, c.Simulator() as sim:
        input_path = c.write_csv(work / "input.csv", rows)
        template = work / "half-done"
        shutil.rmtree(template, ignore_errors=True)
        t = time.perf_counter()
        n, in_parts, in_journal = build_half_done(input_path, template, sim.base_url, args.concurrency)
        c.log(f"  built the half-done job in {time.perf_counter() - t:.1f} s")
        job_dir = work / "job"
        for rep in range(repeat):
            shutil.rmtree(job_dir, ignore_errors=True)
            shutil.copytree(template, job_dir)
            baseline = sim.stats()["requests"]
            result = c.run_child(
                c.batchhub_run_cmd(input_path, job_dir, sim.base_url, args.concurrency),
                timeout=120,
                while_running=first_request_watcher(sim, baseline, 60),
            )
            c.check_ok(result, "the resumed batchhub run", allowed=(0, 3))
            if "resuming" not in result.stderr and "interrupted" not in result.stderr:
                c.log(result.stderr[-1000:])
            if result.extra is None:
                raise SystemExit(f"no request reached the simulator within 60 s\n{result.stderr[-2000:]}")
            to_send = c.last_run(job_dir).get("to_send")
            if to_send != n - in_parts - in_journal:
                left = n - in_parts - in_journal
                raise SystemExit(f"the resumed run meant to send {to_send} rows, not the {left} left")
            firsts.append(float(result.extra))  # type: ignore[arg-type]
            exits.append(result.wall_s)
            c.log(
                f"  run {rep + 1}/{repeat}: first request after {firsts[-1]:.3f} s "
                f"(process ended at {result.wall_s:.1f} s)"
            )
        breakdown: dict[str, float] = {}
        if do_phases:
            shutil.rmtree(job_dir, ignore_errors=True)
            shutil.copytree(template, job_dir)
            cmd = [sys.executable, __file__, "--_phases", str(input_path), str(job_dir), sim.base_url]
            result = c.run_child(cmd, timeout=300)
            c.check_ok(result, "the phases of a resume")
            breakdown = json.loads(result.stdout.strip().splitlines()[-1])
        shutil.rmtree(job_dir, ignore_errors=True)

    first = c.median(firsts)
    lines = [
        machine,
        f"resume: first request {first:.2f} s after process start, {n:,}-row job half done "
        f"(median of {repeat}; {in_parts:,} results in {-(-in_parts // PART_ROWS)} parts + {in_journal:,} in a "
        f"journal segment; runs: {', '.join(f'{x:.2f}' for x in firsts)} s)",
        f"resume target: first request within 2 s: {'met' if first <= 2.0 else 'NOT met'}",
    ]
    if breakdown:
        total = sum(breakdown.values())
        parts = ", ".join(f"{name} {secs:.2f} s" for name, secs in breakdown.items())
        lines.append(f"resume phases (one fresh process, {total:.2f} s in all): {parts}")
    c.print_block("resume", lines)


if __name__ == "__main__":
    main()
