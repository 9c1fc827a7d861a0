"""What `batchhub.run()` says about failed rows matches the rows it returns."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import batchhub
from batchhub.api import FailedRowsWarning


def test_failed_rows_warning_names_the_statuses_the_rows_have(tmp_path: Path) -> None:
    frame = pd.DataFrame({"prompt": [f"q {i}" for i in range(4)]})
    with pytest.warns(FailedRowsWarning) as caught:
        out = batchhub.run(frame, model="m", base_url="mock://", job_dir=str(tmp_path / "job"), json=True, quiet=True)
    assert set(out["status"]) == {"invalid_output"}  # the simulator answers prose unless JSON mode is asked for
    message = str(caught[0].message)
    assert "4 of 4 rows failed" in message
    assert "'invalid_output'" in message
