"""The reuse benchmark (benchmarks/reuse.py) runs in its smoke mode: a job whose replies are all cached sends
nothing, the same job with every row moved sends only the new row, and it says what the look-up cost."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import line_per_label, run_benchmark

# end-to-end runs of a few seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow


def test_reuse_benchmark_smoke(tmp_path: Path) -> None:
    lines = run_benchmark("reuse", "--keep", str(tmp_path / "work"), cwd=tmp_path)
    labels = ("all 2,000 rows from the cache", "every row moved", "reusing nothing", "the look-up")
    cached, moved, nothing, lookup = line_per_label(lines, labels)
    assert cached.endswith("requests sent 0, ok 2,000"), cached
    assert "requests sent 1 (the new row)" in moved, moved
    assert re.search(r"CPU per row \d+ µs with the cache, \d+ µs writing it only \(--fresh\), \d+ µs without", nothing)
    assert re.search(r"^the look-up \(cache vs --fresh\): CPU x[\d.]+, .* writing the cache .* CPU x[\d.]+", lookup)
