"""benchmarks/batch_files.py --smoke: a batch run on a large input, its first batch and its files."""

from __future__ import annotations

import pytest
from jobprocs import line_per_label, run_smoke, summary_block


@pytest.mark.slow
def test_batch_files_benchmark_smoke() -> None:
    block = summary_block(run_smoke("batch_files"), "== batch files ==")
    first, files, exit_line = line_per_label(block, ("time from start", "batches created", "exit"))
    assert float(first.split(": ")[1].split(" s")[0]) > 0
    assert "requests per file: 20,000, 20,000" in files  # full files of --batch-requests
    assert exit_line.startswith("exit 3 ")  # stopped (resumable), never a crash
