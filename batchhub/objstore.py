"""Object storage: inputs and job directories at `s3://` and `gs://` URLs, through pyarrow's filesystems.

Why pyarrow's filesystems (`pyarrow.fs`) and not fsspec with s3fs/gcsfs: pyarrow is a dependency
already, its S3 and GCS clients are the ones its Parquet reader uses for ranged reads of row groups,
and they take credentials from each store's standard chain. fsspec would bring a second HTTP stack
(aiobotocore) beside aiohttp, for the same calls.

- **Credentials** are never a flag, never in job.json, a log or an error. S3: the AWS SDK's chain
  (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, `AWS_PROFILE` and `~/.aws`, web
  identity as KubeRay's IRSA gives it, the instance's role). GCS: Google's (`GOOGLE_APPLICATION_CREDENTIALS`,
  the metadata server).
- **The endpoint** of an S3-compatible store (MinIO, R2, Ceph...) comes from the variable the AWS CLI
  and SDKs read, `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (pyarrow does not read it itself); the
  region from `AWS_REGION`/`AWS_DEFAULT_REGION`, else the bucket's own, asked of S3 once. For GCS,
  `STORAGE_EMULATOR_HOST`, as Google's clients read it.
- **Errors** become one line naming the URL and what went wrong (`StorageError`, exit 2). pyarrow
  raises a bare `OSError` whose text carries the AWS SDK's error name (`ACCESS_DENIED`,
  `NO_SUCH_BUCKET`, `NETWORK_CONNECTION`...): those stable names are the only thing to go by, and
  `_KINDS` is the one table that reads them.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from batchhub import defaults
from batchhub.errors import BatchhubError, StorageError

if TYPE_CHECKING:  # pyarrow is imported where a store is used: a spec or a local job never needs it
    import pyarrow.fs as pafs

#: the schemes batchhub reads and writes, and pyarrow's name for each store
SCHEMES = {"s3": "S3", "gs": "GCS", "gcs": "GCS"}

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)

#: (a name in pyarrow's error text, what it means): the one place error text is read (see the docstring)
_KINDS = (
    (("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY_ID",
      "SIGNATURE_DOES_NOT_MATCH", "Forbidden", "PERMISSION_DENIED", "Unauthorized", "403"), "denied"),
    (("NO_SUCH_BUCKET", "NoSuchBucket", "The specified bucket does not exist"), "no_bucket"),
    (("NETWORK_CONNECTION", "curlCode", "Could not resolve", "Couldn't connect", "Connection refused",
      "UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_TIMEOUT"), "unreachable"),
    (("HTTP status 5", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE"), "failing"),
)  # fmt: skip


def is_url(value: object) -> bool:
    """Whether `value` is a URL (`scheme://...`) rather than a path on this machine. A `Path` never is."""
    return isinstance(value, str) and _URL.match(value) is not None


def input_location(value: str | os.PathLike[str]) -> Path | str:
    """An input as io reads it: a URL stays a `str` (`Path()` would make `s3://b/k` into `s3:/b/k`), anything
    else is a `Path`. A URL is checked (StorageError for one batchhub cannot read) and written the one way.
    (Here, not in io.py: the way in, options.py, takes it without importing pyarrow.)"""
    if is_url(value):
        return str(ObjectURL.parse(str(value)))
    return Path(value)


@dataclass(frozen=True, slots=True)
class ObjectURL:
    """`scheme://bucket/key`, checked: a known scheme, a bucket, a key of plain `/`-separated names."""

    scheme: str
    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, text: str) -> ObjectURL:
        """The URL `text`, or StorageError (exit 2) saying what is wrong with it."""
        match = _URL.match(text.strip())
        if match is None:
            raise StorageError(f"{text!r} is not a URL (scheme://bucket/path)")
        if "@" in match.group(2).split("/", 1)[0]:  # user:secret@bucket: never repeated, never recorded
            shown = f"{match.group(1)}://…@{match.group(2).split('/', 1)[0].rsplit('@', 1)[1]}/…"
            raise StorageError(
                f"cannot use {shown}: a URL takes no credentials (they would be recorded and shown); "
                "they come from the store's standard chain: environment variables, profile, the pod's or machine's role"
            )
        scheme = match.group(1).lower()
        if scheme not in SCHEMES:
            known = ", ".join(f"{name}://" for name in SCHEMES if name != "gcs")
            raise StorageError(
                f"cannot use {text}: batchhub reads and writes {known} URLs and local paths, not {scheme}://"
            )
        parts = urlsplit(text.strip())
        if parts.query or parts.fragment or "?" in text or "#" in text:
            raise StorageError(f"cannot use {text}: a storage URL takes no ?query or #fragment")
        bucket = parts.netloc
        if not bucket or not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket):
            raise StorageError(
                f"cannot use {text}: {bucket!r} is not a bucket name "
                "(3 or more lower-case letters, digits, '.', '-' or '_')"
                if bucket
                else f"cannot use {text}: it names no bucket ({scheme}://BUCKET/path)"
            )
        names = [name for name in parts.path.split("/") if name]
        if any(name in (".", "..") for name in names):
            raise StorageError(f"cannot use {text}: '.' and '..' have no meaning in a storage URL")
        return cls(scheme, bucket, "/".join(names))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    @property
    def path(self) -> str:
        """The object's path as pyarrow's filesystem takes it: `bucket/key`."""
        return f"{self.bucket}/{self.key}" if self.key else self.bucket

    @property
    def name(self) -> str:
        """The last name of the key (as `Path.name`)."""
        return self.key.rsplit("/", 1)[-1]

    def join(self, *names: str) -> ObjectURL:
        """This URL with `names` appended (`a/b` in a name is two names)."""
        extra = [name for part in names for name in part.split("/") if name]
        return ObjectURL(self.scheme, self.bucket, "/".join([self.key, *extra] if self.key else extra))

    def relative(self, path: str) -> str:
        """`path` (pyarrow's `bucket/key`, under this URL) relative to this URL."""
        prefix = self.path.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path


_FILESYSTEMS: dict[tuple[str, ...], pafs.FileSystem] = {}
_FILESYSTEMS_LOCK = threading.Lock()


def filesystem(url: ObjectURL) -> pafs.FileSystem:
    """pyarrow's filesystem for `url`'s store, configured from the environment (see the module docstring).

    One per store and configuration in a process: they hold connection pools.
    """
    if SCHEMES[url.scheme] == "S3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
        key: tuple[str, ...] = ("S3", endpoint, region, "" if endpoint or region else url.bucket)
    else:
        key = ("GCS", os.environ.get("STORAGE_EMULATOR_HOST") or "")
    with _FILESYSTEMS_LOCK:
        found = _FILESYSTEMS.get(key)
        if found is None:
            found = _FILESYSTEMS[key] = _make_filesystem(url, key)
        return found


def _make_filesystem(url: ObjectURL, key: tuple[str, ...]) -> pafs.FileSystem:
    import pyarrow as pa
    import pyarrow.fs as pafs

    if key[0] == "GCS":
        emulator = key[1]
        if emulator:
            split = urlsplit(emulator if "://" in emulator else f"http://{emulator}")
            return pafs.GcsFileSystem(endpoint_override=split.netloc, scheme=split.scheme or "http", anonymous=True)
        return pafs.GcsFileSystem()
    _, endpoint, region, _ = key
    options: dict[str, Any] = {
        "connect_timeout": defaults.STORAGE_CONNECT_TIMEOUT_S,
        "request_timeout": defaults.STORAGE_REQUEST_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=defaults.STORAGE_ATTEMPTS),
        # an object smaller than a multipart chunk is sent in one PUT on close (three requests otherwise)
        "allow_delayed_open": True,
    }
    if endpoint:
        split = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        if not split.netloc:
            raise StorageError(f"AWS_ENDPOINT_URL {endpoint!r} is not a URL (http://host:port)")
        options.update(endpoint_override=split.netloc + split.path.rstrip("/"), scheme=split.scheme or "https")
        options["region"] = region or "us-east-1"  # an S3-compatible server mostly ignores it
    elif region:
        options["region"] = region
    else:
        try:
            options["region"] = pafs.resolve_s3_region(url.bucket)
        except (OSError, pa.ArrowException) as exc:
            raise storage_error(exc, url, "find the region of") from exc
    return pafs.S3FileSystem(**options)


