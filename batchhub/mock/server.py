"""The simulated endpoint listening on a local port, for tests, the demo and the CLI.

`MockServer` is an async context manager around an aiohttp runner;
`serve_forever` is what ``batchhub mock-server`` runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from batchhub.mock.app import make_app
from batchhub.mock.config import MockConfig, MockStats
from batchhub.mock.ratelimit import Clock
from batchhub.mock.state import STATE

#: How long closing waits for handlers before cancelling them. Hung and
#: sleeping handlers wake at once on close, so this only bounds the odd one
#: stuck writing to a client that does not read.
SHUTDOWN_TIMEOUT = 1.0

__all__ = ["SHUTDOWN_TIMEOUT", "MockServer", "make_app", "serve_forever"]


class MockServer:
    """The simulated endpoint listening on a local port.

    Use as ``async with MockServer(cfg) as srv:`` and point a client at
    ``srv.base_url``; ``srv.stats`` is live. Port 0 (the default) picks a free
    port. Closing ends hung and slow requests at once by dropping their
    connections.
    """

    def __init__(
        self,
        config: MockConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
    ) -> None:
        self.config = config if config is not None else MockConfig()
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.app = make_app(self.config, clock=clock)
        self._runner: web.AppRunner | None = None
        self._started = False

    @property
    def stats(self) -> MockStats:
        """The live counters of this server."""
        return self.app[STATE].stats

    @property
    def prompts_seen(self) -> list[str]:
        """The last user message of every completion served and paid for, in order (see `MockConfig.echo`).

        Raises RuntimeError when the server does not echo: it records nothing then, and an empty list
        would pass for "nothing was sent".
        """
        if not self.config.echo:
            raise RuntimeError("this simulator does not record prompts: give it MockConfig(echo=True)")
        return self.app[STATE].prompts_seen

    @property
    def port(self) -> int:
        """The port the server listens on (known once started)."""
        if self._port is None:
            raise RuntimeError("the mock server is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The API base URL to give a client, e.g. ``http://127.0.0.1:PORT/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def wait_until(self, condition: Callable[[MockStats], bool]) -> None:
        """Return once `condition(self.stats)` holds; it is checked at every change.

        For tests that must act at a given point (requests in flight, a fault
        injected, a completion paid) without sleeping and hoping it is reached.
        """
        await self.app[STATE].wait_until(condition)

    async def wait_in_flight(self, count: int) -> None:
        """Return once at least `count` requests are being handled at the same time."""
        await self.wait_until(lambda stats: stats.in_flight >= count)

    async def wait_idle(self) -> None:
        """Return once no request is being handled (a client that hangs up ends its request)."""
        await self.wait_until(lambda stats: stats.in_flight == 0)

    async def start(self) -> None:
        """Start listening. A server is started once."""
        if self._started:
            # The aiohttp app is frozen once run; a fresh MockServer is cheap.
            raise RuntimeError("a mock server can be started only once")
        self._started = True
        runner = web.AppRunner(
            self.app,
            # No access log: it is noise in tests, and a mock has no one to audit.
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            # A request whose client hung up ends at once, so that in-flight
            # counts are the client's concurrency, not hung leftovers.
            handler_cancellation=True,
        )
        await runner.setup()
        self._runner = runner
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await self.close()
            raise
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        """Stop listening and end every request still being handled."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve_forever(
    cfg: MockConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Run a mock server until cancelled; `ready(base_url)` is called once it listens."""
    async with MockServer(cfg, host=host, port=port) as server:
        if ready is not None:
            ready(server.base_url)
        # Nothing to do but serve: wait on an event no one sets, until cancelled.
        await asyncio.Event().wait()
