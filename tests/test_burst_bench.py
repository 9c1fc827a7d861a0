"""The burst benchmark runs end to end in its smoke mode and prints a line per case.

Only that it runs: its figures are measured by the benchmark itself, not asserted here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from jobprocs import child_env

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LABELS = (
    "rpm per second, told --rpm:",
    "tpm per second, told --tpm:",
    "rpm per second, told --rps:",
    "rpm per second, told --rpm, --burst 60:",
)


def test_burst_benchmark_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "burst.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=ROOT,
        timeout=300,  # a bound against a hang, not a speed check
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0]
    final = lines[lines.index(next(line for line in lines if line.startswith("Bursts ("))) :]
    for label in LABELS:
        matching = [line for line in final if line.startswith(label)]
        assert len(matching) == 1, (label, proc.stdout)
        assert "% of " in matching[0] and "% 429s" in matching[0] and "first minute" in matching[0]
