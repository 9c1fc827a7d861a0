"""The learning benchmark runs end to end in its smoke mode and prints a line per case.

Only that it runs: its figures are measured by the benchmark itself, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LABELS = (
    "bare 429s, steady limit:",
    "headers, steady limit:",
    "bare 429s, limit lowered then raised:",
    "headers, limit lowered then raised:",
)


def test_learning_benchmark_smoke(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out_json = tmp_path / "learn.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "learn.py"), "--smoke", "--json", str(out_json)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,  # a bound against a hang, not a speed check
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0] and "Python" in lines[0]
    final = lines[lines.index(next(line for line in lines if line.startswith("Learning ("))) :]
    for label in LABELS:
        matching = [line for line in final if line.startswith(label)]
        assert len(matching) == 1, (label, proc.stdout)
        assert "% of the limit" in matching[0] and "% 429s" in matching[0] and ">= 90%" in matching[0]
    results = json.loads(out_json.read_text())["results"]
    assert [r["case"] for r in results] == ["bare-steady", "headers-steady", "bare-changing", "headers-changing"]
    assert all(r["requests"] > 0 and r["windows"] for r in results)
