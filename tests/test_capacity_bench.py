"""The capacity benchmark runs end to end in its smoke mode and prints a line per case.

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


def test_capacity_benchmark_smoke(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out_json = tmp_path / "capacity.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "capacity.py"), "--smoke", "--json", str(out_json)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,  # a bound against a hang, not a speed check
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0]
    final = lines[lines.index(next(line for line in lines if line.startswith("== Capacity (smoke"))) :]
    assert any(line.startswith("capacity 4: auto / best fixed = ") and "timeouts" in line for line in final)
    assert any(line.startswith("capacity 4, client timeout 0.3 s:") for line in final)
    for told in ("told 600 rpm", "told nothing"):
        for concurrency in ("32", "auto"):
            assert any(f"{told}, concurrency {concurrency:>4}: " in line and "% 429s" in line for line in final)
    runs = json.loads(out_json.read_text())
    assert [r["concurrency"] for r in runs] == ["2", "8", "auto", "8", "auto", "32", "auto", "32", "auto"]
