"""The start-up benchmark (benchmarks/start.py) runs in its smoke mode and prints a line per case.

Only that it runs and says what it measured: its figures are the script's, not asserted here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import run_benchmark

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(?:\.\d+)?"


def test_start_benchmark_smoke(tmp_path: Path) -> None:
    lines = run_benchmark("start", "--workdir", str(tmp_path), cwd=tmp_path, timeout=240)
    for fmt in ("csv", "parquet", "jsonl"):
        pattern = rf"^start {fmt} 100,000 rows: new {NUMBER} s, resumed {NUMBER} s \(median of 1\)$"
        assert any(re.match(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n" + "\n".join(lines)
    for kind in ("new", "resumed"):
        target = rf"^start target, {kind} job: first request within .*: (met|NOT met)$"
        assert any(re.match(target, line) for line in lines), "\n".join(lines)
