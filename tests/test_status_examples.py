"""`status` says why rows failed: one or two example messages per error type, in text and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from batchhub.cli import main
from batchhub.status import job_status

CONTEXT_MESSAGE = (
    "HTTP 400: This model's maximum context length is 30 tokens. However, you requested 37 tokens "
    "(37 in the messages, 0 in the completion). Please reduce the length of the messages or completion."
)
OVERLOADED = "HTTP 503: The engine is currently overloaded, please try again later."


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def failing_job(tmp_path: Path) -> Path:
    """12 rows: rows 3, 7, 11 are over the context window (400); with seed 1 about a third meet a 503."""
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [("word " * (i % 4 * 10)) + f"q{i}" for i in range(12)]}).to_csv(data, index=False)
    spec = tmp_path / "job.toml"
    spec.write_text(
        f'input = "{data}"\nmodel = "gpt-4o-mini"\nbase_url = "mock://"\nconcurrency = 4\nmax_attempts = 1\n'
        '[mock]\nseed = 1\nmax_context_tokens = 30\nfaults = { "503" = 0.3 }\n'
    )
    result = invoke("run", str(spec), "-q")
    assert result.exit_code == 1, result.output
    return tmp_path / "job"


def failed_rows(job: Path, tmp_path: Path, error_type: str) -> list[int]:
    """The rows that ended with this error type, read from the export (which 503s hit depends on send order)."""
    out = tmp_path / "out.parquet"
    assert invoke("export", str(job), "-o", str(out)).exit_code == 0
    frame = pd.read_parquet(out)
    return sorted(frame.index[frame["error_type"] == error_type].tolist())


def test_status_shows_example_messages_per_error_type(tmp_path: Path) -> None:
    job = failing_job(tmp_path)
    busy = failed_rows(job, tmp_path, "server_error")
    result = invoke("status", str(job))
    assert result.exit_code == 0
    lines = result.output.splitlines()
    at = lines.index(f"errors   server_error {len(busy)}, invalid_request 3")
    assert lines[at + 1 : at + 5] == [
        f"         server_error, row {busy[0]}: {OVERLOADED}",
        f"         server_error, row {busy[1]}: {OVERLOADED}",
        f"         invalid_request, row 3: {CONTEXT_MESSAGE[:150]}...",
        f"         invalid_request, row 7: {CONTEXT_MESSAGE[:150]}...",
    ]
    assert lines[at + 5].startswith("finish ")


def test_status_json_has_the_examples_with_their_http_status(tmp_path: Path) -> None:
    job = failing_job(tmp_path)
    busy = failed_rows(job, tmp_path, "server_error")
    doc = json.loads(invoke("status", str(job), "--json").output)
    assert doc["error_examples"] == {
        "server_error": [
            {"row_id": busy[0], "http_status": 503, "message": OVERLOADED},
            {"row_id": busy[1], "http_status": 503, "message": OVERLOADED},
        ],
        "invalid_request": [
            {"row_id": 3, "http_status": 400, "message": CONTEXT_MESSAGE},
            {"row_id": 7, "http_status": 400, "message": CONTEXT_MESSAGE},
        ],
    }


def test_a_row_that_later_succeeded_is_no_example(tmp_path: Path) -> None:
    job = failing_job(tmp_path)
    spec = tmp_path / "job.toml"
    spec.write_text(spec.read_text().replace('faults = { "503" = 0.3 }', ""))
    result = invoke("run", str(spec), "-q", "--retry-failed")
    assert result.exit_code == 1, result.output
    st = job_status(job)
    assert st.errors_by_type == {"invalid_request": 3}
    assert [e["row_id"] for e in st.error_examples["invalid_request"]] == [3, 7]
    assert set(st.error_examples) == {"invalid_request"}
