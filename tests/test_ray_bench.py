"""The shared-limit benchmark runs in its smoke mode and prints its figures (its own local Ray instance).

Only that it runs and says what it measured, and that the simulator sent no 429: the
figures themselves are the benchmark's to report, in docs/SCALING.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from jobprocs import REPO, child_env

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(?:\.\d+)?"


def test_ray_limit_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ray_limit.py"), "--smoke", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        timeout=240,  # a bound against a hang, not a speed check
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    block = proc.stdout.split("== ray_limit ==\n", 1)[1].splitlines()
    assert block[0].startswith("machine: ")
    limit = re.match(rf"^ray_limit: 4 tasks told 1,140 RPM .*: {NUMBER} requests/min .* (\d+) 429s in", block[1])
    assert limit is not None, block[1]
    assert limit.group(1) == "0"
    assert re.match(rf"^ray_limit actor: {NUMBER} reservations/s from 4 tasks", block[2]), block[2]
