"""A flat start: a large input is counted and checked while the job sends, not before.

The promise kept for bad input found that way (a byte that is not UTF-8, a ragged CSV line,
a JSON Lines line that is not JSON, deep in a file past defaults.INPUT_CHECK_AHEAD_BYTES):
the job stops at the bad row with exit 2 and one line, the same message the up-front check
gives; every reply received is recorded, none of the bad row or after it; job.json says why
it stopped; a run after the file is fixed sends only the rows without a result, and in the
end every row has exactly one result. A small input is still refused before anything is
written (tests/test_bad_input.py).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from batchhub import Job, defaults, prepare_job
from batchhub.cli import main
from batchhub.errors import InputError
from batchhub.input_check import InputCheck
from batchhub.io import open_input
from batchhub.progress import Progress
from batchhub.spec import JobSpec
from batchhub.store import STATE_ERROR, STATE_NONE, STATE_OK, JobStore
from batchhub.summary import summary_lines

#: rows of the large inputs; each carries an unused `pad` cell so the file passes the check-ahead size
#: (random: gzip does not shrink it)
ROWS = 2400
BAD_ROW = 2000


def pad(i: int) -> str:
    return random.Random(i).randbytes(1300).hex()


def run(data: Path, job: Path, *extra: str) -> Result:
    return CliRunner().invoke(main, ["run", str(data), "--mock", "--model", "m", "--job-dir", str(job), "-q", *extra])


def prompt(i: int) -> str:
    return f"question {i}"


def write_csv(path: Path, bad: bytes | None, rows: int = ROWS, bad_row: int = BAD_ROW) -> None:
    lines = [b"id,pad,prompt\n"]
    for i in range(rows):
        line = f"{i},{pad(i)},{prompt(i)}\n".encode()
        lines.append(bad if bad is not None and i == bad_row else line)
    content = b"".join(lines)
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)


def write_jsonl(path: Path, bad: bytes | None) -> None:
    lines = []
    for i in range(ROWS):
        line = json.dumps({"id": i, "pad": pad(i), "prompt": prompt(i)}).encode() + b"\n"
        lines.append(bad if bad is not None and i == BAD_ROW else line)
    path.write_bytes(b"".join(lines))


CASES: dict[str, tuple[str, Callable[[Path, bytes | None], None], bytes]] = {
    "a CSV cell that is not UTF-8": (
        "in.csv",
        write_csv,
        f"{BAD_ROW},{pad(BAD_ROW)},bad \xff byte\n".encode("latin-1"),
    ),
    "a ragged CSV line": ("in.csv", write_csv, f"{BAD_ROW},{pad(BAD_ROW)}\n".encode()),
    "a gzipped CSV cell that is not UTF-8": (
        "in.csv.gz",
        write_csv,
        f"{BAD_ROW},{pad(BAD_ROW)},bad \xff byte\n".encode("latin-1"),
    ),
    "a JSON Lines line that is not JSON": ("in.jsonl", write_jsonl, b'{"id": 2000, "prompt": "cut short\n'),
    "a JSON Lines line that is not UTF-8": ("in.jsonl", write_jsonl, b'{"id": 2000, "prompt": "bad \xff"}\n'),
}


def results_this_run(result: Result) -> int:
    """The results a run recorded (each row it sent has one), as its summary says."""
    found = re.search(r"\(([\d,]+) results this run", result.output)
    assert found, result.output
    return int(found.group(1).replace(",", ""))


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_row_deep_in_a_large_input_stops_the_job_there_and_a_fixed_file_resumes(
    tmp_path: Path, case: str
) -> None:
    name, write, bad = CASES[case]
    data, job = tmp_path / name, tmp_path / "job"
    write(data, bad)
    assert data.stat().st_size * (defaults.GZIP_SIZE_FACTOR if name.endswith(".gz") else 1) > (
        defaults.INPUT_CHECK_AHEAD_BYTES
    )
    # the message reading the file gives at its bad row (the up-front check's, before anything was sent)
    with pytest.raises(InputError) as reading:
        for _ in open_input(data).iter_rows(["prompt"]):
            pass
    expected = str(reading.value)

    first = run(data, job)
    assert first.exit_code == 2, first.output
    assert first.output.splitlines() == [f"error: {expected}"]
    # the job stopped at the bad row: what it sent is recorded, the bad row and those after it are not
    manifest = json.loads((job / "job.json").read_text())
    assert manifest["input"]["bad_input"] == expected
    assert "rows" not in manifest["input"]  # never counted to its end
    assert manifest["runs"][-1]["stopped"] == "bad_input"
    before = JobStore(job).results(["row_id", "status"]).to_pylist()
    assert all(r["status"] == "ok" and r["row_id"] < BAD_ROW for r in before)
    assert len({r["row_id"] for r in before}) == len(before)

    write(data, None)  # the file, fixed
    second = run(data, job)
    assert second.exit_code == 0, second.output
    assert results_this_run(second) == ROWS - len(before)  # only the rows without a result
    after = JobStore(job).results(["row_id", "status"]).to_pylist()
    assert sorted(r["row_id"] for r in after) == list(range(ROWS))  # each row once: none sent twice
    assert all(r["status"] == "ok" for r in after)
    manifest = json.loads((job / "job.json").read_text())
    assert manifest["input"]["rows"] == ROWS and "bad_input" not in manifest["input"]


def test_a_large_good_input_is_counted_while_the_job_runs(tmp_path: Path) -> None:
    data, job = tmp_path / "in.csv", tmp_path / "job"
    write_csv(data, None)
    spec = JobSpec(input=data, base_url="mock://", api_key="k", model="m", job_dir=job, quiet=True)
    prepared = prepare_job(spec)
    assert prepared.n_rows is None and prepared.input_check is not None  # nothing waited for the count
    result = run(data, job)
    assert result.exit_code == 0, result.output
    manifest = json.loads((job / "job.json").read_text())
    assert manifest["input"]["rows"] == ROWS
    assert manifest["runs"][-1]["to_send"] == ROWS and manifest["runs"][-1]["ok"] == ROWS
    assert f"{ROWS:,} ok, 0 failed, 0 pending of {ROWS:,} rows" in result.output


async def test_replies_received_before_the_check_finds_a_bad_row_are_all_recorded(
    tmp_path: Path, mock_server: Any
) -> None:
    """The check finds the bad row only after 20 replies came back (gated on them): the job stops,
    abandons no reply it received, raises the check's error; a resume sends only the rest."""
    server = await mock_server(seed=1, latency_ms=5)
    data = tmp_path / "in.csv"
    data.write_text("prompt\n" + "".join(f"{prompt(i)}\n" for i in range(300)))
    spec = JobSpec(input=data, base_url=server.base_url, api_key="k", model="m", job_dir=tmp_path / "job", quiet=True)
    answered = threading.Event()
    replies = 0

    async def on_request_end(*_: Any) -> None:
        nonlocal replies
        replies += 1
        if replies >= 20:
            answered.set()

    def bad_after_20_replies() -> int:
        assert answered.wait(30)
        raise InputError(f"{data} line 250 is not valid JSON")

    prepared = prepare_job(spec)
    prepared.n_rows, prepared.input_check = None, InputCheck(bad_after_20_replies)  # as for a large file
    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        with pytest.raises(InputError, match="line 250 is not valid JSON"):
            await Job(prepared, session=session, progress=False).run()
    recorded = JobStore(tmp_path / "job").results(["row_id", "status"]).to_pylist()
    assert server.stats.completions == len(recorded) >= 20  # every reply received is recorded
    assert len({r["row_id"] for r in recorded}) == len(recorded)
    assert JobStore(tmp_path / "job").manifest().input.bad_input == f"{data} line 250 is not valid JSON"

    summary = await Job(prepare_job(spec), progress=False).run()  # the file was fine after all: resume
    assert summary.ok == 300 and summary.results_this_run == 300 - len(recorded)
    assert server.stats.completions == 300


