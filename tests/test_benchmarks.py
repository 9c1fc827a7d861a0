"""The benchmark scripts run (in their --smoke mode) and print their figures.

Only that they work and say what they measured is checked here, never how fast
anything is: speed is measured by the scripts themselves (benchmarks/), on purpose
not by timed tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

MACHINE = r"^machine: .+, \d+ cores .*Python \d+\.\d+\.\d+, batchhub \S+$"
NUMBER = r"[\d,]+(?:\.\d+)?"

#: script -> the lines its final block must hold
EXPECTED = {
    "overhead": [
        rf"^overhead: batchhub {NUMBER} rows/s, bare aiohttp {NUMBER} rows/s, ratio {NUMBER} end to end \(median of ",
        rf"^overhead in the loop: batchhub {NUMBER} rows/s, bare aiohttp {NUMBER} rows/s, ratio {NUMBER} ",
        rf"^overhead CPU: batchhub {NUMBER} ms, bare aiohttp {NUMBER} ms of CPU per 1,000 rows",
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


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("BATCHHUB_API_KEY", "OPENAI_API_KEY", "BATCHHUB_BASE_URL", "OPENAI_BASE_URL"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_smoke_mode_runs_and_prints_its_figures(script: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    block = proc.stdout.split(f"== {script} ==\n", 1)
    assert len(block) == 2, proc.stdout
    lines = block[1].splitlines()
    assert re.match(MACHINE, lines[0]), lines[0]
    for pattern in EXPECTED[script]:
        assert any(re.match(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n{block[1]}"
