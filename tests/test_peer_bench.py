"""The peer benchmark runs in its smoke mode and prints batchhub's figures, with or without the peer.

Nothing is installed here: without the peer's virtual environment the smoke mode runs
batchhub alone and says why the peer was skipped. Only that it runs and reports is
checked, never the figures themselves.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "peer.py"
NUMBER = r"[\d,]+(?:\.\d+)?"
FIGURES = (
    rf"(?:{NUMBER}%|-) of {NUMBER} (rpm|tpm) steady \(.+\), 429s {NUMBER}% in the window / {NUMBER}% of the run "
    rf"\({NUMBER} of {NUMBER} requests\), {NUMBER} failed rows, {NUMBER} duplicates paid, wall {NUMBER} s"
)


def _run(tmp_path: Path, venv: Path) -> list[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for name in ("BATCHHUB_API_KEY", "OPENAI_API_KEY", "BATCHHUB_BASE_URL", "OPENAI_BASE_URL"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--peer-venv", str(venv), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,  # a bound against a hang, not a speed check
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    block = proc.stdout.split("== peer ==\n", 1)
    assert len(block) == 2, proc.stdout
    lines = block[1].splitlines()
    assert lines[0].startswith("machine: ") and " cores " in lines[0], lines[0]
    return lines


def test_smoke_without_the_peer_runs_batchhub_alone_and_installs_nothing(tmp_path: Path) -> None:
    venv = tmp_path / "no-peer-venv"
    lines = _run(tmp_path, venv)
    assert not venv.exists()
    assert any(re.match(r"^peer: skipped: no finished install of bespokelabs-curator in ", line) for line in lines)
    for case in ("rpm-right", "tpm-2x"):
        assert any(re.match(rf"^peer {case} batchhub: {FIGURES}", line) for line in lines), (case, lines)
        assert any(re.match(rf"^peer {case} curator: skipped \(", line) for line in lines), (case, lines)
    assert "| case | client | steady throughput | 429s (window / run) | failed rows | duplicates paid | wall |" in lines
