"""The reply cache benchmark runs in its smoke mode and prints a line per figure.

Only that it runs: its figures are measured by the benchmark itself, not asserted here.
"""

from __future__ import annotations

import pytest
from jobprocs import line_per_label, run_smoke, summary_block

# a child process per measurement, a few seconds in all: `pytest -m "not slow"` leaves it out
pytestmark = pytest.mark.slow

LABELS = (
    "index: ",
    "file: ",
    "open + first 1,000 random lookups, cold: ",
    "lookups in 1,000-key batches: ",
    "puts through CacheWriter: ",
    "info (batchhub cache) of ",
    "prune --max-size to 99%: ",
    "build (bulk path): ",
)


def test_cache_index_benchmark_smoke() -> None:
    final = summary_block(run_smoke("cache_index"), "Reply cache (5,000 entries):")
    index, _, cold, lookups, puts, _, prune, _ = line_per_label(final, LABELS)
    assert "bytes an entry" in index and ("met" in index)
    assert "target about a second: " in cold
    assert "random hits " in lookups and "hits in put order " in lookups and "misses " in lookups
    assert "/s; add() on the event loop " in puts
    assert "oldest entries removed in " in prune
