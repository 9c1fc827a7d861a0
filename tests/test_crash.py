"""Crash consistency of the job directory: SIGKILL at random moments, a full disk, an
unusable job directory, and a crash state made by hand.

Every job runs in a real subprocess (`python -m batchhub run`) against one simulator
process (`batchhub mock-server`), which counts across the job's restarts how many
completions were paid for more than once.

The random-kill test runs in a bounded CI mode by default. `BATCHHUB_SOAK=1` runs the
same test with more rows, more kills and more seeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import jobprocs
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from jobprocs import child_env, mock_stats, wait_for_results

from batchhub.mock import SimulatorProcess
from batchhub.store import JobStore

CONCURRENCY = 8

PART_NAME = re.compile(r"part-\d{6}\.parquet")
PART_TEMP = re.compile(r"\.part-\d{6}\.parquet\.tmp-\d+")
SEGMENT_NAME = re.compile(r"journal-\d{6}\.jsonl")
MANIFEST_TEMP = re.compile(r"\.job\.json\.tmp-\d+")


@dataclass(frozen=True)
class KillPlan:
    rows: int
    kills: int
    seeds: tuple[int, ...]
    #: simulator latency: bounds a run's progress at CONCURRENCY / latency rows per second
    latency_ms: float
    #: an ordinary kill comes uniform(0, max_delay_s) after the start: covers the start-up
    #: (before the first request, which takes a few tenths of a second) and the middle of the run
    max_delay_s: float
    #: a journal at least this big makes the next run a candidate for a kill during recovery
    big_journal_bytes: int


def kill_plan() -> KillPlan:
    if os.environ.get("BATCHHUB_SOAK") == "1":
        return KillPlan(
            rows=25_000,
            kills=60,
            seeds=(1, 2, 3, 4, 5),
            latency_ms=20,
            max_delay_s=2.0,
            big_journal_bytes=15_000,
        )
    return KillPlan(rows=5_000, kills=14, seeds=(7,), latency_ms=20, max_delay_s=2.0, big_journal_bytes=15_000)


PLAN = kill_plan()


# -- helpers (after tests/test_kill_resume.py) ------------------------------------------------


@contextmanager
def simulator(*, latency_ms: float, seed: int) -> Iterator[str]:
    """`batchhub mock-server --port 0` in its own process, echoing each prompt (an answer shows whose it is);
    yields its base URL."""
    with SimulatorProcess("--latency-ms", str(latency_ms), "--seed", str(seed), "--echo", env=child_env()) as sim:
        yield sim.base_url


def run_args(
    tmp_path: Path,
    base_url: str,
    *,
    flush_rows: int,
    flush_seconds: float = 3600.0,
    job: str = "job",
    concurrency: int = CONCURRENCY,
    cache: bool = True,
) -> list[str]:
    """The run's command; `cache=False`: without the reply cache (a test of the job directory alone)."""
    args = jobprocs.run_args(
        tmp_path,
        base_url,
        api_key="sk-crash-test",
        concurrency=concurrency,
        flush_rows=flush_rows,
        flush_seconds=flush_seconds,
        job=job,
    )
    return args if cache else [*args, "--no-cache"]


