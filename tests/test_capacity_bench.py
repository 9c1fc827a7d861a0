"""The capacity benchmark runs end to end in its smoke mode and prints a line per case.

Only that it runs: its figures are measured by the benchmark itself, not asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobprocs import run_smoke, summary_block

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow


def test_capacity_benchmark_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "capacity.json"
    final = summary_block(run_smoke("capacity", "--json", str(out_json)), "== Capacity (smoke")
    assert any(line.startswith("capacity 4: auto / best fixed = ") and "timeouts" in line for line in final)
    assert any(line.startswith("capacity 4, client timeout 0.3 s:") for line in final)
    for told in ("told 600 rpm", "told nothing"):
        for concurrency in ("32", "auto"):
            assert any(f"{told}, concurrency {concurrency:>4}: " in line and "% 429s" in line for line in final)
    runs = json.loads(out_json.read_text())
    assert [r["concurrency"] for r in runs] == ["2", "8", "auto", "8", "auto", "32", "auto", "32", "auto"]
