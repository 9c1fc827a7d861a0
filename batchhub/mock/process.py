"""The simulator in a process of its own, on a free port of 127.0.0.1.

`MockServer` runs the simulator inside the caller's event loop. A job run as a
subprocess, several job processes counted by one server, or a benchmark that must
not share a core's event loop with what it measures need the server in a process of
its own: :class:`SimulatorProcess` starts ``python -m batchhub mock-server --port 0``
with the options given (the same as the command line's), waits until it says where
it listens, and reads its counters. The tests and the benchmarks both use it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["SimulatorProcess"]

#: the folder holding the batchhub package: first on the child's PYTHONPATH, so it runs this copy
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
#: how long close() waits for the process to exit after SIGTERM before killing it
STOP_TIMEOUT_S = 10.0


class SimulatorProcess:
    """`batchhub mock-server` in its own process: ``SimulatorProcess("--rpm", "600", "--seed", "3")``.

    `args` are mock-server options; `env` is the child's environment (default: this
    one), with this copy of batchhub first on PYTHONPATH. Blocks until the server
    listens; raises RuntimeError if it exits first. Use it as a context manager, or
    call :meth:`close`.
    """

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        self._conn: http.client.HTTPConnection | None = None
        child_env = dict(os.environ if env is None else env)
        path = child_env.get("PYTHONPATH")
        child_env["PYTHONPATH"] = str(_PACKAGE_ROOT) + (os.pathsep + path if path else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchhub", "mock-server", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # blocks until it says where it listens (or exits)
        if "listening on " not in line:
            self.close()
            raise RuntimeError(f"the simulator did not start: {line.strip()!r}")
        #: the server's base URL, ending in /v1
        self.base_url = line.split("listening on ")[1].split()[0]
        # nothing else is read from stderr: drain it so the server can never block on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()
        self.host, _, port = self.base_url.removesuffix("/v1").removeprefix("http://").partition(":")
        self.port = int(port)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        with contextlib.suppress(ValueError, OSError):
            for _ in self.proc.stderr:
                pass

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """`GET /mock/stats`, on one kept-alive connection (cheap enough to poll in a tight loop)."""
        for attempt in range(2):
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
                self._conn.request("GET", "/mock/stats")
                stats: dict[str, Any] = json.loads(self._conn.getresponse().read())
                return stats
            except (OSError, http.client.HTTPException):
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def prompts_seen(self, timeout: float = 10.0) -> list[str]:
        """`GET /mock/prompts`: the last user message of every completion served (the server runs with
        ``--echo``; RuntimeError otherwise)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", "/mock/prompts")
            response = conn.getresponse()
            body: dict[str, Any] = json.loads(response.read())
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(body["error"]["message"])
        prompts: list[str] = body["prompts"]
        return prompts

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers). Safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.proc.poll() is None:
            # SIGTERM, not SIGINT: a process started in the background (`cmd &`) ignores
            # SIGINT, and so do its children
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
