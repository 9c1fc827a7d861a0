"""A job in a bucket, used as a demanding user would: the store going down mid-run, runs racing for one
job, a job deleted and run again, damaged and vanished parts, secrets (moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from s3proxy import CountingProxy
from s3server import S3Bucket, point_at

import batchhub
from batchhub import defaults
from batchhub.cli import main
from batchhub.errors import UsageError
from batchhub.objstore import ObjectURL
from batchhub.remote_job import folder_for
from batchhub.spec import JobSpec

ROWS = 120


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def run_job(data: Path, base_url: str, job: str, *extra: str) -> tuple[int, str]:
    return invoke(
        "run", str(data), "--model", "m", "--base-url", base_url, "--api-key", "sk-hostile-test", "--job-dir", job,
        "--concurrency", "4", "--flush-rows", "20", "--no-cache", "-q", *extra,
    )  # fmt: skip


def status(job: str) -> dict[str, int]:
    code, out = invoke("status", job, "--json")
    assert code == 0, out
    found = json.loads(out)
    return {name: found[name] for name in ("ok", "failed", "pending")}


@pytest.fixture(autouse=True)
def quick_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lease settles in 10 ms, not a second: no test here races two runs for one (a second per run)."""
    monkeypatch.setattr(defaults, "STORAGE_LEASE_SETTLE_S", 0.01)


@pytest.fixture
def proxy(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingProxy]:
    """The bucket's server behind a proxy that can go down (`proxy.down`, `proxy.down_after_parts`)."""
    monkeypatch.setattr(defaults, "STORAGE_ATTEMPTS", 1)  # a store down fails at once, not after retries
    found = CountingProxy(s3.endpoint)
    point_at(monkeypatch, found.endpoint)
    yield found
    found.close()


def test_the_store_going_down_mid_run_stops_it_resumable_and_the_resume_commits_what_was_left(
    s3: S3Bucket, proxy: CountingProxy, threaded_mock, prompts_csv, tmp_path: Path
) -> None:
    server = threaded_mock(latency_ms=1)
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    job = s3.url("jobs/down")
    proxy.down_after_parts = 1  # the store answers 503 to everything once the first part is in
    code, out = run_job(data, server.base_url, job)
    assert code == 3, out  # stopped, resumable: not a usage error
    (stopped,) = [line for line in out.splitlines() if line.startswith("stopped:")]
    assert job in stopped and "HTTP 503" in stopped and "Traceback" not in out, out
    assert s3.objects("jobs/down/results/") == [next(iter(s3.objects("jobs/down/results/")))]  # the first part
    paid_first = server.stats.completions
    proxy.down = False
    proxy.down_after_parts = None
    code, out = run_job(data, server.base_url, job)  # in this process: its own dead run's lease is no bar
    assert code == 0, out
    assert status(job) == {"ok": ROWS, "failed": 0, "pending": 0}
    # what the first run finished (journalled on this machine, not uploaded) was uploaded, not paid again
    assert server.stats.completions - ROWS <= 4, (paid_first, server.stats.completions)


def test_credentials_written_into_a_url_are_refused_and_never_repeated(
    s3: S3Bucket, prompts_csv, tmp_path: Path
) -> None:
    data = prompts_csv(tmp_path / "in.csv", 3)
    secret = "wJalrXUtnFEMI-hostile-secret"
    for args in (
        ("status", f"s3://AKIAHOSTILE:{secret}@{s3.name}/jobs/a"),
        ("run", str(data), "--mock", "--model", "m", "--job-dir", f"s3://AKIAHOSTILE:{secret}@{s3.name}/jobs/a"),
        ("run", f"s3://AKIAHOSTILE:{secret}@{s3.name}/in.csv", "--mock", "--model", "m"),
        ("status", f"https://user:{secret}@example.com/jobs/a"),
    ):
        code, out = invoke(*args)
        assert code == 2, out
        assert secret not in out and "AKIAHOSTILE" not in out, out
        assert "credentials" in out and len(out.strip().splitlines()) == 1, out


