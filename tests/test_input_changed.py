"""An input that shrinks while its job runs: the run says so, keeps what it has, and can go on later."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from batchhub import Job, arun_job, prepare_job
from batchhub.cli import main
from batchhub.spec import JobSpec


def write_prompts(path: Path, n: int) -> Path:
    pd.DataFrame({"prompt": [f"Tell me fact number {i} about owls." for i in range(n)]}).to_csv(path, index=False)
    return path


async def test_an_input_truncated_mid_run_stops_with_the_reason(tmp_path: Path, mock_server) -> None:
    server = await mock_server(latency_ms=1)
    data = write_prompts(tmp_path / "in.csv", 30)
    spec = JobSpec(
        input=data, job_dir=tmp_path / "job", base_url=server.base_url, api_key="sk-test", model="m", quiet=True
    )
    prepared = prepare_job(spec)  # counts 30 rows
    write_prompts(data, 12)  # the file shrinks before the rows are read
    summary = await Job(prepared, progress=False).run()
    assert (summary.ok, summary.pending, summary.exit_code) == (12, 18, 3)
    assert summary.stopped == "input_changed"
    assert summary.message is not None
    assert summary.message.startswith(f"the input {data} changed while the job ran: expected 30 rows, read 12;")
    # what was answered is kept; the next run goes on with the input as it now is: its 12 rows are done
    status = CliRunner().invoke(main, ["status", str(tmp_path / "job"), "--json"])
    assert '"ok": 12' in status.output
    assert server.stats.completions == 12
    again = await arun_job(spec, progress=False)
    assert (again.total_rows, again.ok, again.exit_code, again.stopped) == (12, 12, 0, None)
    assert server.stats.completions == 12