def file_size_limit(limit: int) -> Callable[[], None]:
    """A preexec_fn: no file may grow past `limit` bytes; a write past it fails with EFBIG."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


def run_job(args: list[str], *, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=child_env(), timeout=180, preexec_fn=preexec_fn)


def export_rows(job: Path, out: Path) -> pd.DataFrame:
    subprocess.run(
        [sys.executable, "-m", "batchhub", "export", str(job), "-o", str(out)],
        check=True,
        capture_output=True,
        env=child_env(),
        timeout=60,
    )
    return pd.read_parquet(out)


def status_json(job: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "batchhub", "status", str(job), "--json"],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_exactly_once(job: Path, out: Path, rows: int) -> None:
    """Every input row once, in input order, all ok, each with its own prompt's answer (from a reply sent, or
    reused from the reply cache the killed runs wrote); and the job holds exactly one result per row."""
    df = export_rows(job, out)
    assert df["row_id"].tolist() == list(range(rows))
    assert df["prompt"].tolist() == [f"row {i}: say something about the sea" for i in range(rows)]
    assert (df["status"] == "ok").all(), df["status"].value_counts(dropna=False)
    assert (df["content"] == "echo: " + df["prompt"]).all()
    recorded = JobStore(job).results(["row_id", "seq"])
    assert sorted(recorded["row_id"].to_pylist()) == list(range(rows))


def traceback_free_error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip()]


# -- the job directory as a crash leaves it ----------------------------------------------------


@dataclass
class DiskState:
    #: half-written temp files, relative to the job directory
    temps: set[str] = field(default_factory=set)
    #: rows with a result (parts and journal, nothing counted twice)
    done: int = 0
    #: runs recorded in job.json (a run records itself once its recovery is done)
    runs: int = 0
    #: journal segments whose every line is already in a part (a kill between rename and delete)
    compacted_segments: int = 0
    journal_bytes: int = 0


def check_job_dir(job: Path, verified: dict[tuple[str, int, int], int]) -> DiskState:
    """What a crash left in the job directory, checked against the contract.

    Every `results/part-*.parquet` reads in full with pyarrow and its footer's max seq is its
    largest seq; a temp file exists only under a dot-prefixed `.tmp-` name; job.json parses;
    no row has two results and no seq appears twice. `verified` caches parts already read.
    """
    state = DiskState()
    if not job.exists():
        return state
    for entry in job.iterdir():
        if entry.name in ("job.json", "job.lock", "results") or SEGMENT_NAME.fullmatch(entry.name):
            continue
        assert MANIFEST_TEMP.fullmatch(entry.name), f"unexpected file in the job directory: {entry.name}"
        state.temps.add(entry.name)
    part_max = 0
    results = job / "results"
    if results.is_dir():
        for entry in results.iterdir():
            if PART_TEMP.fullmatch(entry.name):
                state.temps.add(f"results/{entry.name}")
                continue
            assert PART_NAME.fullmatch(entry.name), f"unexpected file in results/: {entry.name}"
            st = entry.stat()
            key = (entry.name, st.st_size, st.st_mtime_ns)
            if key not in verified:
                table = pq.read_table(entry)  # a half-written part under this name fails here
                footer = int((table.schema.metadata or {})[b"batchhub.max_seq"])
                assert table.num_rows > 0 and footer == pc.max(table["seq"]).as_py(), entry.name
                verified[key] = footer
            part_max = max(part_max, verified[key])
    if (job / "job.json").exists():
        state.runs = len(json.loads((job / "job.json").read_text())["runs"])
    for seg in job.glob("journal-*.jsonl"):
        data = seg.read_bytes()
        state.journal_bytes += len(data)
        seqs = []
        for line in data.splitlines():
            with contextlib.suppress(ValueError, KeyError):  # a torn last line
                seqs.append(int(json.loads(line)["seq"]))
        if seqs and max(seqs) <= part_max:
            state.compacted_segments += 1
    recorded = JobStore(job).results(["row_id", "seq"])
    row_ids = recorded["row_id"].to_pylist()
    seqs = recorded["seq"].to_pylist()
    assert len(set(row_ids)) == len(row_ids), "a row has two results: counted twice or sent again after it was recorded"
    assert len(set(seqs)) == len(seqs), "a result is counted twice"
    state.done = len(row_ids)
    return state


def wait_for_recovery(proc: subprocess.Popen, job: Path, before: DiskState, deadline_s: float = 30) -> str:
    """Block until a resumed run shows its first sign of recovery on disk; returns which sign."""
    results = job / "results"
    parts = {p.name for p in results.glob("part-*.parquet")}
    segments = {p.name for p in job.glob("journal-*.jsonl")}
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and proc.poll() is None:
        names = set(os.listdir(results)) if results.is_dir() else set()
        if any(PART_TEMP.fullmatch(n) and f"results/{n}" not in before.temps for n in names):
            return "temp part"
        if {n for n in names if PART_NAME.fullmatch(n)} != parts:
            return "new part"
        if {p.name for p in job.glob("journal-*.jsonl")} != segments:
            return "journal changed"
        time.sleep(0.0005)
    return "none"


# -- 1. SIGKILL at random moments --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("seed", PLAN.seeds)
def test_sigkill_at_random_moments_loses_nothing_and_repays_only_in_flight(
    tmp_path: Path, seed: int, prompts_csv
) -> None:
    plan = PLAN
    rng = random.Random(seed)
    prompts_csv(tmp_path / "in.csv", plan.rows)
    job = tmp_path / "job"
    verified: dict[tuple[str, int, int], int] = {}
    state = check_job_dir(job, verified)
    kills = 0
    landed: Counter[str] = Counter()
    with simulator(latency_ms=plan.latency_ms, seed=seed) as base_url:
        for run in range(plan.kills * 3):
            if kills >= plan.kills:
                break
            # flush settings are not request settings: alternate a part every 7 rows (constant
            # part writes and journal rotations) with no part at all (a big journal for the next
            # run to compact at its start)
            flush_rows = 7 if run % 2 == 0 else 100_000
            flush_seconds = 0.1 if flush_rows == 7 else 3600.0
            before = state
            during_recovery = before.journal_bytes >= plan.big_journal_bytes and rng.random() < 0.75
            with open(tmp_path / f"run-{run}.log", "w") as err:
                proc = subprocess.Popen(
                    run_args(tmp_path, base_url, flush_rows=flush_rows, flush_seconds=flush_seconds),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=child_env(),
                )
            try:
                if during_recovery:
                    sign = wait_for_recovery(proc, job, before)
                    landed[f"resume kills after first sign of recovery: {sign}"] += 1
                    delay = rng.choice((0.0, rng.uniform(0.0, 0.005), rng.uniform(0.0, 0.1)))
                else:
                    # near the end, kill early only, so the job is still unfinished at the last kill
                    delay = rng.uniform(0.0, plan.max_delay_s if before.done < plan.rows // 2 else 0.3)
                deadline = time.monotonic() + delay
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            finally:
                proc.wait(timeout=30)
            if proc.returncode != -signal.SIGKILL:
                log = (tmp_path / f"run-{run}.log").read_text()
                assert proc.returncode == 0, f"run {run} exited {proc.returncode}: {log}"
                break  # the job finished before its kill
            kills += 1
            state = check_job_dir(job, verified)
            assert state.done >= before.done, f"kill {kills} lost results: {before.done} -> {state.done}"
            if state.runs > before.runs:  # this run got past its recovery: old temp files are gone
                assert not (before.temps & state.temps), before.temps & state.temps
            else:
                landed["kills before the run finished starting (start-up or recovery)"] += 1
            if state.temps - before.temps:
                landed["kills leaving a half-written temp file"] += 1
            if state.compacted_segments:
                landed["kills leaving a journal segment already in a part"] += 1
        assert kills >= plan.kills, f"only {kills} kills: the job finished too soon, give it more rows"

        final = run_job(run_args(tmp_path, base_url, flush_rows=7, flush_seconds=0.1))
        assert final.returncode == 0, final.stderr
        end = check_job_dir(job, verified)
        assert end.temps == set(), end.temps
        assert end.done == plan.rows
        assert_exactly_once(job, tmp_path / "out.parquet", plan.rows)
        s = mock_stats(base_url)
    duplicates = s["duplicates"]
    print(
        f"\ncrash consistency (seed {seed}): rows {plan.rows}, kills {kills}, duplicates {duplicates} "
        f"(bound kills x concurrency = {kills * CONCURRENCY}), requests {s['requests']}, "
        f"parts {len(list((job / 'results').glob('part-*.parquet')))}"
    )
    for what, n in sorted(landed.items()):
        print(f"  {what}: {n}")
    assert len(s["completed_keys"]) == plan.rows
    assert duplicates <= kills * CONCURRENCY, duplicates


# -- 2. disk full, for real ----------------------------------------------------------------------

DISK_ROWS = 600


def write_error_line(stderr: str, job: Path) -> None:
    """Exactly one line says the job directory cannot be written, naming it; no traceback."""
    lines = traceback_free_error_lines(stderr)
    said = [line for line in lines if "cannot write" in line and "job directory" in line]
    assert len(said) == 1, stderr
    assert str(job) in said[0], said[0]


def test_disk_full_mid_job_stops_resumably_and_resumes_exactly_once(tmp_path: Path, prompts_csv) -> None:
    # no file may pass 60,000 bytes: room for parts of a few rows and their journal segments,
    # not for the journal segment of a run that writes no part (about 170 results)
    limit = file_size_limit(60_000)
    prompts_csv(tmp_path / "in.csv", DISK_ROWS)
    job = tmp_path / "job"
    verified: dict[tuple[str, int, int], int] = {}
    with simulator(latency_ms=10, seed=3) as base_url:
        # first parts written under the limit, then Ctrl-C. Two requests in flight: however slow a
        # compaction on a loaded machine, the next segment cannot fill the file limit meanwhile
        proc = subprocess.Popen(
            run_args(tmp_path, base_url, flush_rows=7, flush_seconds=0.1, concurrency=2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            preexec_fn=limit,
        )
        try:
            wait_for_results(job, 40, proc)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        finally:
            _, first_err = proc.communicate(timeout=60)
        assert proc.returncode == 3, first_err
        assert "Traceback" not in first_err, first_err
        write_errors = int("cannot write" in first_err)
        first = check_job_dir(job, verified)
        assert first.done >= 40 and list((job / "results").glob("part-*.parquet")), first

        # resumed under the same limit with no part until the end: the journal outgrows the limit
        full = run_job(run_args(tmp_path, base_url, flush_rows=100_000), preexec_fn=limit)
        assert full.returncode == 3, full.stderr
        write_error_line(full.stderr, job)
        assert "resume with: batchhub run" in full.stderr
        write_errors += 1
        after = check_job_dir(job, verified)  # every part readable, temp files only under dot names
        assert first.done < after.done < DISK_ROWS, (first.done, after.done)

        # room again: resume finishes, nothing lost, nothing twice
        done = run_job(run_args(tmp_path, base_url, flush_rows=7, flush_seconds=0.1))
        assert done.returncode == 0, done.stderr
        assert check_job_dir(job, verified).temps == set()
        assert_exactly_once(job, tmp_path / "out.parquet", DISK_ROWS)
        s = mock_stats(base_url)
    assert len(s["completed_keys"]) == DISK_ROWS
    # a write error abandons the requests in flight: at most `concurrency` paid twice per such stop
    assert s["duplicates"] <= write_errors * CONCURRENCY, (s["duplicates"], write_errors)


def test_disk_full_before_the_first_write_is_a_clean_resumable_stop(tmp_path: Path, prompts_csv) -> None:
    """Not even job.json (about 1.5 kB) fits: the README promises a clear message and exit 3."""
    prompts_csv(tmp_path / "in.csv", DISK_ROWS)
    job = tmp_path / "job"
    with simulator(latency_ms=5, seed=5) as base_url:
        full = run_job(run_args(tmp_path, base_url, flush_rows=7), preexec_fn=file_size_limit(1_000))
        assert full.returncode == 3, full.stderr
        write_error_line(full.stderr, job)
        check_job_dir(job, {})
        done = run_job(run_args(tmp_path, base_url, flush_rows=7))
        assert done.returncode == 0, done.stderr
        assert check_job_dir(job, {}).temps == set()
        assert_exactly_once(job, tmp_path / "out.parquet", DISK_ROWS)
        s = mock_stats(base_url)
    assert s["duplicates"] == 0


def test_disk_full_while_compacting_the_journal_on_resume_is_a_clean_resumable_stop(
    tmp_path: Path, prompts_csv
) -> None:
    """A killed run left a big journal; the disk is full when the next run compacts it."""
    prompts_csv(tmp_path / "in.csv", DISK_ROWS)
    job = tmp_path / "job"
    verified: dict[tuple[str, int, int], int] = {}
    with simulator(latency_ms=10, seed=6) as base_url:
        proc = subprocess.Popen(
            run_args(tmp_path, base_url, flush_rows=100_000),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=child_env(),
        )
        try:
            wait_for_results(job, 150, proc)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        killed = check_job_dir(job, verified)
        assert killed.journal_bytes > 8_000 and killed.done >= 150, killed

        # the part of ~150 results needs more than 8,000 bytes; job.json fits
        full = run_job(run_args(tmp_path, base_url, flush_rows=7), preexec_fn=file_size_limit(8_000))
        assert full.returncode == 3, full.stderr
        write_error_line(full.stderr, job)
        kept = check_job_dir(job, verified)
        assert kept.done == killed.done  # what was written stays readable

        done = run_job(run_args(tmp_path, base_url, flush_rows=7))
        assert done.returncode == 0, done.stderr
        assert check_job_dir(job, verified).temps == set()
        assert_exactly_once(job, tmp_path / "out.parquet", DISK_ROWS)
        s = mock_stats(base_url)
    assert s["duplicates"] <= CONCURRENCY  # the one kill


# -- 3. an unusable job directory ----------------------------------------------------------------


def test_job_dir_that_is_a_regular_file_is_a_clean_one_line_error(tmp_path: Path, prompts_csv) -> None:
    prompts_csv(tmp_path / "in.csv", 20)
    not_a_dir = tmp_path / "job"
    not_a_dir.write_text("not a directory\n")
    with simulator(latency_ms=0, seed=1) as base_url:
        done = run_job(run_args(tmp_path, base_url, flush_rows=7))
        s = mock_stats(base_url)
    lines = traceback_free_error_lines(done.stderr)
    assert done.returncode in (2, 3), done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(not_a_dir) in lines[0], done.stderr
    assert not_a_dir.read_text() == "not a directory\n"
    assert s["requests"] == 0


# -- 4. a crash state made by hand ---------------------------------------------------------------

HAND_ROWS = 200
IN_PART = 80  # seq 1..80 in part-000001 (and, again, in journal-000001)
IN_JOURNAL = 150  # seq 81..150 only in journal-000002, whose part write was cut short


def _journal_line(row: dict) -> bytes:
    row = dict(row)
    row["finished_at"] = row["finished_at"].timestamp()
    return json.dumps(row, separators=(",", ":")).encode() + b"\n"


def test_resume_after_a_kill_mid_part_write_counts_once_and_sends_only_the_rest(tmp_path: Path, prompts_csv) -> None:
    prompts_csv(tmp_path / "in.csv", HAND_ROWS)
    job = tmp_path / "job"
    results = job / "results"
    with simulator(latency_ms=0, seed=9) as base_url:
        first = run_job(run_args(tmp_path, base_url, flush_rows=100_000))
        assert first.returncode == 0, first.stderr
        (part,) = JobStore(job).parts()
        table = pq.read_table(part).sort_by("seq")
        assert table["seq"].to_pylist() == list(range(1, HAND_ROWS + 1))
        rows = table.to_pylist()

        # the state a kill leaves: part 1 written (seq <= 80) but its segment not yet deleted,
        # segment 2 (seq 81..150) with a torn last line, and part 2 of segment 2 half-written
        part.unlink()
        head = table.slice(0, IN_PART)
        pq.write_table(head.replace_schema_metadata({b"batchhub.max_seq": str(IN_PART).encode()}), part)
        (job / "journal-000001.jsonl").write_bytes(b"".join(_journal_line(r) for r in rows[:IN_PART]))
        torn = _journal_line(rows[IN_JOURNAL])
        (job / "journal-000002.jsonl").write_bytes(
            b"".join(_journal_line(r) for r in rows[IN_PART:IN_JOURNAL]) + torn[: len(torn) // 2]
        )
        pq.write_table(table.slice(IN_PART, IN_JOURNAL - IN_PART), tmp_path / "whole.parquet")
        whole = (tmp_path / "whole.parquet").read_bytes()
        temp = results / ".part-000002.parquet.tmp-999"
        temp.write_bytes(whole[: len(whole) // 2])

        st = status_json(job)
        assert (st["ok"], st["failed"], st["pending"]) == (IN_JOURNAL, 0, HAND_ROWS - IN_JOURNAL), st
        assert st["results_recorded"] == IN_JOURNAL, st

        kept = {r["row_id"]: r["response_id"] for r in rows[:IN_JOURNAL]}
        missing = {r["row_id"] for r in rows[IN_JOURNAL:]}
        before = mock_stats(base_url)
        again = run_job(run_args(tmp_path, base_url, flush_rows=7, cache=False))  # (the cache holds them all)
        assert again.returncode == 0, again.stderr
        after = mock_stats(base_url)

    assert after["requests"] - before["requests"] == len(missing)  # only the rows without a result
    assert after["duplicates"] - before["duplicates"] == len(missing)
    assert not temp.exists()
    assert JobStore(job).segments() == []
    # every result lives in exactly one part: the already-compacted segment was not compacted again
    in_parts = pa.concat_tables(
        pq.read_table(p, columns=["row_id", "seq", "response_id"]) for p in JobStore(job).parts()
    )
    assert sorted(in_parts["row_id"].to_pylist()) == list(range(HAND_ROWS))
    assert len(set(in_parts["seq"].to_pylist())) == HAND_ROWS
    latest = dict(zip(in_parts["row_id"].to_pylist(), in_parts["response_id"].to_pylist(), strict=True))
    assert {rid: latest[rid] for rid in kept} == kept  # the recorded results were not replaced
    recorded = JobStore(job).results(["row_id", "seq"])
    resent = recorded.filter(pc.greater(recorded["seq"], IN_JOURNAL))
    assert set(resent["row_id"].to_pylist()) == missing
    st = status_json(job)
    assert (st["ok"], st["failed"], st["pending"], st["results_recorded"]) == (HAND_ROWS, 0, 0, HAND_ROWS), st
    assert_exactly_once(job, tmp_path / "out.parquet", HAND_ROWS)
