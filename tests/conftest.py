"""Shared test fixtures: `mock_server` (simulators in the test's event loop), `simulator_process`
(a simulator in a process of its own), and a shim for aioresponses.

aioresponses 0.7.9 (its newest release) builds `ClientResponse` without the
keyword-only `stream_writer` argument that aiohttp 3.14 requires (upstream
pnuckowski/aioresponses#289, open). aiohttp 3.14 carries a security fix, so we do
not pin it lower: instead this shim gives aioresponses a response class that
supplies the argument. aiohttp only reads `stream_writer.output_size`. Remove the
shim once aioresponses releases a fix.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import aioresponses.core
import pytest

from batchhub.mock import MockConfig, MockServer, SimulatorProcess


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
