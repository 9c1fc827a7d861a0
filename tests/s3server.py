"""A real S3 API server for the tests: moto's server mode on 127.0.0.1, in this process or in a child.

`S3Bucket` is one test's bucket: its `s3://` URL, the environment that points batchhub (and pyarrow)
at the server with the standard variables, and a boto3 client to look at what was written.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

#: what the tests' S3 server is told: any key pair works unless the server checks credentials
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-key"}


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard variables that send every S3 client of a process (and its children) to `endpoint`."""
    return {
        **TEST_CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def point_at(monkeypatch: Any, endpoint: str) -> None:
    """Send this test's S3 clients (and the processes it starts) to the S3 server at `endpoint`."""
    for name, value in s3_env(endpoint).items():
        monkeypatch.setenv(name, value)


def unreachable_endpoint() -> str:
    """An endpoint on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoProcess:
    """moto's S3 server in a process of its own (`auth`: it checks credentials, so ours are denied)."""

    def __init__(self, *, auth: bool = False) -> None:
        self.port = free_port()
        env = {**os.environ}
        if auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # moto's switch: every call is checked from the first
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.endpoint = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("moto's server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class S3Bucket:
    """A bucket of the test's own on the S3 server at `endpoint`."""

    endpoint: str
    name: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:12]}")

    @property
    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint)

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}" if key else f"s3://{self.name}"

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def create(self) -> S3Bucket:
        self.client().create_bucket(Bucket=self.name)
        return self

    def objects(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def put(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return bytes(self.client().get_object(Bucket=self.name, Key=key)["Body"].read())
