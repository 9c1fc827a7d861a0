"""Which event loop a job runs on: uvloop where it is installed, asyncio's own otherwise.

uvloop (`pip install "batchhub[fast]"`) runs the same code with less CPU per request
(aiohttp's callbacks, timers and socket reads are most of a row's cost; see
docs/PERFORMANCE.md). `BATCHHUB_EVENT_LOOP` chooses:

- `auto` (the default): uvloop if it can be imported, else asyncio;
- `uvloop`: uvloop, and a clear error if it is not installed;
- `asyncio`: asyncio's own loop, even where uvloop is installed.

Only the places that make a loop of their own use this (`batchhub run`, `batchhub.run()`
in its worker thread, `run_job`, a Ray task). Code that is handed a running loop (`arun`,
`arun_job`, a notebook cell) keeps it: nothing here sets a global loop policy.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from batchhub.errors import UsageError

#: The environment variable that chooses the loop.
ENV = "BATCHHUB_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")

T = TypeVar("T")


def choice() -> str:
    """The loop asked for by `$BATCHHUB_EVENT_LOOP` (`auto` when unset or empty)."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise UsageError(f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(CHOICES)}")
    return value


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes a new event loop, as chosen: `uvloop.new_event_loop` or `asyncio.new_event_loop`."""
    wanted = choice()
    if wanted == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:
        if wanted == "uvloop":
            raise UsageError(
                f'{ENV}=uvloop but uvloop is not installed: pip install "batchhub[fast]" (or unset {ENV})'
            ) from exc
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop of the chosen kind (the caller runs and closes it)."""
    return loop_factory()()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coro)` on a new loop of the chosen kind."""
    try:
        factory = loop_factory()
    except BaseException:
        coro.close()  # never awaited: say so quietly instead of a RuntimeWarning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """`uvloop` or `asyncio`: the kind of `loop` (default: the running one), as job.json records it."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
