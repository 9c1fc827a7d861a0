"""Helpers of the saturation benchmark: the simulator and a job as subprocesses, and stats sampling.

Everything here talks only to a simulator it started itself on 127.0.0.1, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import csv
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from _common import Simulator, child_env  # noqa: E402

#: how long a stopped job may take to exit before it is killed
JOB_STOP_TIMEOUT_S = 30.0


@dataclass
class Sample:
    """One reading of the simulator's counters."""

    t: float  # seconds since sampling began (monotonic)
    requests: int
    completions: int
    total_tokens: int
    rate_limited: int

    def served(self, kind: str) -> int:
        """Units the simulator admitted so far: requests ("rpm") or tokens ("tpm")."""
        return self.completions if kind == "rpm" else self.total_tokens


def simulator(*, rpm: int | None, tpm: int | None, latency_ms: float, seed: int = 1) -> Simulator:
    """The simulator with these limits and this latency (see `_common.Simulator`)."""
    extra = ["--latency-ms", str(latency_ms), "--seed", str(seed)]
    if rpm:
        extra += ["--rpm", str(rpm)]
    if tpm:
        extra += ["--tpm", str(tpm)]
    return Simulator(*extra)


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
        options: tuple[str, ...] = (),
    ) -> JobRun:
        args = [sys.executable, "-m", "batchhub", "run", str(input_path)]
        args += ["--base-url", base_url, "--api-key", "k", "--model", "m", "--quiet"]
        args += ["--job-dir", str(job_dir), "--concurrency", str(concurrency)]
        if rpm:
            args += ["--rpm", str(rpm)]
        if tpm:
            args += ["--tpm", str(tpm)]
        args += options
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT
        )
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
    sim = simulator(**sim_kwargs)
    try:
        yield sim
    finally:
        sim.close()
