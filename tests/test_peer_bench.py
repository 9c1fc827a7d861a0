"""The peer benchmark runs in its smoke mode and prints batchhub's figures, with or without the peer.

Nothing is installed here: without the peer's virtual environment the smoke mode runs
batchhub alone and says why the peer was skipped. Only that it runs and reports is
checked, never the figures themselves.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobprocs import run_benchmark

# end-to-end runs of several seconds each: `pytest -m "not slow"` leaves them out
pytestmark = pytest.mark.slow

NUMBER = r"[\d,]+(?:\.\d+)?"
FIGURES = (
    rf"(?:{NUMBER}%|-) of {NUMBER} (rpm|tpm) steady \(.+\), 429s {NUMBER}% in the window / {NUMBER}% of the run "
    rf"\({NUMBER} of {NUMBER} requests\), {NUMBER} failed rows, {NUMBER} duplicates paid, wall {NUMBER} s"
)


def _run(tmp_path: Path, venv: Path) -> list[str]:
    return run_benchmark("peer", "--peer-venv", str(venv), "--workdir", str(tmp_path / "work"), cwd=tmp_path)


def test_smoke_without_the_peer_runs_batchhub_alone_and_installs_nothing(tmp_path: Path) -> None:
    venv = tmp_path / "no-peer-venv"
    lines = _run(tmp_path, venv)
    assert not venv.exists()
    assert any(re.match(r"^peer: skipped: no finished install of bespokelabs-curator in ", line) for line in lines)
    for case in ("rpm-right", "tpm-2x"):
        assert any(re.match(rf"^peer {case} batchhub: {FIGURES}", line) for line in lines), (case, lines)
        assert any(re.match(rf"^peer {case} curator: skipped \(", line) for line in lines), (case, lines)
    assert "| case | client | steady throughput | 429s (window / run) | failed rows | duplicates paid | wall |" in lines
