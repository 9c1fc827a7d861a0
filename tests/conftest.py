"""Shared test fixtures: `prompts_csv` (an input file), `job_spec` (a JobSpec with test-friendly
settings), `mock_server` (simulators in the test's event loop), `threaded_mock` (a simulator on a
loop of its own in a thread, for code that blocks), `simulator_process` (a
simulator in a process of its own), and a shim for aioresponses.

aioresponses 0.7.9 (its newest release) builds `ClientResponse` without the
keyword-only `stream_writer` argument that aiohttp 3.14 requires (upstream
pnuckowski/aioresponses#289, open). aiohttp 3.14 carries a security fix, so we do
not pin it lower: instead this shim gives aioresponses a response class that
supplies the argument. aiohttp only reads `stream_writer.output_size`. Remove the
shim once aioresponses releases a fix.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import aioresponses.core
import pandas as pd
import pytest
from s3server import MotoProcess, S3Bucket, point_at

from batchhub.cache_dir import CACHE_ENV
from batchhub.mock import MockConfig, MockServer, SimulatorProcess
from batchhub.spec import JobSpec

#: the prompt of row i in `prompts_csv` unless a test asks for other text
SEA_PROMPT = "row {i}: say something about the sea"


def pytest_configure(config: pytest.Config) -> None:
    """The cache folder (saved genai-prices answers, the reply cache) is a folder of this session's, never
    the user's: set before collection, which looks prices up, and inherited by every child process."""
    os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="batchhub-test-cache-")


@pytest.fixture(autouse=True)
def cache_folder(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test has a cache folder of its own (another test's simulator may answer the same requests with
    other replies, and a test counts the requests sent), holding the session's saved prices."""
    session = Path(os.environ[CACHE_ENV])
    folder = tmp_path_factory.mktemp("cache")
    if session.name.startswith("batchhub-test-cache-"):  # not a folder a test set itself
        for saved in session.glob("prices-*.json"):
            (folder / saved.name).symlink_to(saved)
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def write_prompts(path: Path, n: int, text: str = SEA_PROMPT, **columns: Any) -> Path:
    """A CSV at `path` with a `prompt` column of `n` rows (`text` formatted with the row's `i`) and `columns`."""
    pd.DataFrame({"prompt": [text.format(i=i) for i in range(n)], **columns}).to_csv(path, index=False)
    return path


@pytest.fixture
def prompts_csv() -> Callable[..., Path]:
    """Write an input CSV: `prompts_csv(tmp_path / "in.csv", 50, text="fact {i}", id=range(50))`."""
    return write_prompts


@pytest.fixture
def job_spec(tmp_path: Path) -> Callable[..., JobSpec]:
    """A JobSpec into TMP/job, quiet, with a made-up model and key and retry waits kept tiny:
    `job_spec(server.base_url, input_path, concurrency=4)`; keywords override the defaults."""

    def make(base_url: str, data: Path, **settings: Any) -> JobSpec:
        settings = {"model": "m", "api_key": "k", "job_dir": tmp_path / "job", "backoff_base": 0.005, **settings}
        return JobSpec(input=data, base_url=base_url, quiet=True, **settings)

    return make


@pytest.fixture
async def mock_server() -> AsyncIterator[Callable[..., Awaitable[MockServer]]]:
    """Start simulators on 127.0.0.1: `server = await mock_server(seed=3, rpm=600)`; all closed after the test.

    They know every model name unless the test passes `models=[...]`: tests send made-up names.
    """
    servers: list[MockServer] = []

    async def start(**config: Any) -> MockServer:
        config.setdefault("models", ["*"])
        server = MockServer(MockConfig(**config))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def simulator_process() -> Iterator[Callable[..., SimulatorProcess]]:
    """Start `batchhub mock-server` in processes of their own: `sim = simulator_process("--seed", "4")`.

    Arguments are mock-server options; `env=` sets the child's environment. All are stopped
    after the test. The benchmarks start theirs with the same launcher.
    """
    started: list[SimulatorProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> SimulatorProcess:
        sim = SimulatorProcess(*args, env=env)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.close()


if "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters:

    class _CompatResponse(aiohttp.ClientResponse):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
            super().__init__(*args, **kwargs)

    aioresponses.core.ClientResponse = _CompatResponse  # type: ignore[misc]


class ThreadedMock:
    """The simulator on its own event loop in a thread, for the CLI and `batchhub.run`, which block."""

    def __init__(self, **config: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = MockServer(MockConfig(**config))
        self.call(self.server.start())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def stats(self) -> Any:
        return self.server.stats

    def close(self) -> None:
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture
def threaded_mock() -> Iterator[Callable[..., ThreadedMock]]:
    servers: list[ThreadedMock] = []

    def start(**config: Any) -> ThreadedMock:
        servers.append(ThreadedMock(**config))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoProcess]:
    """A real S3 API server (moto's server mode) on 127.0.0.1, for the whole session."""
    server = MotoProcess()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: MotoProcess, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket on the session's S3 server, and the standard variables pointing this process (and the
    children it starts) at it: `s3.url("in.csv")`, `s3.put(key, data)`, `s3.objects()`."""
    bucket = S3Bucket(s3_server.endpoint).create()
    point_at(monkeypatch, bucket.endpoint)
    return bucket
