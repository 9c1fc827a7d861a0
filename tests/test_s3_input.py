"""Inputs read from an S3 bucket (moto's S3 server on 127.0.0.1): the same job as from local files, resumed,
estimated; Parquet read by ranged GETs of the row groups asked for; every problem one line, exit 2."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from s3proxy import CountingProxy
from s3server import MotoProcess, S3Bucket, point_at, unreachable_endpoint

import batchhub
from batchhub import arun_job
from batchhub.cli import main
from batchhub.io import fingerprint, input_size, open_input
from batchhub.spec import JobSpec, load_spec

ROWS = 60
#: the result columns that do not depend on when or how fast the job ran
SAME_COLUMNS = ["row_id", "status", "content", "finish_reason", "prompt_tokens", "completion_tokens", "request_hash"]


def prompts(n: int = ROWS) -> pd.DataFrame:
    return pd.DataFrame({"id": range(n), "question": [f"What is fact {i} about owls?" for i in range(n)]})


def write_inputs(folder: Path) -> dict[str, Path]:
    """The same rows as CSV, Parquet of several row groups, and gzipped JSON Lines."""
    frame = prompts()
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "in.csv", index=False)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / "in.parquet", row_group_size=7)
    lines = "".join(json.dumps(row) + "\n" for row in frame.to_dict("records"))
    (folder / "in.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    return {name: folder / name for name in ("in.csv", "in.parquet", "in.jsonl.gz")}


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


JOB = ["--mock", "--model", "gpt-4o-mini", "--template", "Answer briefly: {question}", "--no-cache", "-q"]


@pytest.mark.parametrize("name", ["in.csv", "in.parquet", "in.jsonl.gz"])
def test_a_job_from_the_bucket_gives_what_the_same_file_gives(s3: S3Bucket, tmp_path: Path, name: str) -> None:
    local = write_inputs(tmp_path / "local")[name]
    s3.put(f"data/{name}", local.read_bytes())
    url = s3.url(f"data/{name}")
    for source, job in ((str(local), "job-local"), (url, "job-url")):
        code, output = invoke("run", source, *JOB, "--job-dir", str(tmp_path / job))
        assert code == 0, output
        code, output = invoke("export", str(tmp_path / job), "-o", str(tmp_path / f"{job}.parquet"))
        assert code == 0, output
    from_file = pd.read_parquet(tmp_path / "job-local.parquet")
    from_bucket = pd.read_parquet(tmp_path / "job-url.parquet")
    assert len(from_bucket) == ROWS and set(from_bucket["status"]) == {"ok"}
    pd.testing.assert_frame_equal(
        from_bucket[["id", "question", *SAME_COLUMNS]], from_file[["id", "question", *SAME_COLUMNS]]
    )
    recorded = json.loads((tmp_path / "job-url" / "job.json").read_text())
    assert recorded["input"]["path"] == url  # the URL as given, not made a path
    assert recorded["input"]["fingerprint"].startswith("object:")
    assert recorded["spec"]["input"] == url


async def test_a_job_on_an_object_resumes_and_sees_the_object_rewritten(
    s3: S3Bucket, tmp_path: Path, mock_server
) -> None:
    server = await mock_server(latency_ms=1)
    data = prompts(20)
    s3.put("in.csv", data.to_csv(index=False).encode())
    spec = JobSpec(
        input=s3.url("in.csv"),
        job_dir=tmp_path / "job",
        base_url=server.base_url,
        api_key="sk-test",
        model="m",
        template="{question}",
        no_cache=True,
        quiet=True,
    )
    first = await arun_job(spec, progress=False)
    assert (first.ok, first.exit_code, server.stats.completions) == (20, 0, 20)
    fp = fingerprint(s3.url("in.csv"))
    assert fp == f"object:{len(data.to_csv(index=False).encode())}:" + fp.rsplit(":", 1)[1]
    again = await arun_job(spec, progress=False)  # resumed: nothing left to send
    assert (again.ok, again.exit_code, server.stats.completions) == (20, 0, 20)
    # the object written again with one row changed: a new fingerprint, each done row checked against its
    # request, and only the changed row sent
    data.loc[5, "question"] = "What is fact 5 about hawks?"
    s3.put("in.csv", data.to_csv(index=False).encode())
    assert fingerprint(s3.url("in.csv")) != fp
    third = await arun_job(spec, progress=False)
    assert (third.ok, third.exit_code, server.stats.completions) == (20, 0, 21)


def test_run_and_a_spec_file_take_a_url_and_the_job_is_named_after_the_object(
    s3: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.put("deep/path/reviews.csv", prompts(5).to_csv(index=False).encode())
    url = s3.url("deep/path/reviews.csv")
    monkeypatch.chdir(tmp_path)
    out = batchhub.run(url, mock=True, model="gpt-4o-mini", template="{question}", no_cache=True, quiet=True)
    assert list(out["id"]) == list(range(5)) and set(out["status"]) == {"ok"}
    assert (tmp_path / "jobs" / "reviews" / "job.json").exists()  # jobs/<name>, as for a local reviews.csv
    spec_file = tmp_path / "specs" / "owls.toml"
    spec_file.parent.mkdir()
    spec_file.write_text(f'input = "{url}"\nmodel = "gpt-4o-mini"\ntemplate = "{{question}}"\n')
    spec = load_spec(spec_file)
    assert spec.input == url  # a str, not resolved against the spec's folder
    code, output = invoke("run", str(spec_file), "--mock", "--no-cache", "-q")
    assert code == 0, output
    assert (tmp_path / "specs" / "owls" / "job.json").exists()


def test_estimate_of_a_url_input_is_the_estimate_of_the_file(s3: S3Bucket, tmp_path: Path) -> None:
    local = write_inputs(tmp_path)["in.parquet"]
    s3.put("in.parquet", local.read_bytes())
    found = []
    for source in (str(local), s3.url("in.parquet")):
        code, output = invoke("estimate", source, "--model", "gpt-4o-mini", "--template", "{question}", "--json")
        assert code == 0, output
        found.append(json.loads(output))
    assert found[1]["rows"] == ROWS and found[1]["models"][0]["prompt_tokens"] > ROWS
    assert found[1] == found[0]


# --- Parquet: only the row groups asked for cross the network ----------------------------


@pytest.fixture
def proxy(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingProxy]:
    counting = CountingProxy(s3.endpoint)
    point_at(monkeypatch, counting.endpoint)
    yield counting
    counting.close()


def test_a_parquet_object_is_read_a_row_group_at_a_time(s3: S3Bucket, proxy: CountingProxy, tmp_path: Path) -> None:
    groups, per_group = 20, 200
    text = [(f"{i:06d}" * 60)[:360] + f"|{hash((i, 'x')) & 0xFFFFFFFF:08x}" * 4 for i in range(groups * per_group)]
    table = pa.table({"id": list(range(groups * per_group)), "text": text})
    local = tmp_path / "big.parquet"
    pq.write_table(table, local, row_group_size=per_group, compression="none", use_dictionary=False)
    size = local.stat().st_size
    assert size > 1_500_000  # each row group (about 80 kB) above what a footer read (64 kB) fetches
    s3.put("big.parquet", local.read_bytes())
    url = s3.url("big.parquet")
    source = open_input(url)  # the start and end of the object, and its footer
    assert source.format == "parquet" and source.count_rows() == groups * per_group
    proxy.reset()
    # a Ray task's shard: rows 1500..1599, in row group 7 (a shard reads from its first row on, and stops)
    rows = next(source.iter_rows(["id", "text"], batch_size=100, start=1500))
    assert [row["id"] for row in rows] == list(range(1500, 1600))
    assert rows == next(open_input(local).iter_rows(["id", "text"], batch_size=100, start=1500))
    shard_bytes = proxy.get_bytes
    # row group 7 and the footer (read twice), not the groups after it: pre-buffered, pyarrow fetched them all
    assert 0 < shard_bytes < size / 5, (shard_bytes, size)
    proxy.reset()
    assert sum(len(batch) for batch in source.iter_rows(["id", "text"], batch_size=500)) == groups * per_group
    assert proxy.get_bytes > size * 0.9  # (the proxy sees every byte a whole read fetches)


def test_a_json_lines_object_is_streamed_not_downloaded_first(
    s3: S3Bucket, proxy: CountingProxy, tmp_path: Path
) -> None:
    local = tmp_path / "big.jsonl"
    with local.open("w") as out:
        for i in range(400_000):
            out.write(json.dumps({"id": i, "question": f"question number {i} " * 3}) + "\n")
    size = local.stat().st_size
    assert size > 30_000_000  # several of the stream's buffers (8 MiB)
    s3.put("big.jsonl", local.read_bytes())
    source = open_input(s3.url("big.jsonl"))
    proxy.reset()
    first = next(source.iter_rows(["question"], batch_size=10))
    assert first[0] == {"question": "question number 0 " * 3}
    assert proxy.get_bytes < size / 2, (proxy.get_bytes, size)  # a buffer or two, not the object
    assert input_size(s3.url("big.jsonl")) == size
    # (a CSV object streams too, but pyarrow's CSV reader reads up to 32 blocks ahead in a thread of its
    # own, as it does from a file: what it has fetched when the first rows arrive depends on timing)


# --- every problem is one line, exit 2 ----------------------------------------------------


def one_line_error(args: list[str], says: str, names: str) -> str:
    code, output = invoke(*args)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert len(lines) == 1, output
    assert says in lines[0] and names in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("s3://", "names no bucket"),
        ("foo://x/y", "not foo://"),
        ("s3://no-such-bucket-here/in.csv", "the bucket 'no-such-bucket-here' does not exist"),
        ("BUCKET/missing.csv", "no such object"),
        ("BUCKET/folder", "it is a folder (a prefix), not an object"),
    ],
)
@pytest.mark.parametrize("command", ["run", "estimate"])
def test_a_url_batchhub_cannot_read_is_one_line(s3: S3Bucket, command: str, url: str, says: str) -> None:
    s3.put("folder/in.csv", prompts(3).to_csv(index=False).encode())
    url = url.replace("BUCKET", s3.url())
    line = one_line_error([command, url, "--mock", "--model", "m", "--template", "{question}"], says, url)
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in line
    assert s3.objects() == ["folder/in.csv"]  # nothing written


def test_denied_credentials_are_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server = MotoProcess(auth=True)  # checks credentials: the test's belong to no account
    try:
        bucket = S3Bucket(server.endpoint)
        point_at(monkeypatch, bucket.endpoint)
        url = bucket.url("in.csv")
        args = ["run", url, "--mock", "--model", "m", "--template", "{q}", "--job-dir", str(tmp_path / "job")]
        line = one_line_error(args, "access denied", url)
        assert bucket.env["AWS_SECRET_ACCESS_KEY"] not in line and bucket.env["AWS_ACCESS_KEY_ID"] not in line
        assert not (tmp_path / "job").exists()
    finally:
        server.stop()


def test_a_store_that_cannot_be_reached_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    point_at(monkeypatch, unreachable_endpoint())
    monkeypatch.setattr("batchhub.defaults.STORAGE_ATTEMPTS", 1)
    url = "s3://some-bucket/in.parquet"
    one_line_error(["estimate", url, "--model", "m", "--template", "{q}"], "the store cannot be reached", url)


def test_a_gzipped_object_is_fetched_in_large_ranged_reads(s3: S3Bucket, proxy: CountingProxy, tmp_path: Path) -> None:
    noise = random.Random(7)
    lines = "".join(json.dumps({"id": i, "question": noise.randbytes(48).hex()}) + "\n" for i in range(60_000))
    data = gzip.compress(lines.encode(), compresslevel=1)
    assert len(data) > 1_500_000
    s3.put("big.jsonl.gz", data)
    source = open_input(s3.url("big.jsonl.gz"))
    proxy.reset()
    assert source.count_rows() == 60_000
    # each read of the store is a ranged GET: decompressing reads 64 kB at a time, so the object is fetched
    # through a buffer of several MB (a GET per 64 kB is a round trip per 64 kB to a real store)
    assert proxy.get_bytes >= len(data) and proxy.gets <= 3, (proxy.gets, proxy.get_bytes)


def test_a_ray_task_gets_the_url_and_checks_the_object_it_sees(s3: S3Bucket, tmp_path: Path) -> None:
    from batchhub.ray_engine import _task_spec  # the spec the driver hands its tasks (no Ray started here)

    s3.put("in.csv", prompts(5).to_csv(index=False).encode())
    spec = JobSpec(input=s3.url("in.csv"), job_dir=tmp_path / "job", base_url="mock://", model="m")
    task_spec = _task_spec(spec)
    assert task_spec.input == s3.url("in.csv")  # not made a path, nor resolved against the task's folder
    assert input_size(task_spec.input) == len(prompts(5).to_csv(index=False).encode())
    assert open_input(task_spec.input).columns == ("id", "question")
