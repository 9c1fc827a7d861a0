"""The growth benchmark runs in its smoke mode, prints a figure per point and draws its plot.

Only that it runs and reports is checked, never the figures themselves.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import run_benchmark

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(?:\.\d+)?"
POINT = rf": CPU {NUMBER} ms per 1,000 rows, {NUMBER} rows/s end to end \({NUMBER} in the loop\), peak RSS {NUMBER} MB$"


def test_growth_benchmark_smoke(tmp_path: Path) -> None:
    png = tmp_path / "growth.png"
    lines = run_benchmark("growth", "--workdir", str(tmp_path), "--plot", str(png), cwd=tmp_path)
    for what in (r"rows [\d,]+ rows", r"concurrency concurrency \d+", r"prompt [\d,]+-character prompts"):
        matching = [line for line in lines if re.match(rf"^growth {what}{POINT}", line)]
        assert len(matching) == 2, (what, lines)
    assert any(re.match(rf"^growth rows fit: {NUMBER} s of CPU every job pays", line) for line in lines), lines
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
