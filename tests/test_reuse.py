"""A reply belongs to the request it answered: edit, insert, delete, shuffle rows, change settings, run other
jobs; each exported answer is its own prompt's (the simulator echoes it) and only new requests are sent."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from batchhub import arun_job, export_job
from batchhub.errors import JobStateError
from batchhub.manifest import Manifest
from batchhub.mock import MockServer
from batchhub.parts import write_part
from batchhub.requests import RequestBuilder
from batchhub.spec import JobSpec
from batchhub.store import JobStore


def write(path: Path, prompts: list[str]) -> Path:
    pd.DataFrame({"prompt": prompts}).to_csv(path, index=False)
    return path


def spec_for(tmp_path: Path, server: MockServer, prompts: list[str], job: str = "job", **kw) -> JobSpec:
    data = write(tmp_path / f"{job}.csv", prompts)
    kw.setdefault("model", "gpt-test")
    kw.setdefault("concurrency", 4)
    return JobSpec(input=data, job_dir=tmp_path / job, base_url=server.base_url, api_key="sk-test", quiet=True, **kw)


def exported(tmp_path: Path, job: str = "job") -> pd.DataFrame:
    out = tmp_path / f"{job}-out.parquet"
    export_job(tmp_path / job, out)
    return pd.read_parquet(out)


def assert_aligned(frame: pd.DataFrame) -> None:
    """Every row's answer is the echo of its own prompt."""
    assert frame["status"].eq("ok").all()
    assert (frame["content"] == "echo: " + frame["prompt"]).all(), frame[["prompt", "content"]]


async def sent_now(server: MockServer, spec: JobSpec) -> tuple[list[str], object]:
    """The prompts the simulator answered during a run of `spec`, and the run's summary."""
    before = len(server.prompts_seen)
    summary = await arun_job(spec, progress=False)
    return server.prompts_seen[before:], summary


PROMPTS = [f"question {i}" for i in range(20)]


async def test_insert_edit_delete_shuffle_append_send_only_new_requests(tmp_path: Path, mock_server) -> None:
    server = await mock_server(echo=True)
    seen, _ = await sent_now(server, spec_for(tmp_path, server, PROMPTS))
    assert sorted(seen) == sorted(PROMPTS)

    inserted = ["a new first question", *PROMPTS]  # the case: every row moves down by one
    seen, summary = await sent_now(server, spec_for(tmp_path, server, inserted))
    assert seen == ["a new first question"]
    assert summary.reused == {"job": 20} and summary.http_requests == 1
    frame = exported(tmp_path)
    assert_aligned(frame)
    assert frame["reused"].fillna("sent").tolist() == ["sent"] + ["job"] * 20

    edited = list(inserted)
    edited[3], edited[10], edited[17] = "edited a", "edited b", "edited c"
    seen, _ = await sent_now(server, spec_for(tmp_path, server, edited))
    assert sorted(seen) == ["edited a", "edited b", "edited c"]
    assert_aligned(exported(tmp_path))

    deleted = edited[5:]
    seen, _ = await sent_now(server, spec_for(tmp_path, server, deleted))
    assert seen == []
    assert_aligned(exported(tmp_path))

    shuffled = list(inserted)
    random.Random(7).shuffle(shuffled)
    seen, summary = await sent_now(server, spec_for(tmp_path, server, shuffled))
    assert seen == [] and summary.http_requests == 0  # every prompt was answered before, in some row
    assert_aligned(exported(tmp_path))

    appended = [*shuffled, "appended 1", "appended 2"]
    seen, _ = await sent_now(server, spec_for(tmp_path, server, appended))
    assert sorted(seen) == ["appended 1", "appended 2"]
    frame = exported(tmp_path)
    assert_aligned(frame)
    assert len(frame) == 23


async def test_force_no_longer_gives_a_row_another_rows_reply(tmp_path: Path, mock_server) -> None:
    """The issue's report: a question inserted at the top, `run --force`, and 20 of 21 rows carried another
    row's answer."""
    server = await mock_server(echo=True)
    await arun_job(spec_for(tmp_path, server, PROMPTS), progress=False)
    seen, _ = await sent_now(server, spec_for(tmp_path, server, ["inserted", *PROMPTS], force=True))
    assert seen == ["inserted"]
    assert_aligned(exported(tmp_path))


async def test_force_keeps_results_made_under_the_settings_it_replaces(tmp_path: Path, mock_server) -> None:
    server = await mock_server(echo=True)
    await arun_job(spec_for(tmp_path, server, PROMPTS[:10], max_tokens=50), progress=False)
    # new settings for the rows still to come: the ten answered rows keep their replies
    seen, _ = await sent_now(server, spec_for(tmp_path, server, PROMPTS, max_tokens=60, force=True))
    assert sorted(seen) == sorted(PROMPTS[10:])
    # and keep them in the runs after, without --force
    seen, _ = await sent_now(server, spec_for(tmp_path, server, PROMPTS, max_tokens=60))
    assert seen == []
    # for the rows that asked them: a row that moves asks with the settings of now
    seen, _ = await sent_now(server, spec_for(tmp_path, server, ["inserted", *PROMPTS], max_tokens=60))
    assert sorted(seen) == sorted(["inserted", *PROMPTS[:10]])
    assert_aligned(exported(tmp_path))
    # without --force a change of settings is a new request for every row
    seen, _ = await sent_now(server, spec_for(tmp_path, server, PROMPTS[:5], max_tokens=70))
    assert sorted(seen) == sorted(PROMPTS[:5])


