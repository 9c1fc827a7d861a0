"""The learning benchmark runs end to end in its smoke mode and prints a line per case.

Only that it runs: its figures are measured by the benchmark itself, not asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

LABELS = (
    "bare 429s, steady limit:",
    "headers, steady limit:",
    "bare 429s, limit lowered then raised:",
    "headers, limit lowered then raised:",
)


def test_learning_benchmark_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "learn.json"
    final = summary_block(run_smoke("learn", "--json", str(out_json)), "Learning (")
    for line in line_per_label(final, LABELS):
        assert "% of the limit" in line and "% 429s" in line and ">= 90%" in line, line
    results = json.loads(out_json.read_text())["results"]
    assert [r["case"] for r in results] == ["bare-steady", "headers-steady", "bare-changing", "headers-changing"]
    assert all(r["requests"] > 0 and r["windows"] for r in results)
