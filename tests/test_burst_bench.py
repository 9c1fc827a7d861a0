"""The burst benchmark runs end to end in its smoke mode and prints a line per case.

Only that it runs: its figures are measured by the benchmark itself, not asserted here.
"""

from __future__ import annotations

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

LABELS = (
    "rpm per second, told --rpm:",
    "tpm per second, told --tpm:",
    "rpm per second, told --rps:",
    "rpm per second, told --rpm, --burst 60:",
)


def test_burst_benchmark_smoke() -> None:
    final = summary_block(run_smoke("burst"), "Bursts (")
    for line in line_per_label(final, LABELS):
        assert "% of " in line and "% 429s" in line and "first minute" in line, line