def storage_error(exc: BaseException, url: ObjectURL | str, doing: str) -> StorageError:
    """One line for a failed storage call: `cannot <doing> <url>: <why>` (never a credential)."""
    text = str(exc)
    kind = next((kind for names, kind in _KINDS if any(name in text for name in names)), None)
    bucket = url.bucket if isinstance(url, ObjectURL) else ""
    if kind == "denied":
        why = (
            "access denied (credentials come from the store's standard chain: environment variables, "
            "profile, the pod's or instance's role; check they may do this)"
        )
    elif kind == "no_bucket":
        why = f"the bucket {bucket!r} does not exist"
    elif kind == "unreachable":
        why = f"the store cannot be reached ({_endpoint_text(url)})"
    elif kind == "failing":
        status = re.search(r"HTTP status (5\d\d)", text)
        why = f"the store failed (HTTP {status.group(1) if status else '5xx'}: down or overloaded); try again later"
    elif isinstance(exc, FileNotFoundError):
        why = "no such object"
    else:
        why = _first_line(text)
    return StorageError(_without_secrets(f"cannot {doing} {url}: {why}"))


def _endpoint_text(url: ObjectURL | str) -> str:
    scheme = url.scheme if isinstance(url, ObjectURL) else "s3"
    if SCHEMES.get(scheme) == "GCS":
        return os.environ.get("STORAGE_EMULATOR_HOST") or "storage.googleapis.com"
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "failed"
    return re.sub(r"\s*\(Request ID: [^)]*\)", "", line)[:300]


