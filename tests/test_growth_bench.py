"""The growth benchmark runs in its smoke mode, prints a figure per point and draws its plot.

Only that it runs and reports is checked, never the figures themselves.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[\d,]+(?:\.\d+)?"
POINT = rf": CPU {NUMBER} ms per 1,000 rows, {NUMBER} rows/s end to end \({NUMBER} in the loop\), peak RSS {NUMBER} MB$"


def test_growth_benchmark_smoke(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("BATCHHUB_API_KEY", "OPENAI_API_KEY", "BATCHHUB_BASE_URL", "OPENAI_BASE_URL"):
        env.pop(name, None)
    png = tmp_path / "growth.png"
    script = ROOT / "benchmarks" / "growth.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--workdir", str(tmp_path), "--plot", str(png)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,  # a bound against a hang, not a speed check
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    block = proc.stdout.split("== growth ==\n", 1)
    assert len(block) == 2, proc.stdout
    lines = block[1].splitlines()
    assert lines[0].startswith("machine: ") and " cores " in lines[0], lines[0]
    for what in (r"rows [\d,]+ rows", r"concurrency concurrency \d+", r"prompt [\d,]+-character prompts"):
        matching = [line for line in lines if re.match(rf"^growth {what}{POINT}", line)]
        assert len(matching) == 2, (what, block[1])
    assert any(re.match(rf"^growth rows fit: {NUMBER} s of CPU every job pays", line) for line in lines), block[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
