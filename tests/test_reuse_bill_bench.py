"""The reuse bill benchmark runs end to end in its smoke mode and prints a line per command.

Only that it runs and says what it measured: its figures are the benchmark's, not asserted here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

# eight CLI processes of about half a second each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(?:\.\d+)?"


def test_reuse_bill_benchmark_smoke(tmp_path: Path) -> None:
    final = summary_block(run_smoke("reuse_bill", "--workdir", str(tmp_path)), "== reuse_bill ==")
    cost, status, target = line_per_label(
        final, ("reuse bill: batchhub cost ", "reuse bill: batchhub status ", "reuse bill target:")
    )
    for line in (cost, status):
        figures = rf"before {NUMBER} s, none reused {NUMBER} s \({NUMBER}x\), half reused {NUMBER} s \({NUMBER}x\), "
        assert re.search(figures + rf"all reused {NUMBER} s \({NUMBER}x\) \(median of 1\)$", line), line
    assert target.endswith((": met", ": NOT met")), target
