"""The job store under hostile conditions: failing reads, hand-made journal lines, racing readers, bit flips."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import random
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from jobprocs import child_env

from batchhub import journal as journal_module
from batchhub import parts as parts_module
from batchhub.cli import main
from batchhub.errors import JobStopped
from batchhub.result_schema import RESULT_COLUMNS
from batchhub.status import job_status
from batchhub.store import STATE_NONE, STATE_OK, JobStore


def result(store: JobStore, row_id: int, **kw: object) -> dict:
    row = {
        "row_id": row_id,
        "status": "ok",
        "content": f"answer {row_id}",
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "finished_at": 1_700_000_000.0 + row_id,
        "seq": store.next_seq(),
        **kw,
    }
    store.append(row)
    return row


def journal_only(tmp_path: Path, rows: int) -> tuple[JobStore, Path]:
    """A store holding `rows` results in one closed journal segment and no part."""
    store = JobStore(tmp_path / "job")
    store.recover()
    segment = store.open_segment()
    for i in range(rows):
        result(store, i)
    store.close()
    return store, segment


@pytest.fixture
def no_fast_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's JSON reader fails for want of memory: segments are read line by line."""

    def read_json(*args: object, **kwargs: object) -> pa.Table:
        raise pa.ArrowMemoryError("malloc of size 1048576 failed")

    monkeypatch.setattr(journal_module.pj, "read_json", read_json)


