"""A `batchhub run` process that kills itself (SIGKILL) at one step of a run through the Batch API.

    python tests/batch_child.py KILL_AT -- RUN_ARGS...

KILL_AT: `upload` (the file is on the server, its id not written down), `create` (the batch is made,
its id not written down), `poll` (a live batch polled once), `download` (a batch's results partly
recorded), `interrupt` (Ctrl-C at that point of a download), or `none`. The steps are the library's own
calls; the kill is the only thing added.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after(cls: Any, name: str) -> None:
    """`cls.name` runs, then the process dies (before its caller sees the answer)."""
    original = getattr(cls, name)

    @functools.wraps(original)
    async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        await original(self, *args, **kwargs)
        _die()

    setattr(cls, name, wrapped)


def main() -> None:
    kill_at, _, *run_args = sys.argv[1:]
    from batchhub import batch_run
    from batchhub.batch_api import BatchAPI

    if kill_at == "upload":
        _after(BatchAPI, "upload")
    elif kill_at == "create":
        _after(BatchAPI, "create")
    elif kill_at == "poll":
        _after(BatchAPI, "retrieve")
    elif kill_at in ("download", "interrupt"):
        batch_run._LINES_PER_PASS = 10  # one journal write per 10 lines: the kill comes after some are written
        original = batch_run.BatchRun._line
        seen = [0]

        def line(self: Any, *args: Any) -> None:
            seen[0] += 1
            if seen[0] == 45:  # `interrupt`: Ctrl-C instead (SIGINT), the run goes on to its stop
                _die() if kill_at == "download" else os.kill(os.getpid(), signal.SIGINT)
            original(self, *args)

        batch_run.BatchRun._line = line  # type: ignore[method-assign]
    from batchhub.cli import main as cli

    cli.main(["run", *run_args], prog_name="batchhub")


if __name__ == "__main__":
    main()