async def test_the_reader_meeting_the_bad_row_first_stops_the_job_without_waiting_for_the_count(
    tmp_path: Path, mock_server: Any
) -> None:
    """The check is held back (it has not reached the bad row): the reader meets it, the job stops there
    at once with the reader's message, after sending the rows it read before it, every reply recorded.

    The bad row is in the CSV's third 4 MiB block (about 1,600 rows each): the reader's first batch
    (rows 0-2047) comes whole from the first two, its second needs the third and fails."""
    server = await mock_server(seed=2)
    data = tmp_path / "in.csv"
    bad_row = 3300
    write_csv(data, f"{bad_row},{pad(bad_row)},bad \xff byte\n".encode("latin-1"), rows=3400, bad_row=bad_row)
    with pytest.raises(InputError) as reading:
        for _ in open_input(data).iter_rows(["prompt"]):
            pass
    spec = JobSpec(input=data, base_url=server.base_url, api_key="k", model="m", job_dir=tmp_path / "job", quiet=True)
    prepared = prepare_job(spec)
    assert prepared.n_rows is None
    held = threading.Event()
    prepared.input_check = InputCheck(lambda: int(held.wait(60)))  # still counting while the job runs
    try:
        with pytest.raises(InputError) as stopped:
            await Job(prepared, progress=False).run()
    finally:
        held.set()
    assert str(stopped.value) == str(reading.value)
    recorded = JobStore(tmp_path / "job").results(["row_id", "status"]).to_pylist()
    # every reply received is recorded (how many went out before the stop depends on timing)
    assert server.stats.completions == len(recorded)
    assert all(r["status"] == "ok" and r["row_id"] < 2048 for r in recorded)
    manifest = JobStore(tmp_path / "job").manifest()
    assert manifest.input.bad_input == str(reading.value) and manifest.input.rows is None
    assert manifest.runs[-1].stopped == "bad_input"


