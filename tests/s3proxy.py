"""A counting HTTP proxy in front of the tests' S3 server: what crossed the network, seen from outside.

Point a process at `proxy.endpoint` (the standard variables, `s3server.s3_env`) and `get_bytes` is the
object bytes the store sent back to GETs: how the tests and benchmarks/s3_input.py show that a reader
fetched only what it needed (a Parquet shard's row groups, the first blocks of a CSV). `writes` is
every PUT and POST passed on (what benchmarks/s3_job.py counts of a job's uploads). `down` (or
`down_after_parts`) makes it answer 503 to everything: the store down (tests/test_hostile_s3.py).
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that went away mid-request (a Ray node removed): not the proxy's failure
        super().handle_error(request, client_address)


@dataclass(frozen=True)
class Write:
    """A PUT or POST the proxy passed on: the object's key path, the body's bytes, and the seconds from
    the request's arrival to the store's reply (what the writer waited, less the loopback hop)."""

    method: str
    path: str
    body_bytes: int
    seconds: float


class CountingProxy:
    """An HTTP proxy in front of the S3 server that counts the object bytes it passes back to GETs."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream).netloc
        self.get_bytes = 0
        self.gets = 0
        self.writes: list[Write] = []
        #: answer every request with a 503 (the store down) while True
        self.down = False
        #: go down by itself once this many parts (`.../results/part-*.parquet`) were written through it
        self.down_after_parts: int | None = None
        self.parts_written = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                started = time.perf_counter()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body, length = self._chunked()  # the AWS SDK's uploads: passed on as they came
                    length = int(self.headers.get("x-amz-decoded-content-length") or length)  # the object's bytes
                if proxy.down:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive", "expect")
                }
                connection.request(self.command, self.path, body=body, headers=headers)
                reply = connection.getresponse()
                data = reply.read()
                connection.close()
                # a part is written by a PUT of the object, or by the POST completing its multipart upload
                whole = (self.command == "PUT" and "partNumber=" not in self.path) or (
                    self.command == "POST" and "uploadId=" in self.path
                )
                if whole and "/results/part-" in self.path and reply.status < 300:
                    with proxy._lock:
                        proxy.parts_written += 1
                        if proxy.down_after_parts is not None and proxy.parts_written >= proxy.down_after_parts:
                            proxy.down = True
                if self.command == "GET" and "list-type" not in self.path and reply.status < 300:
                    with proxy._lock:
                        proxy.gets += 1
                        proxy.get_bytes += len(data)
                if self.command in ("PUT", "POST"):
                    write = Write(self.command, self.path, length, time.perf_counter() - started)
                    with proxy._lock:
                        proxy.writes.append(write)
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

            def _chunked(self) -> tuple[bytes, int]:
                """A chunked body as it came on the wire (chunks and trailers), and its payload's bytes."""
                raw, payload = [], 0
                while True:
                    line = self.rfile.readline()
                    raw.append(line)
                    size = int(line.split(b";", 1)[0], 16)
                    if size == 0:
                        break
                    raw.append(self.rfile.read(size + 2))  # the chunk and its CRLF
                    payload += size
                while True:  # the trailers, up to an empty line
                    line = self.rfile.readline()
                    raw.append(line)
                    if line in (b"\r\n", b"\n", b""):
                        break
                return b"".join(raw), payload

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self._lock:
            self.gets = self.get_bytes = 0
            self.writes = []

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
