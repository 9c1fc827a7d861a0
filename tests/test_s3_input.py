"""Inputs read from an S3 bucket (moto's S3 server on 127.0.0.1): the same job as from local files, resumed,
estimated; Parquet read by ranged GETs of the row groups asked for; every problem one line, exit 2."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from s3server import MotoProcess, S3Bucket, free_port, s3_env

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


class CountingProxy:
    """An HTTP proxy in front of the S3 server that counts the object bytes it passes back to GETs."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.get_bytes = 0
        self.gets = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                connection.request(self.command, self.path, body=body, headers=headers)
                reply = connection.getresponse()
                data = reply.read()
                connection.close()
                if self.command == "GET" and "list-type" not in self.path and reply.status < 300:
                    with proxy._lock:
                        proxy.gets += 1
                        proxy.get_bytes += len(data)
                self.send_response(reply.status)
                head = self.command == "HEAD"  # its Content-Length is the object's: passed on as it is
                dropped = (
                    ("transfer-encoding", "connection")
                    if head
                    else ("transfer-encoding", "connection", "content-length")
                )
                for key, value in reply.getheaders():
                    if key.lower() not in dropped:
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self._lock:
            self.gets = self.get_bytes = 0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingProxy]:
    counting = CountingProxy(s3.endpoint)
    for name, value in s3_env(counting.endpoint).items():
        monkeypatch.setenv(name, value)
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


def test_a_csv_object_is_streamed_not_downloaded_first(s3: S3Bucket, proxy: CountingProxy, tmp_path: Path) -> None:
    frame = pd.DataFrame({"id": range(400_000), "question": [f"question number {i} " * 3 for i in range(400_000)]})
    local = tmp_path / "big.csv"
    frame.to_csv(local, index=False)
    size = local.stat().st_size
    assert size > 25_000_000  # several blocks of the CSV reader (4 MiB)
    s3.put("big.csv", local.read_bytes())
    source = open_input(s3.url("big.csv"))
    proxy.reset()
    first = next(source.iter_rows(["question"], batch_size=10))
    assert first[0] == {"question": "question number 0 " * 3}
    assert proxy.get_bytes < size / 2, (proxy.get_bytes, size)  # a few blocks, not the object
    assert input_size(s3.url("big.csv")) == size


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
        for name, value in bucket.env.items():
            monkeypatch.setenv(name, value)
        url = bucket.url("in.csv")
        args = ["run", url, "--mock", "--model", "m", "--template", "{q}", "--job-dir", str(tmp_path / "job")]
        line = one_line_error(args, "access denied", url)
        assert bucket.env["AWS_SECRET_ACCESS_KEY"] not in line and bucket.env["AWS_ACCESS_KEY_ID"] not in line
        assert not (tmp_path / "job").exists()
    finally:
        server.stop()


def test_a_store_that_cannot_be_reached_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_env(f"http://127.0.0.1:{free_port()}").items():  # nothing listens there
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("batchhub.defaults.STORAGE_ATTEMPTS", 1)
    url = "s3://some-bucket/in.parquet"
    one_line_error(["estimate", url, "--model", "m", "--template", "{q}"], "the store cannot be reached", url)
