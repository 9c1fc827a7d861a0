"""The Batch API client's benchmark (benchmarks/batch_api.py) runs in its smoke mode and prints a line
per case. Only that it runs and says what it measured: its figures are the script's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import run_benchmark

# child processes and a simulator of their own: `pytest -m "not slow"` leaves it out
pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(?:\.\d+)?"


def test_batch_api_benchmark_smoke(tmp_path: Path) -> None:
    lines = run_benchmark("batch_api", "--workdir", str(tmp_path), cwd=tmp_path, timeout=240)
    patterns = [
        rf"^transfer, imports alone: peak RSS {NUMBER} MB \(median of 1\)$",
        *(
            rf"^transfer {mode}, 8 MB file: peak RSS {NUMBER} MB \(-?{NUMBER} MB above the imports\), "
            rf"upload {NUMBER} s \({NUMBER} MB/s\), download {NUMBER} s \({NUMBER} MB/s\) \(median of 1\)$"
            for mode in ("streamed", "in memory")
        ),
        r"^transfer target: streamed peak under 32 MB above the imports for a 8 MB file: (met|NOT met)$",
        *(
            rf"^creates, 40% of requests failing, client {client}: {NUMBER} batches per create "
            rf"\(12 creates, \d+ batches, \d+ faults, {NUMBER} s\)$"
            for client in ("looks before posting again", "posts again")
        ),
        r"^creates target: exactly 1.00 batch per create: met$",
    ]
    for pattern in patterns:
        assert any(re.match(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n" + "\n".join(lines)