def test_export_to_a_url_without_a_format_names_the_url_not_a_temp_file(
    s3: S3Bucket, prompts_csv, tmp_path: Path
) -> None:
    data = prompts_csv(tmp_path / "in.csv", 3)
    job = s3.url("jobs/a")
    assert invoke("run", str(data), "--mock", "--model", "m", "--job-dir", job, "-q", "--no-cache")[0] == 0
    code, out = invoke("export", job, "-o", s3.url("out/"))
    assert code == 2, out
    assert out.startswith(f"error: {s3.url('out')}: unknown output format"), out
    assert "batchhub-upload" not in out, out


def test_a_dataframe_with_a_job_dir_in_a_bucket_is_refused_in_one_line_leaving_nothing(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    frame = pd.DataFrame({"prompt": ["a", "b"]})
    with pytest.raises(UsageError, match=r"DataFrame.*local job_dir.*s3://") as caught:
        batchhub.run(frame, model="m", mock=True, job_dir=s3.url("jobs/frame"), quiet=True)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == [] and s3.objects() == []


def foreign_lease(host: str = "another-host", age_s: float = 0.0) -> bytes:
    """A lease object as a run on another host writes it, renewed `age_s` ago."""

    return json.dumps(
        {"token": "f" * 32, "host": host, "pid": 4242, "renewed_at": time.time() - age_s, "renewed_every_s": 15}
    ).encode()


def test_a_run_whose_lease_another_run_takes_stops_instead_of_sending_the_rows_twice(
    s3: S3Bucket, threaded_mock, prompts_csv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that could not renew its lease for STORAGE_LEASE_S (a machine asleep, a store unreachable)
    finds another host's run holding the job: it stops (exit 3) rather than go on paying for its rows."""

    monkeypatch.setattr(defaults, "STORAGE_LEASE_S", 0.4)  # renewed (and checked) every 0.1 s
    server = threaded_mock(latency_ms=40)
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    done = threading.Event()

    def another_run_takes_the_lease() -> None:
        while not done.is_set() and "jobs/taken/job.lease" not in s3.objects("jobs/taken/"):
            done.wait(0.02)
        while not done.wait(0.05):  # and renews it, as a live run does
            s3.put("jobs/taken/job.lease", foreign_lease())

    thread = threading.Thread(target=another_run_takes_the_lease)
    thread.start()
    try:
        code, out = run_job(data, server.base_url, s3.url("jobs/taken"), "--concurrency", "2")
    finally:
        done.set()
        thread.join()
    assert code == 3, out
    (stopped,) = [line for line in out.splitlines() if line.startswith("stopped:")]
    assert "another-host" in stopped, out
    assert server.stats.completions < ROWS // 2, out


@pytest.mark.parametrize(
    ("lease", "runs"),
    [
        (5, False),  # another host's run, renewed lately: it holds the job
        (600, True),  # renewed long ago: that run is dead, its lease lapsed
        (-86_400, True),  # "renewed" a day ahead: garbage (a skewed clock is caught at renewal)
        (b"\x00not a lease{", True),  # garbage: nobody holds it
        (b"", True),
    ],
)
def test_a_lease_in_the_bucket_bars_a_run_only_while_another_host_renews_it(
    s3: S3Bucket, prompts_csv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lease: bytes | int, runs: bool
) -> None:
    """`lease`: the object's bytes, or another host's lease renewed that many seconds ago (made now, not when
    the tests were collected: a suite runs for minutes)."""
    if isinstance(lease, int):
        lease = foreign_lease(age_s=lease)
    data = prompts_csv(tmp_path / "in.csv", 5)
    s3.put("jobs/leased/job.lease", lease)
    code, out = invoke("run", str(data), "--mock", "--model", "m", "--job-dir", s3.url("jobs/leased"), "-q")
    if runs:
        assert code == 0, out
        assert "jobs/leased/job.lease" not in s3.objects("jobs/leased/")  # taken, then released
    else:
        assert code == 2 and len(out.strip().splitlines()) == 1, out
        assert "is running (pid 4242 on host another-host" in out, out
        assert s3.get("jobs/leased/job.lease") == lease and s3.objects("jobs/leased/") == ["jobs/leased/job.lease"]


def test_a_job_deleted_from_the_bucket_and_run_again_starts_over_without_the_old_parts(
    s3: S3Bucket, threaded_mock, prompts_csv, tmp_path: Path
) -> None:
    server = threaded_mock(latency_ms=1)
    data = prompts_csv(tmp_path / "in.csv", 40)
    job = s3.url("jobs/again")
    assert run_job(data, server.base_url, job)[0] == 0
    first = s3.objects("jobs/again/")
    client = s3.client()
    for key in first:
        client.delete_object(Bucket=s3.name, Key=key)
    code, out = run_job(data, server.base_url, job)  # the same machine: its stage remembers the old job
    assert code == 0, out
    parts = [key for key in s3.objects("jobs/again/") if "/results/" in key]
    assert parts and not set(parts) & set(first)  # only the new run's parts: none resurrected from the stage
    assert server.stats.completions == 80  # the job was gone: every row is sent again
    assert status(job) == {"ok": 40, "failed": 0, "pending": 0}


def test_no_credential_and_no_api_key_reaches_the_bucket_the_stage_or_the_output(
    s3: S3Bucket, threaded_mock, prompts_csv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    token = "FwoGZXIvYXdzEHostileSessionToken"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)  # moto takes any session token
    server = threaded_mock(latency_ms=1)
    data = prompts_csv(tmp_path / "in.csv", 30)
    job = s3.url("jobs/secret")
    code, out = run_job(data, server.base_url, job)
    assert code == 0, out
    outputs = [out]
    for args in (
        ("status", job),
        ("cost", job),
        ("jobs", s3.url()),
        ("report", job),
        ("export", job, "-o", s3.url("x.csv")),
    ):
        code, text = invoke(*args)
        assert code == 0, text
        outputs.append(text)
    secrets = [b"sk-hostile-test", token.encode(), s3.env["AWS_SECRET_ACCESS_KEY"].encode()]
    everything = [s3.get(key) for key in s3.objects()]

    for purpose in ("stage", "view"):
        folder = folder_for(ObjectURL.parse(job), purpose)
        everything += [path.read_bytes() for path in folder.rglob("*") if path.is_file()]
    everything += [text.encode() for text in outputs] + [caplog.text.encode()]
    assert len(everything) > 10
    for secret in secrets:
        assert not [blob[:80] for blob in everything if secret in blob], secret


def damage(blob: bytes) -> bytes:
    """The part with bytes changed in its middle (its pages' checksums no longer match)."""
    middle = len(blob) // 2
    return blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 64]) + blob[middle + 64 :]


