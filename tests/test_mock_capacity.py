"""The simulator's capacity: N served at once, the rest in a FIFO queue, 503 past `max_queue`,
a client that gives up leaving the queue, latency growing with the batch."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from batchhub.cli import main
from batchhub.mock import MockConfig, MockServer
from batchhub.mock.capacity import Capacity
from batchhub.mock.config import MockStats

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


async def post(session: aiohttp.ClientSession, server: MockServer, timeout: float = 30) -> int:
    async with session.post(
        server.base_url + "/chat/completions",
        json=BODY,
        headers={"Authorization": "Bearer k"},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        await resp.read()
        return resp.status


async def test_n_served_at_once_the_rest_wait_in_order(mock_server: Any) -> None:
    server = await mock_server(capacity=2, latency_ms=200)
    async with aiohttp.ClientSession() as session:
        sent = [asyncio.create_task(post(session, server)) for _ in range(5)]
        await server.wait_until(lambda s: s.queue_length == 3)
        assert (server.stats.serving, server.stats.completions) == (2, 2)  # only the served ones are paid
        assert await asyncio.gather(*sent) == [200] * 5
    stats = server.stats
    assert (stats.max_serving, stats.max_queue_length, stats.queued, stats.completions) == (2, 3, 3, 5)
    assert (stats.serving, stats.queue_length) == (0, 0)
    # the 3 that waited waited for at least one service time (>= 0.5 x 200 ms) each
    assert stats.queue_wait_s >= 3 * 0.1 and stats.max_queue_wait_s >= 0.1


async def test_past_max_queue_a_503_at_once(mock_server: Any) -> None:
    server = await mock_server(capacity=1, max_queue=1, latency_ms=200)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(post(session, server))
        await server.wait_until(lambda s: s.serving == 1)
        second = asyncio.create_task(post(session, server))
        await server.wait_until(lambda s: s.queue_length == 1)
        assert await post(session, server) == 503
        assert await asyncio.gather(first, second) == [200, 200]
    assert (server.stats.queue_full, server.stats.by_status) == (1, {200: 2, 503: 1})


async def test_a_client_that_gives_up_leaves_the_queue_unpaid(mock_server: Any) -> None:
    server = await mock_server(capacity=1, latency_ms=400)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(post(session, server))
        await server.wait_until(lambda s: s.serving == 1)
        with pytest.raises(asyncio.TimeoutError):
            await post(session, server, timeout=0.05)  # its timeout passes while it waits
        await server.wait_until(lambda s: s.queue_abandoned == 1)
        assert server.stats.queue_length == 0
        assert await first == 200
        assert await post(session, server) == 200  # the place went on to the next one, not lost
    assert (server.stats.completions, server.stats.serving) == (2, 0)


def test_latency_grows_with_the_number_served() -> None:
    stats = MockStats()
    capacity = Capacity(MockConfig(capacity=4, capacity_slowdown=0.5), stats, lambda: None)
    factors = []
    for serving in range(1, 5):
        stats.serving = serving
        factors.append(capacity.slowdown())
    assert factors == [1.125, 1.25, 1.375, 1.5]
    assert Capacity(MockConfig(), stats, lambda: None).slowdown() == 1.0


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": 2.5}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": 4, "max_queue": -1}, "max_queue"),
        ({"max_queue": 3}, "max_queue"),
        ({"capacity_slowdown": -0.1}, "capacity_slowdown"),
        ({"capacity_slowdown": float("inf")}, "capacity_slowdown"),
    ],
)
def test_bad_capacity_settings_are_refused_naming_the_key(settings: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=f"mock {key} "):
        MockConfig(**settings)


def test_mock_server_refuses_a_bad_capacity_in_one_line() -> None:
    result = CliRunner().invoke(main, ["mock-server", "--capacity", "0", "--port", "0"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: mock capacity must be a positive integer, got 0"


async def test_a_client_that_gives_up_mid_answer_frees_its_place(mock_server: Any) -> None:
    server = await mock_server(capacity=1, latency_ms=2000)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await post(session, server, timeout=0.1)
        await server.wait_until(lambda s: s.service_abandoned == 1)
        assert (server.stats.serving, server.stats.completions) == (0, 1)  # paid, as with a real provider