async def test_rows_asking_the_same_pay_once(tmp_path: Path, mock_server) -> None:
    server = await mock_server(echo=True, latency_ms=20)
    prompts = [f"same {i % 3}" for i in range(30)]
    seen, summary = await sent_now(server, spec_for(tmp_path, server, prompts, concurrency=8))
    assert sorted(seen) == ["same 0", "same 1", "same 2"]
    assert summary.ok == 30 and summary.reused == {"job": 27}
    assert_aligned(exported(tmp_path))


async def test_a_row_waiting_for_a_failed_reply_is_sent_itself(tmp_path: Path, mock_server) -> None:
    server = await mock_server(echo=True, latency_ms=20, faults={"500": 0.5}, seed=5)
    prompts = ["same"] * 6 + [f"other {i}" for i in range(6)]
    summary = await arun_job(spec_for(tmp_path, server, prompts, concurrency=4, max_attempts=1), progress=False)
    frame = exported(tmp_path)
    ok = frame[frame["status"] == "ok"]
    assert (ok["content"] == "echo: " + ok["prompt"]).all()
    assert summary.pending == 0  # every row has a result: none stayed waiting


async def test_other_jobs_reuse_through_the_cache(tmp_path: Path, mock_server, cache_folder: Path) -> None:
    server = await mock_server(echo=True)
    await arun_job(spec_for(tmp_path, server, PROMPTS, job="first"), progress=False)
    assert (cache_folder / "replies.sqlite3").exists()
    later = [*PROMPTS[::2], "only in the second"]
    seen, summary = await sent_now(server, spec_for(tmp_path, server, later, job="second"))
    assert seen == ["only in the second"]
    assert summary.reused == {"cache": 10}
    frame = exported(tmp_path, "second")
    assert_aligned(frame)
    assert frame["reused"].fillna("sent").tolist() == ["cache"] * 10 + ["sent"]
    # the reused rows cost nothing in the second job: its spend is its one reply's
    from batchhub.cost import report, usage_table

    assert report(usage_table(tmp_path / "second"), JobSpec().price_book()).reused_replies == 10


async def test_no_cache_neither_reads_nor_writes_it(tmp_path: Path, mock_server, cache_folder: Path) -> None:
    server = await mock_server(echo=True)
    await arun_job(spec_for(tmp_path, server, PROMPTS[:5], job="first"), progress=False)
    seen, _ = await sent_now(server, spec_for(tmp_path, server, PROMPTS[:8], job="second", no_cache=True))
    assert sorted(seen) == sorted(PROMPTS[:8])  # the cache was not read
    seen, _ = await sent_now(server, spec_for(tmp_path, server, PROMPTS[:8], job="third"))
    assert sorted(seen) == sorted(PROMPTS[5:8])  # nor written: the second job's replies are not there


async def test_fresh_sends_everything_and_replaces_the_cached_replies(tmp_path: Path, mock_server) -> None:
    server = await mock_server(echo=True)
    await arun_job(spec_for(tmp_path, server, PROMPTS[:5], job="first"), progress=False)
    seen, _ = await sent_now(server, spec_for(tmp_path, server, PROMPTS[:5], job="second", fresh=True))
    assert sorted(seen) == sorted(PROMPTS[:5])
    await arun_job(spec_for(tmp_path, server, PROMPTS[:5], job="third"), progress=False)
    ids = {job: exported(tmp_path, job)["response_id"].tolist() for job in ("first", "second", "third")}
    assert ids["third"] == ids["second"] != ids["first"]  # the fresh replies replaced the first ones


async def test_a_cache_that_is_not_a_database_is_reported_and_every_row_sent(
    tmp_path: Path, mock_server, cache_folder: Path
) -> None:
    server = await mock_server(echo=True)
    (cache_folder / "replies.sqlite3").write_bytes(b"this is no database" * 100)
    summary = await arun_job(spec_for(tmp_path, server, PROMPTS[:5]), progress=False)
    assert summary.ok == 5 and summary.http_requests == 5
    assert summary.cache_note is not None and "not used" in summary.cache_note
    assert_aligned(exported(tmp_path))


async def test_export_waits_for_a_run_that_checked_every_row(tmp_path: Path, mock_server) -> None:
    server = await mock_server(echo=True)
    spec = spec_for(tmp_path, server, PROMPTS)
    await arun_job(spec, progress=False)
    store = JobStore(tmp_path / "job")
    manifest = store.manifest()
    manifest.results_checked = False  # as a run that stopped before its reader reached the end leaves it
    store.write_manifest(manifest)
    with pytest.raises(JobStateError, match="checked every row"):
        exported(tmp_path)
    await arun_job(spec, progress=False)
    assert store.manifest().results_checked is True
    assert_aligned(exported(tmp_path))


