"""batchhub/objstore.py against a real S3 API server (moto's server mode on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3server import MotoProcess, S3Bucket, point_at, unreachable_endpoint

from batchhub import objstore
from batchhub.errors import StorageError
from batchhub.objstore import ObjectURL


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("s3://", "names no bucket"),
        ("s3:///key", "names no bucket"),
        ("foo://bucket/x", "not foo://"),
        ("S3://Bucket/x", "is not a bucket name"),
        ("s3://ab/x", "is not a bucket name"),
        ("s3://bucket/../x", "'..' have no meaning"),
        ("s3://bucket/x?versionId=3", r"no \?query"),
        ("not a url", "is not a URL"),
    ],
)
def test_a_bad_url_is_one_clear_line(text: str, says: str) -> None:
    with pytest.raises(StorageError, match=says) as caught:
        ObjectURL.parse(text)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_credentials_in_a_url_are_refused_without_being_repeated() -> None:
    with pytest.raises(StorageError, match="a URL takes no credentials") as caught:
        ObjectURL.parse("s3://AKIAEXAMPLE:wJalrXUtnFEMI-secret@bucket/in.csv")
    assert "wJalrXUtnFEMI" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)


def test_urls_parse_join_and_print() -> None:
    url = ObjectURL.parse("s3://bucket/jobs//summaries/")
    assert (url.bucket, url.key, str(url)) == ("bucket", "jobs/summaries", "s3://bucket/jobs/summaries")
    assert str(url.join("results", "part-000001.parquet")) == "s3://bucket/jobs/summaries/results/part-000001.parquet"
    assert url.relative("bucket/jobs/summaries/shards/a/job.json") == "shards/a/job.json"
    assert objstore.is_url("gs://b/k") and not objstore.is_url(Path("s3://b/k")) and not objstore.is_url("/tmp/x")


def test_objects_are_written_read_listed_and_copied(s3: S3Bucket, tmp_path: Path) -> None:
    root = ObjectURL.parse(s3.url("job"))
    objstore.write_bytes(root.join("a.json"), b"{}")
    source = tmp_path / "big.bin"
    source.write_bytes(bytes(range(256)) * 50_000)  # 12.8 MB: more than one chunk each way
    objstore.upload(source, root.join("results", "big.bin"))
    assert s3.objects() == ["job/a.json", "job/results/big.bin"]
    assert sorted(root.relative(item.path) for item in objstore.listing(root)) == ["a.json", "results/big.bin"]
    objstore.download(root.join("results", "big.bin"), tmp_path / "copy" / "big.bin")
    assert (tmp_path / "copy" / "big.bin").read_bytes() == source.read_bytes()
    assert objstore.read_bytes(root.join("a.json")) == b"{}"
    assert objstore.read_bytes(root.join("missing.json")) is None
    objstore.delete(root.join("a.json"))
    objstore.delete(root.join("a.json"))  # gone already: no error
    # (pyarrow leaves a folder marker, "job/", where the last object of a folder went: no file)
    assert [key for key in s3.objects() if not key.endswith("/")] == ["job/results/big.bin"]


def test_a_missing_bucket_and_a_missing_object_are_told_apart(s3: S3Bucket) -> None:
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        objstore.require_file(ObjectURL.parse("s3://no-such-bucket/in.csv"))
    with pytest.raises(StorageError, match="no such object"):
        objstore.require_file(ObjectURL.parse(s3.url("in.csv")))
    with pytest.raises(StorageError, match="does not exist"):
        objstore.listing(ObjectURL.parse("s3://no-such-bucket/jobs"))
    assert objstore.listing(ObjectURL.parse(s3.url("nothing-here"))) == []


def test_denied_credentials_are_one_line_without_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    server = MotoProcess(auth=True)  # checks credentials: the test's are not an account's
    try:
        bucket = S3Bucket(server.endpoint)
        point_at(monkeypatch, bucket.endpoint)
        with pytest.raises(StorageError) as caught:
            objstore.require_file(ObjectURL.parse(bucket.url("in.csv")))
        message = str(caught.value)
        assert message.startswith(f"cannot read {bucket.url('in.csv')}: access denied")
        assert "\n" not in message and bucket.env["AWS_SECRET_ACCESS_KEY"] not in message
    finally:
        server.stop()


def test_an_unreachable_store_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:

    point_at(monkeypatch, unreachable_endpoint())
    monkeypatch.setattr("batchhub.defaults.STORAGE_ATTEMPTS", 1)
    with pytest.raises(StorageError, match="the store cannot be reached"):
        objstore.info(ObjectURL.parse("s3://bucket/in.csv"))


def test_writing_to_a_missing_bucket_is_one_line_even_when_the_open_is_delayed(s3: S3Bucket, tmp_path: Path) -> None:
    """A small object is sent in one PUT when it is closed: the missing bucket shows then, and still as one line."""
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        objstore.write_bytes(ObjectURL.parse("s3://no-such-bucket/a.json"), b"{}")
    local = tmp_path / "part.parquet"
    local.write_bytes(b"x" * 100)
    with pytest.raises(StorageError, match="does not exist"):
        objstore.upload(local, ObjectURL.parse("s3://no-such-bucket/results/part.parquet"))