async def test_rows_past_the_count_are_not_sent(tmp_path: Path, mock_server: Any) -> None:
    """A file that grows after it was counted (rows appended while the job runs): the job sends the rows
    it counted, as a job counted before it starts does, never the rows past them, whose replies would be
    paid for and then skipped as rows outside the input."""
    server = await mock_server(seed=3)
    data = tmp_path / "in.csv"
    data.write_text("prompt\n" + "".join(f"{prompt(i)}\n" for i in range(300)))
    spec = JobSpec(input=data, base_url=server.base_url, api_key="k", model="m", job_dir=tmp_path / "job", quiet=True)
    prepared = prepare_job(spec)
    prepared.n_rows, prepared.input_check = None, InputCheck(lambda: 250)  # counted before the last 50 came
    summary = await Job(prepared, progress=False).run()
    assert summary.ok == 250 and summary.results_this_run == 250
    assert server.stats.completions == 250
    recorded = JobStore(tmp_path / "job").results(["row_id"]).column("row_id").to_pylist()
    assert sorted(recorded) == list(range(250))


async def test_fewer_rows_than_counted_stop_the_job_as_an_input_changed(tmp_path: Path, mock_server: Any) -> None:
    """A file that shrinks after it was counted: the job stops as one counted before it starts does
    (input_changed, the results so far kept), not as if it had finished with rows left pending."""
    server = await mock_server(seed=4)
    data = tmp_path / "in.csv"
    data.write_text("prompt\n" + "".join(f"{prompt(i)}\n" for i in range(300)))
    spec = JobSpec(input=data, base_url=server.base_url, api_key="k", model="m", job_dir=tmp_path / "job", quiet=True)
    prepared = prepare_job(spec)
    prepared.n_rows, prepared.input_check = None, InputCheck(lambda: 350)  # counted before the last 50 went
    summary = await Job(prepared, progress=False).run()
    assert summary.ok == 300 and summary.pending == 50
    assert summary.stopped == "input_changed" and "expected 350 rows, read 300" in (summary.message or "")


async def test_a_stop_before_the_count_ends_does_not_wait_for_it(tmp_path: Path, mock_server: Any) -> None:
    """Ctrl-C while a very large input is still being counted: the run ends with what it has (the rows
    not counted yet, as `status` shows them; the next run counts), not after the whole file is read."""
    server = await mock_server(seed=5)
    data = tmp_path / "in.csv"
    data.write_text("prompt\n" + "".join(f"{prompt(i)}\n" for i in range(300)))
    spec = JobSpec(input=data, base_url=server.base_url, api_key="k", model="m", job_dir=tmp_path / "job", quiet=True)
    prepared = prepare_job(spec)
    counted = threading.Event()
    prepared.n_rows, prepared.input_check = None, InputCheck(lambda: int(counted.wait(60)) and 300)
    prepared.manifest.input.rows = None  # as for a large file
    job = Job(prepared, progress=False)

    async def on_request_end(*_: Any) -> None:
        job.request_stop()

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    try:
        async with aiohttp.ClientSession(trace_configs=[trace]) as session:
            job._session = session
            summary = await asyncio.wait_for(job.run(), 20)
    finally:
        counted.set()
    assert summary.stopped == "interrupted" and summary.ok >= 1
    assert "pending of 300 rows read so far (the input not counted yet)" in summary_lines(summary, "p")[0]
    manifest = JobStore(tmp_path / "job").manifest()
    assert manifest.input.rows is None  # not counted: the next run counts
    again = await Job(prepare_job(spec), progress=False).run()
    assert again.ok == 300 and again.results_this_run == 300 - summary.ok


