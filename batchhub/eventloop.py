"""Which event loop a job runs on: uvloop where it is installed, asyncio's own otherwise.

uvloop (`pip install "batchhub[fast]"`) is used where installed; against the simulator it
saved no consistent CPU (aiohttp's own Python code, not the loop, is most of a request's
cost: docs/PERFORMANCE.md). `BATCHHUB_EVENT_LOOP` chooses:

- `auto` (the default): uvloop if it can be imported, else asyncio;
- `uvloop`: uvloop, and a clear error if it is not installed;
- `asyncio`: asyncio's own loop, even where uvloop is installed.

Only the places that make a loop of their own use this (`batchhub run`, `batchhub.run()`
in its worker thread, `run_job`, a Ray task). Code that is handed a running loop (`arun`,
`arun_job`, a notebook cell) keeps it: nothing here sets a global loop policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from batchhub import defaults
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


@contextlib.contextmanager
def settled_gc() -> Iterator[None]:
    """Inside, the garbage collector is cheaper for a process that runs one job: `batchhub run`.

    What was made before the job (modules, the price data: 50,000-75,000 objects) is frozen
    out of later collections, which walked it all every time, and the youngest generation
    is collected after `defaults.GC_GEN0_THRESHOLD` allocations instead of Python's 700
    (each request makes hundreds of short-lived objects: aiohttp's futures, headers, parsed
    bodies). With Python's settings the collector took ~10% of a 20,000-row job's CPU.
    Not done by `batchhub.run()` or `run_job`: the process is the caller's. Afterwards the
    settings are as they were, and everything is unfrozen.
    """
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(defaults.GC_GEN0_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def loop_name(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """`uvloop` or `asyncio`: the kind of `loop` (default: the running one), as job.json records it."""
    loop = loop or asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