def _without_secrets(text: str) -> str:
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "[redacted]")
    return text


@contextlib.contextmanager
def mapped(url: ObjectURL | str, doing: str) -> Iterator[None]:
    """Turn a store's failure inside the block into StorageError (one line, exit 2)."""
    import pyarrow as pa

    try:
        yield
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise storage_error(exc, url, doing) from exc


def info(url: ObjectURL) -> pafs.FileInfo:
    """The object's (or prefix's) FileInfo; StorageError when the store refuses or cannot be reached."""
    with mapped(url, "read"):
        return filesystem(url).get_file_info(url.path)


def require_file(url: ObjectURL, what: str = "read") -> pafs.FileInfo:
    """The FileInfo of an object that must exist; StorageError saying whether the bucket or the object is missing."""
    import pyarrow.fs as pafs

    found = info(url)
    if found.type == pafs.FileType.File:
        return found
    if found.type == pafs.FileType.Directory:
        raise StorageError(f"cannot {what} {url}: it is a folder (a prefix), not an object")
    if not bucket_exists(url):
        raise StorageError(f"cannot {what} {url}: the bucket {url.bucket!r} does not exist")
    raise StorageError(f"cannot {what} {url}: no such object")


def bucket_exists(url: ObjectURL) -> bool:
    import pyarrow.fs as pafs

    with mapped(url, "read"):
        return bool(filesystem(url).get_file_info(url.bucket).type != pafs.FileType.NotFound)


def listing(url: ObjectURL) -> list[pafs.FileInfo]:
    """Every object under `url` (recursively); empty when there is none. StorageError when the bucket is missing."""
    import pyarrow.fs as pafs

    with mapped(url, "list"):
        fs = filesystem(url)
        found = fs.get_file_info(pafs.FileSelector(url.path, recursive=True, allow_not_found=True))
    files = [item for item in found if item.type == pafs.FileType.File]
    if not files and not bucket_exists(url):
        raise StorageError(f"cannot use {url}: the bucket {url.bucket!r} does not exist")
    return files


def read_bytes(url: ObjectURL) -> bytes | None:
    """The whole object, or None when there is none."""
    with mapped(url, "read"):
        try:
            with filesystem(url).open_input_stream(url.path) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            return None


def write_bytes(url: ObjectURL, data: bytes) -> None:
    """Write the whole object: a reader sees the old object or the new one, never part of it."""
    with mapped(url, "write"), filesystem(url).open_output_stream(url.path) as stream:
        stream.write(data)


def delete(url: ObjectURL) -> None:
    """Delete the object if it is there."""
    with mapped(url, "delete"), contextlib.suppress(FileNotFoundError):
        filesystem(url).delete_file(url.path)


def download(url: ObjectURL, dest: Path) -> None:
    """Copy the object to `dest`, whole or not at all (temp name, fsync, rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        with mapped(url, "read"), filesystem(url).open_input_stream(url.path) as stream, open(tmp, "wb") as out:
            while chunk := stream.read(defaults.STORAGE_CHUNK_BYTES):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def upload(src: Path, url: ObjectURL) -> None:
    """Copy the local file `src` to the object `url`: it appears whole, once written, or not at all."""
    with mapped(url, "write"), open(src, "rb") as data, filesystem(url).open_output_stream(url.path) as stream:
        while chunk := data.read(defaults.STORAGE_CHUNK_BYTES):
            stream.write(chunk)


@contextlib.contextmanager
def written_to(location: Path | str) -> Iterator[Path]:
    """A path to write a whole file at: `location` itself, or for a URL a temp file uploaded there once the
    block ends without an error (an object appears whole or not at all, as a renamed file does)."""
    if not is_url(location):
        yield Path(location)
        return
    import tempfile

    url = ObjectURL.parse(str(location))
    if not url.key:
        raise StorageError(f"cannot write {url}: it names a bucket, not an object")
    with tempfile.TemporaryDirectory(prefix="batchhub-upload-") as folder:
        local = Path(folder) / url.name
        with _named_as(local, url):
            yield local
        upload(local, url)


@contextlib.contextmanager
def fetched(location: str) -> Iterator[Path | None]:
    """A copy on this machine of the object at the URL `location`, for the block (None when the URL names a
    folder, not an object: a job directory, say)."""
    import tempfile

    url = ObjectURL.parse(location)
    if not url.key or info(url).size is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="batchhub-download-") as folder:
        local = Path(folder) / url.name
        download(url, local)
        with _named_as(local, url):
            yield local


@contextlib.contextmanager
def _named_as(local: Path, url: ObjectURL) -> Iterator[None]:
    """An error of the block that names the temp file `local` names the URL the user gave instead."""
    try:
        yield
    except BatchhubError as exc:
        if str(local) in str(exc):
            exc.args = (str(exc).replace(str(local), str(url)), *exc.args[1:])
        raise
