"""The S3 input benchmark runs end to end in its smoke mode and prints a line per input format.

Only that it runs and measures: its figures are the benchmark's, not asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

pytestmark = pytest.mark.slow  # a child process with its own S3 server: several seconds


def test_s3_input_benchmark_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "s3_input.json"
    final = summary_block(run_smoke("s3_input", "--json", str(out_json)), "== S3 input (")
    for line in line_per_label(final, ("in.csv:", "in.parquet:", "in.jsonl.gz:")):
        assert "rows/s local" in line and "rows/s bucket" in line and "GETs" in line, line
    figures = json.loads(out_json.read_text())
    assert set(figures) == {"in.csv", "in.parquet", "in.jsonl.gz"}
    assert all(f["shard_bytes"] > 0 and f["bucket_rows_per_s"] > 0 for f in figures.values())