def test_a_job_whose_rows_were_never_counted_resumes_with_a_count(tmp_path: Path) -> None:
    """A run killed before its input was counted leaves job.json without rows: the next run counts."""
    data, job = tmp_path / "in.csv", tmp_path / "job"
    data.write_text("prompt\n" + "".join(f"{prompt(i)}\n" for i in range(12)))
    assert run(data, job).exit_code == 0
    manifest = json.loads((job / "job.json").read_text())
    del manifest["input"]["rows"]
    (job / "job.json").write_text(json.dumps(manifest))
    again = run(data, job)
    assert again.exit_code == 0, again.output
    assert results_this_run(again) == 0  # nothing sent twice
    assert "12 ok, 0 failed, 0 pending of 12 rows" in again.output
    assert json.loads((job / "job.json").read_text())["input"]["rows"] == 12


def test_status_while_the_rows_are_not_counted(tmp_path: Path) -> None:
    data, job = tmp_path / "in.csv", tmp_path / "job"
    data.write_text("prompt\n" + "".join(f"{prompt(i)}\n" for i in range(5)))
    assert run(data, job).exit_code == 0
    manifest = json.loads((job / "job.json").read_text())
    del manifest["input"]["rows"]
    manifest["input"]["bad_input"] = "in.csv line 9 is not valid JSON"
    (job / "job.json").write_text(json.dumps(manifest))
    shown = CliRunner().invoke(main, ["status", str(job)])
    assert shown.exit_code == 0, shown.output
    assert "rows     not counted yet: 5 ok, 0 failed" in shown.output
    assert "stopped  at bad input: in.csv line 9 is not valid JSON" in shown.output


# -- JSON Lines keys: the first rows', the rest scanned only when the job names a key they lack --


def write_late_key(path: Path) -> Path:
    rows = [{"prompt": prompt(i)} for i in range(1500)]
    rows[1200]["late"] = "a key first seen on line 1201"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_long_jsonl_job_reads_only_its_first_rows_for_keys(tmp_path: Path) -> None:
    data = write_late_key(tmp_path / "in.jsonl")
    sampled = open_input(data, all_keys=False)
    assert sampled.columns == ("prompt",) and sampled.keys_sampled
    assert sampled.with_all_keys().columns == ("prompt", "late")
    assert open_input(data).columns == ("prompt", "late")  # as it always was
    prepared = prepare_job(JobSpec(input=data, base_url="mock://", api_key="k", model="m", job_dir=tmp_path / "j"))
    assert prepared.source.keys_sampled  # the job names only `prompt`: no scan of the rest for keys


def test_a_key_first_seen_late_is_found_and_a_misspelt_one_is_refused(tmp_path: Path) -> None:
    data = write_late_key(tmp_path / "in.jsonl")
    job = tmp_path / "job"
    misspelt = run(data, job, "--template", "{lat}")
    assert misspelt.exit_code == 2 and "did you mean {late}?" in misspelt.output, misspelt.output
    assert not job.exists()
    result = run(data, job, "--template", "{late}")
    assert result.exit_code == 1, result.output  # the rows without the key fail alone
    rows = JobStore(job).results(["row_id", "status", "error_type"]).to_pylist()
    assert [r["row_id"] for r in rows if r["status"] == "ok"] == [1200]
    assert {r["error_type"] for r in rows if r["status"] != "ok"} == {"empty_prompt"}


# -- the pieces ----------------------------------------------------------------------------------


def test_row_states_of_an_uncounted_input_reach_the_last_row_with_a_result(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "job")
    assert store.row_states(None).tolist() == []
    store.recover()
    store.open_segment()
    for row_id, status in ((4, "ok"), (1, "error")):
        store.append({"row_id": row_id, "status": status, "seq": store.next_seq(), "request_hash": "h"})
    store.close()
    assert store.row_states(None).tolist() == [STATE_NONE, STATE_ERROR, STATE_NONE, STATE_NONE, STATE_OK]
    assert store.row_states(7).tolist()[5:] == [STATE_NONE, STATE_NONE]
    assert store.row_request_hashes(None)[0].tolist() == [b"", b"h", b"", b"", b"h"]


def test_progress_shows_the_total_once_counted() -> None:
    import io

    out = io.StringIO()
    progress = Progress(total=None, enabled=True, file=out)
    progress.stats.results = 3
    progress.update()
    progress.set_total(10)
    progress.close()
    assert "3/10" in out.getvalue()


def test_the_input_check_hands_back_its_count_or_its_error() -> None:
    assert InputCheck(lambda: 7).result(timeout=10) == 7

    def bad() -> int:
        raise InputError("in.csv line 3 is bad")

    with pytest.raises(InputError, match="line 3 is bad"):
        InputCheck(bad).result(timeout=10)