def test_a_part_damaged_in_the_bucket_is_set_aside_there_by_the_next_run_and_its_rows_sent_again(
    s3: S3Bucket, threaded_mock, prompts_csv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    server = threaded_mock(latency_ms=1)
    data = prompts_csv(tmp_path / "in.csv", 40)
    job = s3.url("jobs/damaged")
    assert run_job(data, server.base_url, job)[0] == 0
    first, second = [key for key in s3.objects("jobs/damaged/") if "/results/" in key]
    s3.put(first, damage(s3.get(first)))
    monkeypatch.setenv("BATCHHUB_CACHE", str(tmp_path / "machine-b"))  # a run on another machine
    code, out = run_job(data, server.base_url, job)
    assert code == 0, out
    assert server.stats.completions == 40 + 20  # the damaged part's rows, once
    keys = s3.objects("jobs/damaged/")
    assert f"{first}.damaged" in keys and first not in keys and second in keys  # kept, never counted again
    monkeypatch.setenv("BATCHHUB_CACHE", str(tmp_path / "machine-c"))
    caplog.clear()
    assert status(job) == {"ok": 40, "failed": 0, "pending": 0}
    assert "damaged" not in caplog.text  # a reader no longer meets it


def test_a_part_damaged_on_this_machine_but_whole_in_the_bucket_is_fetched_again_not_paid_again(
    s3: S3Bucket, threaded_mock, prompts_csv, tmp_path: Path
) -> None:

    server = threaded_mock(latency_ms=1)
    data = prompts_csv(tmp_path / "in.csv", 40)
    job = s3.url("jobs/local-damage")
    assert run_job(data, server.base_url, job)[0] == 0
    stage = folder_for(ObjectURL.parse(job), "stage")
    (local,) = [path for path in (stage / "results").glob("part-*.parquet")][:1]
    local.write_bytes(damage(local.read_bytes()))  # this machine's disk, not the bucket
    code, out = run_job(data, server.base_url, job)
    assert code == 0, out
    assert server.stats.completions == 40  # the bucket's copy is whole: nothing is sent again
    assert not [key for key in s3.objects("jobs/local-damage/") if key.endswith(".damaged")]
    assert status(job) == {"ok": 40, "failed": 0, "pending": 0}


def test_jobs_lists_every_job_under_a_url_but_not_a_ray_jobs_task_stores(
    s3: S3Bucket, prompts_csv, tmp_path: Path
) -> None:
    data = prompts_csv(tmp_path / "in.csv", 3)
    for name in ("team/a", "shards/b"):  # a job may well live under a folder called shards
        code, out = invoke("run", str(data), "--mock", "--model", "m", "--job-dir", s3.url(name), "-q", "--no-cache")
        assert code == 0, out
    s3.put("team/a/shards/000000-run0001/job.json", s3.get("team/a/job.json"))  # a Ray task store of job a
    s3.put("notes/readme.txt", b"not a job")
    code, out = invoke("jobs", s3.url())
    assert code == 0, out
    assert s3.url("team/a") in out and s3.url("shards/b") in out, out
    assert "000000-run0001" not in out, out


def test_a_job_dir_url_naming_an_object_is_refused_as_a_file_would_be(
    s3: S3Bucket, prompts_csv, tmp_path: Path
) -> None:
    data = prompts_csv(tmp_path / "in.csv", 3)
    s3.put("data/in.csv", data.read_bytes())
    code, out = invoke("run", s3.url("data/in.csv"), "--mock", "--model", "m", "--job-dir", s3.url("data/in.csv"))
    assert code == 2, out
    assert (
        out == f"error: cannot use {s3.url('data/in.csv')} as a job directory: it is an object (a file), not a folder\n"
    )
    assert s3.objects() == ["data/in.csv"]


def test_a_run_names_its_job_by_the_url_never_by_this_machines_stage(s3: S3Bucket, tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    data.write_text('prompt\nsay hello\n""\nsay more\n')  # the empty prompt fails unsent
    job = s3.url("jobs/named")
    code, out = invoke("run", str(data), "--mock", "--model", "m", "--job-dir", job, "--no-cache")
    assert code == 1, out
    assert f"starting job {job} (3 rows" in out, out
    assert f"see failures: batchhub status {job};" in out, out
    assert "object-jobs" not in out, out
    spec = JobSpec(input=data, model="m", base_url="mock://", job_dir=job, retry_failed=True, no_cache=True)
    summary = batchhub.run_job(spec)
    assert (summary.job_dir, summary.failed) == (job, 1)
    batchhub.export_job(summary.job_dir, tmp_path / "out.csv")  # the library reads it at its URL too
    assert len(pd.read_csv(tmp_path / "out.csv")) == 3


def test_cost_prices_an_export_in_the_bucket_as_it_does_a_local_one(s3: S3Bucket, prompts_csv, tmp_path: Path) -> None:
    data = prompts_csv(tmp_path / "in.csv", 4)
    job = s3.url("jobs/priced")
    assert invoke("run", str(data), "--mock", "--model", "gpt-4o-mini", "--job-dir", job, "-q", "--no-cache")[0] == 0
    assert invoke("export", job, "-o", s3.url("out/priced.parquet"))[0] == 0
    assert invoke("export", job, "-o", str(tmp_path / "priced.parquet"))[0] == 0
    code, local = invoke("cost", str(tmp_path / "priced.parquet"), "--json")
    assert code == 0, local
    code, remote = invoke("cost", s3.url("out/priced.parquet"), "--json")
    assert code == 0, remote
    assert json.loads(remote) == json.loads(local)


def test_a_job_with_a_long_name_in_the_bucket_runs_and_reads(s3: S3Bucket, prompts_csv, tmp_path: Path) -> None:
    data = prompts_csv(tmp_path / "in.csv", 3)
    job = s3.url("jobs/" + "é" * 200)  # a key may be 1,024 bytes; a name on this machine's disk, 255
    code, out = invoke("status", job)
    assert (code, out) == (2, f"error: {job} is not a batchhub job directory (no job.json)\n")
    code, out = invoke("run", str(data), "--mock", "--model", "m", "--job-dir", job, "-q", "--no-cache")
    assert code == 0, out
    assert status(job) == {"ok": 3, "failed": 0, "pending": 0}


def test_what_is_wrong_with_a_job_in_a_bucket_is_said_of_its_url_not_of_a_folder_here(
    s3: S3Bucket, prompts_csv, tmp_path: Path, caplog
) -> None:
    s3.put("jobs/garbage/job.json", b"{not json")
    code, out = invoke("status", s3.url("jobs/garbage"))
    assert code == 2, out
    assert out.startswith(f"error: {s3.url('jobs/garbage/job.json')} cannot be read"), out
    data = prompts_csv(tmp_path / "in.csv", 3)
    job = s3.url("jobs/warned")
    assert invoke("run", str(data), "--mock", "--model", "m", "--job-dir", job, "-q", "--no-cache")[0] == 0
    (part,) = [key for key in s3.objects("jobs/warned/") if "/results/" in key]
    s3.put(part, damage(s3.get(part)))
    caplog.clear()
    assert status(job)["pending"] == 3
    assert f"the part s3://{s3.name}/{part} is damaged" in caplog.text, caplog.text
    assert "object-jobs" not in caplog.text


def test_jobs_says_what_is_wrong_with_a_job_in_a_bucket_of_its_url(s3: S3Bucket) -> None:
    s3.put("jobs/garbage/job.json", b"{not json")
    code, out = invoke("jobs", s3.url("jobs"))
    assert code == 0, out
    assert f"{s3.url('jobs/garbage/job.json')} cannot be read" in out and "object-jobs" not in out, out


def test_a_part_gone_from_the_bucket_is_uploaded_again_from_the_stage_not_paid_again(
    s3: S3Bucket, threaded_mock, prompts_csv, tmp_path: Path
) -> None:
    """A part deleted from the bucket (by hand, a lifecycle rule, another machine setting it aside) while the
    job stays: the machine whose stage holds it uploads it again; only a job deleted or replaced starts over."""
    server = threaded_mock(latency_ms=1)
    data = prompts_csv(tmp_path / "in.csv", 40)
    job = s3.url("jobs/vanished")
    assert run_job(data, server.base_url, job)[0] == 0
    first, _ = [key for key in s3.objects("jobs/vanished/") if "/results/" in key]
    s3.client().delete_object(Bucket=s3.name, Key=first)
    code, out = run_job(data, server.base_url, job)
    assert code == 0, out
    assert server.stats.completions == 40  # nothing sent again
    assert first in s3.objects("jobs/vanished/")
    assert status(job) == {"ok": 40, "failed": 0, "pending": 0}
