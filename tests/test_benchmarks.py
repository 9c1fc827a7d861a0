"""The benchmark scripts run (in their --smoke mode) and print their figures.

Only that they work and say what they measured is checked here, never how fast
anything is: speed is measured by the scripts themselves (benchmarks/), on purpose
not by timed tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import run_benchmark

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

MACHINE = r"^machine: .+, \d+ cores .*Python \d+\.\d+\.\d+, batchhub \S+$"
NUMBER = r"[\d,]+(?:\.\d+)?"

#: script -> the lines its final block must hold
EXPECTED = {
    "overhead": [
        rf"^overhead: batchhub {NUMBER} rows/s, bare aiohttp {NUMBER} rows/s, ratio {NUMBER} end to end \(median of ",
        rf"^overhead in the loop: batchhub {NUMBER} rows/s, bare aiohttp {NUMBER} rows/s, ratio {NUMBER} ",
        rf"^overhead CPU: batchhub {NUMBER} ms, bare aiohttp {NUMBER} ms of CPU per 1,000 rows",
        # uvloop is in the test extra: both loops are measured
        rf"^overhead by event loop \(.*\): batchhub on uvloop {NUMBER} / {NUMBER} / {NUMBER}, on asyncio {NUMBER} ",
        rf"^overhead start-up: a 1-row job {NUMBER} s \({NUMBER} s of CPU\), `batchhub --version` {NUMBER} s ",
        r"^overhead target: ratio >= 0\.90 end to end: (met|NOT met)$",
    ],
    "memory": [
        rf"^memory: peak RSS {NUMBER} MB at {NUMBER} rows, {NUMBER} MB at {NUMBER} rows, ratio {NUMBER} \(median of ",
        rf"^memory {NUMBER} rows: (complete job|stopped by SIGINT)",
        r"^memory targets: .* under 300 MB: (met|NOT met); within 20% of .*: (met|NOT met)$",
    ],
    "resume": [
        rf"^resume: first request {NUMBER} s after process start, {NUMBER}-row job half done \(median of \d+;",
        r"^resume target: first request within 2 s: (met|NOT met)$",
    ],
    "checkpoint": [
        rf"^checkpoint: {NUMBER}% of the job's CPU time spent checkpointing \({NUMBER} s of {NUMBER} s; median of \d+;",
        rf"^checkpoint parts \(share of the job's CPU\): journal append {NUMBER}%, journal fsync {NUMBER}%, ",
        rf"^checkpoint on the event loop: blocked {NUMBER} ms of {NUMBER} s wall",
        r"^checkpoint target: under 3%: (met|NOT met)$",
    ],
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_smoke_mode_runs_and_prints_its_figures(script: str, tmp_path: Path) -> None:
    lines = run_benchmark(script, "--workdir", str(tmp_path), cwd=tmp_path, timeout=120)
    assert re.match(MACHINE, lines[0]), lines[0]
    for pattern in EXPECTED[script]:
        assert any(re.match(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n" + "\n".join(lines)
