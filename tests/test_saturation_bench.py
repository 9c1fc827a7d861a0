"""The saturation benchmark runs end to end in its smoke mode and prints a line per case.

Only that it runs: its figures are measured by the benchmark itself, not asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LABELS = (
    "rpm-bound, told limit:",
    "tpm-bound, told limit:",
    "rpm-bound, told 2x limit:",
    "tpm-bound, told 2x limit:",
    "rpm-bound, told nothing:",
    "tpm-bound, told nothing:",
)


def test_saturation_benchmark_smoke(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out_json = tmp_path / "saturation.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "saturation.py"), "--smoke", "--json", str(out_json)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,  # a bound against a hang, not a speed check
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0] and "Python" in lines[0]
    final = lines[lines.index(next(line for line in lines if line.startswith("Saturation ("))) :]
    for label in LABELS:
        matching = [line for line in final if line.startswith(label)]
        assert len(matching) == 1, (label, proc.stdout)
        assert "% of " in matching[0] and "% 429s" in matching[0]
    assert out_json.exists()
