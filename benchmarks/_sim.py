"""Helpers of the saturation benchmark: the simulator and a job as subprocesses, and stats sampling.

Everything here talks only to a simulator it started itself on 127.0.0.1, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: how long a simulator may take to say where it listens
SERVER_START_TIMEOUT_S = 30.0
#: how long a stopped job may take to exit before it is killed
JOB_STOP_TIMEOUT_S = 30.0


def env() -> dict[str, str]:
    """The environment of the subprocesses: this checkout first on PYTHONPATH, no real key."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    for name in ("BATCHHUB_API_KEY", "OPENAI_API_KEY", "BATCHHUB_BASE_URL", "OPENAI_BASE_URL"):
        e.pop(name, None)
    return e


@dataclass
class Sample:
    """One reading of the simulator's counters."""

    t: float  # seconds since sampling began (monotonic)
    requests: int
    completions: int
    total_tokens: int
    rate_limited: int


class Simulator:
    """`batchhub mock-server` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, *, rpm: int | None, tpm: int | None, latency_ms: float, seed: int = 1) -> None:
        args = [sys.executable, "-m", "batchhub", "mock-server", "--host", "127.0.0.1", "--port", "0"]
        args += ["--latency-ms", str(latency_ms), "--seed", str(seed)]
        if rpm:
            args += ["--rpm", str(rpm)]
        if tpm:
            args += ["--tpm", str(tpm)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT
        )
        self.base_url = self._wait_ready()
        self._stats_url = self.base_url.removesuffix("/v1") + "/mock/stats"

    def _wait_ready(self) -> str:
        assert self.proc.stderr is not None
        found: list[str] = []

        def read() -> None:
            assert self.proc.stderr is not None
            found.append(self.proc.stderr.readline())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(SERVER_START_TIMEOUT_S)
        line = found[0] if found else ""
        if "listening on " not in line:
            self.close()
            raise RuntimeError(f"the simulator did not start: {line!r}")
        # nothing else is read from stderr: let it drain so the server can never block on it
        threading.Thread(target=self._drain, daemon=True).start()
        return line.split("listening on ")[1].split()[0]

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        with contextlib.suppress(ValueError, OSError):
            for _ in self.proc.stderr:
                pass

    def stats(self) -> dict:
        with urllib.request.urlopen(self._stats_url, timeout=5) as resp:
            return json.load(resp)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sampler:
    """Reads the simulator's stats every `interval` seconds in a thread, into a time series."""

    def __init__(self, sim: Simulator, interval: float) -> None:
        self.sim = sim
        self.interval = interval
        self.samples: list[Sample] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.take()  # the first reading, before anything is sent
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def take(self) -> Sample:
        s = self.sim.stats()
        sample = Sample(
            t=time.monotonic() - self.t0,
            requests=int(s["requests"]),
            completions=int(s["completions"]),
            total_tokens=int(s["total_tokens"]),
            rate_limited=int(s["rate_limited"]),
        )
        with self._lock:
            self.samples.append(sample)
        return sample

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.interval
            with contextlib.suppress(OSError, ValueError):
                self.take()

    def latest(self) -> Sample:
        with self._lock:
            return self.samples[-1]

    def series(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


_VOCABULARY = """
the a of to and in is it that for on with as this by be are from at or data model result value batch
prompt answer token request response rate limit order queue worker signal record column table field
summary quickly clearly simply carefully usually often rarely always small large quiet bright stable
careful simple useful ready open runs reads writes checks counts sends keeps finds builds returns
weather harbour ocean river mountain letter garden window morning evening
"""
_WORDS = _VOCABULARY.split()


def write_prompts(path: Path, rows: int, words: int, seed: int = 7) -> None:
    """A CSV with a `prompt` column: short prompts (words=0) or ~`words` words of text each."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt"])
        for i in range(rows):
            if words <= 0:
                w.writerow([f"row {i}: say something about the sea"])
            else:
                text = " ".join(rng.choice(_WORDS) for _ in range(words))
                w.writerow([f"row {i}: summarise this. {text}."])


@dataclass
class JobRun:
    """A `batchhub run` subprocess."""

    proc: subprocess.Popen
    job_dir: Path
    stderr: str = ""
    returncode: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        input_path: Path,
        job_dir: Path,
        base_url: str,
        *,
        concurrency: int,
        rpm: int | None = None,
        tpm: int | None = None,
    ) -> JobRun:
        args = [sys.executable, "-m", "batchhub", "run", str(input_path)]
        args += ["--base-url", base_url, "--api-key", "k", "--model", "m", "--quiet"]
        args += ["--job-dir", str(job_dir), "--concurrency", str(concurrency)]
        if rpm:
            args += ["--rpm", str(rpm)]
        if tpm:
            args += ["--tpm", str(tpm)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
        return cls(proc, job_dir)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Ask the job to stop (SIGINT: in-flight requests finish), kill it if it does not."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=JOB_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        self.stderr = err or ""
        self.returncode = self.proc.returncode

    def failed_rows(self) -> int | None:
        """Rows recorded as failed (None if the job directory cannot be read)."""
        try:
            from batchhub.status import job_status

            return int(job_status(self.job_dir).failed)
        except Exception:
            return None


@contextlib.contextmanager
def started(sim_kwargs: dict) -> Iterator[Simulator]:
    sim = Simulator(**sim_kwargs)
    try:
        yield sim
    finally:
        sim.close()
