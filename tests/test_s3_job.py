"""A job directory in a bucket (`--job-dir s3://...`), against a real S3 API server on 127.0.0.1 (moto)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from jobprocs import child_env, mock_stats
from s3server import S3Bucket

from batchhub.cli import main

ROWS = 300


@pytest.fixture
def simulator(simulator_process) -> str:
    return simulator_process("--latency-ms", "20", "--seed", "5").base_url


def run_args(data: Path, base_url: str, job_url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "batchhub", "run", str(data), "--model", "m", "--base-url", base_url,
        "--api-key", "sk-s3-test", "--job-dir", job_url, "--concurrency", "8", "--flush-rows", "40", "--quiet", *extra,
    ]  # fmt: skip


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def committed_rows(s3: S3Bucket, prefix: str) -> int:
    parts = [key for key in s3.objects(prefix) if key.endswith(".parquet") and "/results/part-" in f"/{key}"]
    return sum(pq.read_table(pd.io.common.BytesIO(s3.get(key)), columns=["row_id"]).num_rows for key in parts)


def test_a_job_runs_into_a_bucket_and_every_reader_reads_it_there(
    s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path
) -> None:
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    job = s3.url("jobs/sea")
    proc = subprocess.run(run_args(data, simulator, job), env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    keys = s3.objects("jobs/sea/")
    assert "jobs/sea/job.json" in keys and "jobs/sea/job.lease" not in keys  # released at the end
    assert all(not key.endswith(".jsonl") for key in keys)  # the journal stays on the machine
    assert committed_rows(s3, "jobs/sea/") == ROWS

    code, out = cli("status", job, "--json")
    assert code == 0, out
    status = json.loads(out)
    assert (status["ok"] + status["failed"], status["pending"], status["job_dir"]) == (ROWS, 0, job)
    code, out = cli("export", job, "-o", s3.url("out/sea.parquet"))
    assert code == 0, out
    exported = pq.read_table(pd.io.common.BytesIO(s3.get("out/sea.parquet")))
    assert exported.num_rows == ROWS and exported["prompt"].to_pylist()[7] == "row 7: say something about the sea"
    code, out = cli("cost", job)
    assert code == 0 and "m" in out, out
    code, out = cli("jobs", s3.url("jobs"))
    assert code == 0 and job in out and "finished" in out, out
    code, out = cli("report", job)
    assert code == 0 and "jobs/sea/report.html" in s3.objects("jobs/sea/"), out


def kill_after_commits(args: list[str], s3: S3Bucket, prefix: str, rows: int, env: dict[str, str]) -> None:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while committed_rows(s3, prefix) < rows:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()


@pytest.mark.parametrize("machine", ["same", "another"])
def test_a_killed_run_resumes_from_the_bucket(
    s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path, machine: str
) -> None:
    """SIGKILL after some parts are committed; resume on the same machine (its stage holds the journal)
    or on another (only the bucket): nothing is lost, and only what was not committed is paid again."""
    data = prompts_csv(tmp_path / "in.csv", ROWS)
    job = s3.url("jobs/killed")
    env = child_env()
    kill_after_commits(run_args(data, simulator, job), s3, "jobs/killed/", 80, env)
    if machine == "another":  # a cache folder of its own: nothing of the first run's stage
        env["BATCHHUB_CACHE"] = str(tmp_path / "other-machine-cache")
    paid_before = mock_stats(simulator)["completions"]
    proc = subprocess.run(run_args(data, simulator, job), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    code, out = cli("status", job, "--json")
    status = json.loads(out)
    assert (status["ok"] + status["failed"], status["pending"]) == (ROWS, 0)
    paid = mock_stats(simulator)["completions"]
    # at most what was in flight (8) and, on another machine, what was journalled and not committed (< 40 + 8)
    assert paid - ROWS <= (8 if machine == "same" else 8 + 40 + 8), (paid, paid_before)
    exported = tmp_path / "out.parquet"
    code, out = cli("export", job, "-o", str(exported))
    assert code == 0, out
    assert pd.read_parquet(exported)["status"].notna().all()


def lease_record(token: str, host: str, pid: int, renewed_at: float) -> bytes:
    return json.dumps({"token": token, "host": host, "pid": pid, "renewed_at": renewed_at}).encode()


def test_the_lease_keeps_a_second_run_out_and_lapses_when_not_renewed(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchhub import defaults
    from batchhub.errors import JobStateError
    from batchhub.objstore import ObjectURL
    from batchhub.remote_job import RemoteJob

    monkeypatch.setattr(defaults, "STORAGE_LEASE_SETTLE_S", 0.05)
    url = ObjectURL.parse(s3.url("jobs/leased"))
    first = RemoteJob(url, tmp_path / "a")
    with first.lease(), pytest.raises(JobStateError, match=r"is running \(pid \d+ on host .*renewed 0 s ago\)"):
        RemoteJob(url, tmp_path / "b").lease()
    assert "jobs/leased/job.lease" not in s3.objects()  # released
    # a run on another host that stopped renewing: refused while fresh, taken over once it lapsed
    s3.put("jobs/leased/job.lease", lease_record("other", "elsewhere", 1, time.time() - 5))
    with pytest.raises(JobStateError, match="on host elsewhere"):
        RemoteJob(url, tmp_path / "c").lease()
    s3.put("jobs/leased/job.lease", lease_record("other", "elsewhere", 1, time.time() - defaults.STORAGE_LEASE_S - 1))
    with RemoteJob(url, tmp_path / "d").lease() as lease:
        assert json.loads(s3.get("jobs/leased/job.lease"))["token"] == lease.token
    s3.put("jobs/leased/job.lease", b"not json")  # garbage is no holder
    RemoteJob(url, tmp_path / "e").lease().release()


def test_a_run_that_lost_its_lease_stops_at_its_next_commit(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchhub import defaults
    from batchhub.errors import CommitError
    from batchhub.objstore import ObjectURL
    from batchhub.remote_job import RemoteJob

    monkeypatch.setattr(defaults, "STORAGE_LEASE_SETTLE_S", 0.05)
    monkeypatch.setattr(defaults, "STORAGE_LEASE_S", 0.4)  # renewed every 0.1 s
    remote = RemoteJob(ObjectURL.parse(s3.url("jobs/taken")), tmp_path / "stage")
    part = tmp_path / "stage" / "results" / "part-000001.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x")
    with remote.lease() as lease:
        remote.push(part)  # while it holds the lease
        s3.put("jobs/taken/job.lease", lease_record("thief", "elsewhere", 1, time.time()))
        deadline = time.monotonic() + 10
        while not lease.lost:
            assert time.monotonic() < deadline, "the renewal never saw the lease taken"
            time.sleep(0.02)
        with pytest.raises(CommitError, match="lost the lease"):
            remote.push(part)
    assert json.loads(s3.get("jobs/taken/job.lease"))["token"] == "thief"  # not deleted: it is not ours


def test_a_view_carries_the_times_of_the_objects(s3: S3Bucket, tmp_path: Path) -> None:
    """`jobs` says when a job last changed from its files' times: those of the objects, not of the download."""
    from batchhub.objstore import ObjectURL, listing
    from batchhub.remote_job import view

    s3.put("jobs/old/job.json", json.dumps({"format_version": 1}).encode())
    url = ObjectURL.parse(s3.url("jobs/old"))
    (stored,) = [item.mtime.timestamp() for item in listing(url)]
    time.sleep(1.1)  # the object's time and the download's differ by more than the store's 1 s resolution
    local = view(url)
    assert (local / "job.json").stat().st_mtime == pytest.approx(stored, abs=0.01)


