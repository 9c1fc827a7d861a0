"""The batch bill benchmark runs end to end in its smoke mode and prints a line per command.

Only that it runs and says what it measured: its timings are the benchmark's, not asserted here;
its bills are exact (the same usage at the live price and at the batch price).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

# ten CLI processes of about half a second each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(?:\.\d+)?"


def test_batch_bill_benchmark_smoke(tmp_path: Path) -> None:
    final = summary_block(run_smoke("batch_bill", "--workdir", str(tmp_path)), "== batch_bill ==")
    cost, status, cost_bill, status_bill, demo, target = line_per_label(
        final,
        (
            "batch bill: batchhub cost ",
            "batch bill: batchhub status ",
            "batch bill: cost's bill",
            "batch bill: status's bill",
            "batch bill: the demo",
            "batch bill target:",
        ),
    )
    for line in (cost, status):
        figures = rf"before {NUMBER} s, live {NUMBER} s \({NUMBER}x\), half batch {NUMBER} s \({NUMBER}x\), "
        assert re.search(figures + rf"all batch {NUMBER} s \({NUMBER}x\) \(median of 1\)$", line), line
    for line in (cost_bill, status_bill):
        assert line.endswith("(0.50x live)"), line
    assert demo.endswith("(0.50x live)"), demo
    assert target.endswith((": met", ": NOT met")), target