def orjson_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson as it fails under memory pressure: a ValueError (JSONDecodeError) on a complete line."""

    def loads(data: bytes) -> object:
        raise orjson.JSONDecodeError("Not enough memory", "", 0)

    monkeypatch.setattr(journal_module.orjson, "loads", loads)


def no_memory(data: bytes) -> object:
    raise MemoryError


# -- 2: a journal is deleted only when every complete line in it is in a part ---------------------------


def test_an_orjson_memory_error_loses_no_result_at_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_fast_reader: None
) -> None:
    store, segment = journal_only(tmp_path, 6)
    orjson_out_of_memory(monkeypatch)
    part = store.compact(None, segment)
    assert part is not None and pq.read_table(part)["row_id"].to_pylist() == list(range(6))
    assert not segment.exists()


def test_a_segment_that_cannot_be_read_stops_the_job_and_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_fast_reader: None
) -> None:
    store, segment = journal_only(tmp_path, 6)
    kept = segment.read_bytes()
    orjson_out_of_memory(monkeypatch)

    monkeypatch.setattr(journal_module, "_parse_json", no_memory)
    with pytest.raises(JobStopped, match="could not be read \\(out of memory\\); it is kept") as info:
        store.compact(None, segment)
    assert info.value.exit_code == 3
    assert segment.read_bytes() == kept and store.parts() == []
    with pytest.raises(JobStopped):
        JobStore(store.dir).recover()
    assert segment.read_bytes() == kept and store.parts() == []
    monkeypatch.undo()
    assert JobStore(store.dir).recover() == 6


def test_a_run_whose_journal_cannot_be_read_exits_3_and_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pd.DataFrame({"prompt": [f"p{i}" for i in range(8)]}).to_csv(tmp_path / "in.csv", index=False)
    job = tmp_path / "job"
    args = ["run", str(tmp_path / "in.csv"), "--mock", "--model", "m", "--job-dir", str(job), "--quiet"]
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    # the 8 results back in the journal only, as a killed run leaves them
    (part,) = (job / "results").glob("part-*.parquet")
    rows = pq.read_table(part).to_pylist()
    part.unlink()
    lines = b"".join(
        orjson.dumps({**r, "finished_at": r["finished_at"].timestamp()}, option=orjson.OPT_APPEND_NEWLINE) for r in rows
    )
    segment = job / "journal-000001.jsonl"
    segment.write_bytes(lines)

    def read_json(*a: object, **k: object) -> pa.Table:
        raise pa.ArrowMemoryError("malloc failed")

    monkeypatch.setattr(journal_module.pj, "read_json", read_json)
    # every line fails as orjson fails for want of memory (raising=False: the seam is new with the fix)
    monkeypatch.setattr(journal_module, "_parse_json", no_memory, raising=False)
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    assert out.exit_code == 3, out.output
    assert "could not be read (out of memory)" in out.output
    assert segment.read_bytes() == lines
    monkeypatch.undo()
    assert job_status(job).ok == 8


# -- 12: hand-made journal lines are skipped and reported --------------------------------------------


def test_hand_made_journal_values_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pd.DataFrame({"prompt": [f"p{i}" for i in range(5)]}).to_csv(tmp_path / "in.csv", index=False)
    job = tmp_path / "job"
    args = ["run", str(tmp_path / "in.csv"), "--mock", "--model", "m", "--job-dir", str(job), "--quiet"]
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    assert job_status(job).ok == 5
    good = {"status": "ok", "content": "hand", "finished_at": 1_700_000_000.0}
    own = JobStore(job).latest_results(["row_id", "request_hash"])["request_hash"][0].as_py()
    segment = job / "journal-000009.jsonl"
    segment.write_text(
        "\n".join(
            [
                json.dumps({**good, "row_id": "abc", "seq": 100}),
                json.dumps({**good, "row_id": 1, "seq": 2**63}),
                json.dumps({**good, "row_id": -5, "seq": 101}),
                json.dumps({**good, "row_id": 5, "seq": 102}),  # row_id >= rows
                json.dumps({**good, "row_id": 2, "seq": 103, "status": 7}),
                "not json at all",
                # a later result of row 0's own request (a result without a request hash is no row's answer)
                json.dumps({**good, "row_id": 0, "seq": 104, "content": "a real later result", "request_hash": own}),
            ]
        )
        + "\n"
    )
    caplog.set_level(logging.WARNING, logger="batchhub")
    st = job_status(job)
    assert (st.ok, st.failed, st.pending, st.total_rows) == (5, 0, 0, 5)
    JobStore(job).latest_results(["row_id"])  # a reader of rows (status reads every result: what was spent)
    text = caplog.text
    assert f"{segment}: 5 line(s) are not results (the first is line 1); skipped" in text
    assert "1 result(s) name a row outside the input (0 to 4); skipped" in text

    caplog.clear()
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert not segment.exists() and segment.with_name(segment.name + ".bad").exists()  # kept aside, not deleted
    latest = JobStore(job).latest_results(["row_id", "content"])
    assert latest["row_id"].to_pylist() == [0, 1, 2, 3, 4]
    assert latest["content"].to_pylist()[0] == "a real later result"
    assert job_status(job).ok == 5


# -- 3: readers racing a running job ----------------------------------------------------------------


def test_readers_racing_compaction_see_no_error_and_never_fewer_results(tmp_path: Path) -> None:
    writer = JobStore(tmp_path / "job", rows=10_000)
    writer.recover()
    rounds, per_round = 150, 4
    failures: list[BaseException] = []

    def write() -> None:
        try:
            segment = writer.open_segment()
            for r in range(rounds):
                for i in range(per_round):
                    result(writer, r * per_round + i)
                writer.write_journal()
                old, segment = segment, writer.open_segment()
                writer.compact(None, old)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    seen: list[int] = []
    reader = JobStore(tmp_path / "job", rows=10_000)
    while thread.is_alive() or len(seen) < 3:
        seen.append(reader.results(["row_id", "status"]).num_rows)
    thread.join()
    seen.append(reader.results(["row_id", "status"]).num_rows)
    assert not failures, failures
    assert all(b >= a for a, b in itertools.pairwise(seen)), [(a, b) for a, b in itertools.pairwise(seen) if b < a]
    assert seen[-1] == rounds * per_round and len(seen) > 10


# -- 14: bit flips in a part ----------------------------------------------------------------------


def _part(tmp_path: Path, rows: int = 120) -> tuple[JobStore, Path]:
    store = JobStore(tmp_path / "job", rows=rows)
    store.recover()
    store.open_segment()
    rng = random.Random(7)
    for i in range(rows):
        result(store, i, content=f"answer {i} " + "x" * rng.randint(0, 40), latency_s=rng.random(), model="m")
    store.close()
    JobStore(store.dir, rows=rows).recover()
    (part,) = store.parts()
    return store, part


def test_bit_flips_in_a_part_are_caught_never_silently_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, part = _part(tmp_path)
    original = store.latest_results().to_pylist()
    data = part.read_bytes()
    caplog.set_level(logging.WARNING, logger="batchhub")
    outcomes = {"same": 0, "reported": 0}
    for trial in range(150):
        rng = random.Random(trial)
        flipped = bytearray(data)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        part.write_bytes(bytes(flipped))
        caplog.clear()
        got = JobStore(store.dir, rows=120).latest_results().to_pylist()  # no exception, whatever the flip
        if got == original:
            outcomes["same"] += 1  # a flip in bytes no value depends on (statistics, padding)
        else:
            assert got == [] and f"the part {part} is damaged" in caplog.text, trial
            outcomes["reported"] += 1
    assert outcomes["reported"] > 100, outcomes


def test_a_run_sets_a_damaged_part_aside_and_resends_its_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, part = _part(tmp_path, rows=10)
    good = part.read_bytes()
    for trial in range(100):  # the first seeded flip that a reader reports (one in a data page)
        rng = random.Random(trial)
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        part.write_bytes(bytes(data))
        if JobStore(store.dir, rows=10).results().num_rows == 0:
            break
    caplog.set_level(logging.WARNING, logger="batchhub")
    run = JobStore(store.dir, rows=10)
    run.recover()
    aside = part.with_name(part.name + ".damaged")
    assert aside.read_bytes() == bytes(data) and not part.exists()
    assert f"set aside as {aside.name}" in caplog.text
    assert run.row_states(10).tolist() == [STATE_NONE] * 10  # sent again
    run.open_segment()
    result(run, 3)
    run.close()
    run2 = JobStore(store.dir, rows=10)
    run2.recover()
    assert run2.parts()[0].name == "part-000002.parquet"  # the number of the part set aside is not reused
    assert run2.row_states(10)[3] == STATE_OK


def test_a_part_is_written_with_page_checksums(tmp_path: Path) -> None:
    _, part = _part(tmp_path, rows=5)
    table = pq.read_table(part, page_checksum_verification=True)
    assert table.num_rows == 5 and table.column_names == list(RESULT_COLUMNS)
    meta = pq.read_metadata(part)
    assert meta.metadata[b"batchhub.checked"] == b"1"


def test_a_part_unreadable_for_want_of_memory_is_not_taken_for_damage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, part = _part(tmp_path, rows=10)
    good = part.read_bytes()

    def no_decompressor(*args: object, **kwargs: object) -> object:
        raise OSError("ZSTD_DCtx create failed")  # what pyarrow says under ulimit -v

    monkeypatch.setattr(parts_module.pq, "ParquetFile", no_decompressor)
    monkeypatch.setattr(parts_module.pq, "read_table", no_decompressor)  # the sound test part fails too
    with pytest.raises(JobStopped, match="nor could a sound test part") as info:
        JobStore(store.dir, rows=10).recover()
    assert info.value.exit_code == 3
    with pytest.raises(JobStopped):
        JobStore(store.dir, rows=10).results()
    assert part.read_bytes() == good and not part.with_name(part.name + ".damaged").exists()


@pytest.mark.parametrize("limit_kb", [400_000, 500_000, 1_000_000])
def test_a_resume_under_ulimit_v_loses_nothing_and_sets_nothing_aside(tmp_path: Path, limit_kb: int) -> None:
    """Whatever fails under the address-space limit (import, journal read, part read), nothing is lost.

    Under such a limit CPython itself may hang in `Thread.start` (the new thread cannot get its
    thread-local data and never signals that it started): such a run is killed after 20 s, which
    is one more way to fail, and nothing may be lost then either."""
    pd.DataFrame({"prompt": [f"p{i}" for i in range(8)]}).to_csv(tmp_path / "in.csv", index=False)
    job = tmp_path / "job"
    args = ["run", str(tmp_path / "in.csv"), "--mock", "--model", "m", "--job-dir", str(job), "--quiet"]
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    (part,) = (job / "results").glob("part-*.parquet")
    rows = pq.read_table(part).to_pylist()
    part.unlink()
    (job / "journal-000001.jsonl").write_bytes(
        b"".join(
            orjson.dumps({**r, "finished_at": r["finished_at"].timestamp()}, option=orjson.OPT_APPEND_NEWLINE)
            for r in rows
        )
    )
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "batchhub", *args])
    with contextlib.suppress(subprocess.TimeoutExpired):  # killed: see the docstring
        subprocess.run(
            ["bash", "-c", f"ulimit -v {limit_kb}; exec {command}"], capture_output=True, env=child_env(), timeout=20
        )
    assert job_status(job).ok == 8
    assert not list(job.rglob("*.damaged"))