@pytest.mark.parametrize(
    ("job", "says"),
    [
        ("s3://no-such-bucket/jobs/x", "the bucket 'no-such-bucket' does not exist"),
        ("s3://", "names no bucket"),
        ("ftp://host/jobs/x", "not ftp://"),
    ],
)
def test_a_job_directory_url_that_cannot_be_used_is_one_line_before_anything_is_sent(
    s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path, job: str, says: str
) -> None:
    data = prompts_csv(tmp_path / "in.csv", 5)
    proc = subprocess.run(run_args(data, simulator, job), env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert mock_stats(simulator)["requests"] == 0
    for command in (["status", job], ["export", job, "-o", str(tmp_path / "o.parquet")], ["cost", job]):
        code, out = cli(*command)
        assert code == 2 and says in out and len(out.strip().splitlines()) == 1, (command, out)


def test_a_url_without_a_job_and_denied_credentials_are_one_line(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    from s3server import MotoProcess, point_at

    code, out = cli("status", s3.url("jobs/none"))
    assert code == 2 and out.strip() == f"error: {s3.url('jobs/none')} is not a batchhub job directory (no job.json)"
    server = MotoProcess(auth=True)
    try:
        denied = S3Bucket(server.endpoint)
        point_at(monkeypatch, denied.endpoint)
        code, out = cli("status", denied.url("jobs/x"))
        assert code == 2 and "access denied" in out and len(out.strip().splitlines()) == 1, out
        assert denied.env["AWS_SECRET_ACCESS_KEY"] not in out
    finally:
        server.stop()


def journal_lines(stage: Path) -> int:
    return sum(len(seg.read_bytes().splitlines()) for seg in stage.glob("journal-*.jsonl"))


def test_a_stage_left_behind_while_another_machine_ran_the_job_keeps_only_what_is_still_news(
    s3: S3Bucket, simulator: str, prompts_csv, tmp_path: Path
) -> None:
    """Machine A is killed with results journalled and not committed; machine B resumes the job, commits some
    of those rows again and is killed; A runs again. A's journal predates B's parts: a line whose row B answered
    is dropped, the others are recorded numbered after B's results (no two results of a row share a seq, and
    B's answer stays the latest), and A does not send them again."""
    from batchhub.objstore import ObjectURL
    from batchhub.remote_job import folder_for

    data = prompts_csv(tmp_path / "in.csv", ROWS)
    job, prefix = s3.url("jobs/two-machines"), "jobs/two-machines/"
    env_a = {**child_env(), "BATCHHUB_CACHE": str(tmp_path / "machine-a")}
    env_b = {**child_env(), "BATCHHUB_CACHE": str(tmp_path / "machine-b")}
    stage_a = folder_for(ObjectURL.parse(job), "stage", tmp_path / "machine-a")
    proc = subprocess.Popen(run_args(data, simulator, job), env=env_a, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (committed_rows(s3, prefix) >= 40 and journal_lines(stage_a) >= 25):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    # B goes one request at a time and commits every 5: it is killed having answered a few of A's rows
    slow = run_args(data, simulator, job, "--concurrency", "1", "--flush-rows", "5")
    kill_after_commits(slow, s3, prefix, committed_rows(s3, prefix) + 5, env_b)
    done_before = len(set(committed(s3, prefix)["row_id"]))
    paid_before = mock_stats(simulator)["completions"]
    last = subprocess.run(run_args(data, simulator, job), env=env_a, capture_output=True, text=True, timeout=120)
    assert last.returncode == 0, last.stderr
    found = re.search(
        r"(\d+) result\(s\) an earlier run left on this machine predate .*: (\d+) of them recorded, (\d+) dropped",
        last.stderr,
    )
    assert found is not None, last.stderr
    kept, dropped = int(found.group(2)), int(found.group(3))
    assert kept > 0 and dropped > 0, last.stderr  # rows B answered, and rows it did not reach
    # A's last run sent only what no machine had answered: not the journal lines it kept
    assert mock_stats(simulator)["completions"] - paid_before == ROWS - done_before - kept
    table = committed(s3, prefix)
    assert set(table["row_id"]) == set(range(ROWS)) and (table.groupby("row_id")["status"].last() == "ok").all()
    assert not table.duplicated(["row_id", "seq"]).any(), "two results of one row share a seq"
    assert json.loads(cli("status", job, "--json")[1])["ok"] == ROWS


def committed(s3: S3Bucket, prefix: str) -> pd.DataFrame:
    import io

    parts = [key for key in s3.objects(prefix) if key.endswith(".parquet")]
    tables = [pd.read_parquet(io.BytesIO(s3.get(key)), columns=["row_id", "seq", "status"]) for key in parts]
    return pd.concat(tables).sort_values("seq") if tables else pd.DataFrame({"row_id": [], "seq": [], "status": []})