async def test_a_job_from_before_request_hashes_named_requests_resumes_without_paying_again(
    tmp_path: Path, mock_server
) -> None:
    server = await mock_server(echo=True)
    spec = spec_for(tmp_path, server, PROMPTS)
    await arun_job(spec, progress=False)
    # the job as an older batchhub left it: the hash of the body as built, no version in job.json
    store = JobStore(tmp_path / "job")
    builder = RequestBuilder(spec, ["prompt"])
    for part in store.parts():
        table = pq.read_table(part)
        prompts = [PROMPTS[i] for i in table["row_id"].to_pylist()]
        legacy = [builder.legacy_hash({"prompt": p}) for p in prompts]
        write_part(part, table.set_column(table.schema.get_field_index("request_hash"), "request_hash", [legacy]))
    data = json.loads(store.manifest_path.read_text())
    for key in ("request_hash_version", "endpoint", "results_checked"):
        data.pop(key, None)
    store.manifest_path.write_text(json.dumps(data))
    seen, summary = await sent_now(server, spec)
    assert seen == [] and summary.mismatched_results == 0
    assert Manifest.load(store.manifest_path).legacy_hash_seq == 20
    # its old results are checked by position: a row that moved is sent again, never given another's reply
    seen, _ = await sent_now(server, spec_for(tmp_path, server, ["inserted", *PROMPTS]))
    assert seen[0] == "inserted"
    assert_aligned(exported(tmp_path))


def test_two_jobs_writing_one_cache_at_once_both_land(tmp_path: Path, prompts_csv, cache_folder: Path) -> None:
    """Two `batchhub run` processes share the reply cache at once; a third job finds every reply of both."""
    import subprocess
    import sys

    from jobprocs import child_env

    from batchhub.mock import SimulatorProcess

    prompts = [f"shared question {i}" for i in range(150)]
    write(tmp_path / "a.csv", prompts[:100])
    write(tmp_path / "b.csv", prompts[50:])
    write(tmp_path / "c.csv", prompts)
    with SimulatorProcess("--echo", "--latency-ms", "5", env=child_env()) as sim:

        def command(name: str) -> list[str]:
            return [sys.executable, "-m", "batchhub", "run", str(tmp_path / f"{name}.csv"), "--model", "gpt-test"]

        base = ["--base-url", sim.base_url, "--api-key", "sk-test", "--concurrency", "8", "-q"]
        procs = [subprocess.Popen([*command(n), *base, "--job-dir", str(tmp_path / n)], env=child_env()) for n in "ab"]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        both = sim.prompts_seen()
        assert sorted(set(both)) == sorted(prompts)  # the overlap may be sent by both: they ran at once
        done = subprocess.run([*command("c"), *base, "--job-dir", str(tmp_path / "c")], env=child_env())
        assert done.returncode == 0
        assert sim.prompts_seen() == both  # the third job sent nothing: every reply of both jobs is in the cache
    for name in "abc":
        assert_aligned(exported(tmp_path, name))


async def test_a_damaged_cache_entry_is_not_served_its_row_is_sent_and_the_run_says_so(
    tmp_path: Path, mock_server, cache_folder: Path
) -> None:
    import sqlite3

    server = await mock_server(echo=True)
    await arun_job(spec_for(tmp_path, server, PROMPTS[:5], job="first"), progress=False)
    # another reply written over one entry's data, its checksum left as it was: a damaged entry
    with sqlite3.connect(cache_folder / "replies.sqlite3") as db:
        (key, data) = db.execute("SELECT key, data FROM replies ORDER BY id LIMIT 1").fetchone()
        db.execute("UPDATE replies SET data = ? WHERE key = ?", (data.replace(b"echo: ", b"ECHO: "), key))
    seen, summary = await sent_now(server, spec_for(tmp_path, server, PROMPTS[:5], job="second"))
    assert len(seen) == 1 and summary.reused == {"cache": 4}
    assert summary.cache_note is not None and "1 damaged entry" in summary.cache_note
    assert_aligned(exported(tmp_path, "second"))  # no "ECHO: " served


async def test_an_estimate_counts_only_the_requests_not_answered_yet(tmp_path: Path, mock_server) -> None:
    from batchhub.estimate import estimate

    server = await mock_server(echo=True)
    await arun_job(spec_for(tmp_path, server, PROMPTS[:10], job="first"), progress=False)
    later = spec_for(tmp_path, server, [*PROMPTS, PROMPTS[15]], job="second")  # one row asks what another asks
    est = estimate(later, later.price_book())
    assert (est.rows, est.rows_answered) == (10, 11)
    uncached = estimate(spec_for(tmp_path, server, PROMPTS, job="third", no_cache=True), later.price_book())
    assert (uncached.rows, uncached.rows_answered) == (20, 0)
