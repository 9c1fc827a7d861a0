"""The saturation benchmark runs end to end in its smoke mode and prints a line per case.

Only that it runs: its figures are measured by the benchmark itself, not asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

LABELS = (
    "rpm-bound, told limit:",
    "tpm-bound, told limit:",
    "rpm-bound, told 2x limit:",
    "tpm-bound, told 2x limit:",
    "rpm-bound, told nothing:",
    "tpm-bound, told nothing:",
)


def test_saturation_benchmark_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "saturation.json"
    final = summary_block(run_smoke("saturation", "--json", str(out_json)), "Saturation (")
    for line in line_per_label(final, LABELS):
        assert "% of " in line and "% 429s" in line, line
    assert out_json.exists()
