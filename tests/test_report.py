"""`batchhub report`: a self-contained HTML page built from real job directories run on the simulator."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchhub import arun_job, job_status
from batchhub.cli import main
from batchhub.cost import report as cost_report
from batchhub.cost import usage_table
from batchhub.errors import JobStateError, UsageError
from batchhub.mock import MockServer
from batchhub.pricing import PriceBook
from batchhub.report import job_report, write_report
from batchhub.report_html import render_html
from batchhub.result_schema import RESULT_SCHEMA
from batchhub.spec import JobSpec
from batchhub.store import JobStore

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("throughput", "latency", "tokens", "cost", "errors")
SCRIPT = "<script>alert(1)</script>"
ODD_MODEL = "<b>local</b>-model"  # no price is known for it, and its name needs escaping


def spec_for(tmp_path: Path, server: MockServer, data: Path, **kw) -> JobSpec:
    kw.setdefault("model", "gpt-4o-mini")
    return JobSpec(
        input=data,
        job_dir=tmp_path / "job",
        base_url=server.base_url,
        api_key="sk-test",
        quiet=True,
        concurrency=8,
        backoff_base=0.01,
        **kw,
    )


def prompts(path: Path, n: int) -> Path:
    pd.DataFrame({"prompt": [f"Tell me fact number {i} about owls." for i in range(n)]}).to_csv(path, index=False)
    return path


def images(page: str) -> list[ET.Element]:
    """Every embedded chart, decoded and parsed as SVG."""
    found = re.findall(r'<img alt="[^"]*" src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)">', page)
    roots = [ET.fromstring(base64.b64decode(data, validate=True)) for data in found]
    assert all(root.tag == "{http://www.w3.org/2000/svg}svg" for root in roots)
    return roots


def svg_text(root: ET.Element) -> str:
    return " ".join(t for el in root.iter() if el.tag.endswith("text") for t in el.itertext())


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page


async def test_report_of_a_job_with_retries_429s_failures_and_an_unpriced_model(tmp_path: Path, mock_server) -> None:
    server = await mock_server(
        seed=4, latency_ms=3, max_context_tokens=400, faults={"503": 0.08, "429": 0.08}, fault_retry_after_ms=5
    )
    n = 60
    models = ["gpt-4o-mini", "gpt-4o", ODD_MODEL]
    messages = [[{"role": "user", "content": f"Fact {i} about owls, please."}] for i in range(n)]
    messages[3] = [{"role": "user", "content": [{"type": SCRIPT, "text": "hi"}]}]  # the simulator's 400 quotes it
    messages[7] = [{"role": "user", "content": "owl " * 600}]  # past the context window: a 400
    data = tmp_path / "in.jsonl"
    pd.DataFrame({"messages": [json.dumps(m) for m in messages], "m": [models[i % 3] for i in range(n)]}).to_json(
        data, orient="records", lines=True
    )
    spec = spec_for(tmp_path, server, data, messages_column="messages", param_columns={"model": "m"}, max_tokens=20)
    summary = await arun_job(spec, progress=False)
    assert (summary.ok, summary.failed) == (58, 2)

    out = tmp_path / "report.html"
    rep = write_report(tmp_path / "job", out)
    page = out.read_text()
    assert_self_contained(page)
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page
    charts = images(page)
    assert len(charts) == 5

    # the header agrees with `status` and with `cost`
    st = job_status(tmp_path / "job")
    assert (rep.ok, rep.failed, rep.pending, rep.total_rows) == (st.ok, st.failed, st.pending, st.total_rows)
    assert (rep.prompt_tokens, rep.completion_tokens) == (st.prompt_tokens, st.completion_tokens)
    bill = cost_report(usage_table(tmp_path / "job"), PriceBook.build())
    assert rep.bill is not None and rep.bill.total_usd == pytest.approx(bill.total_usd)
    assert rep.bill.unknown_models == bill.unknown_models == [ODD_MODEL]
    assert [(m.model, m.requests) for m in rep.bill.models] == [(m.model, m.requests) for m in bill.models]
    assert f"${bill.total_usd:,.4f} + unknown for {ODD_MODEL}" in rep.cost_text
    assert '<div class="k">ok</div><div class="v"><span class="ok">58</span>' in page
    assert '<div class="k">failed</div><div class="v"><span class="bad">2</span>' in page

    # 429s: what the parts recorded is what the chart and the header show
    parts = pq.read_table(tmp_path / "job" / "results")
    retries_429 = int(pa.compute.sum(parts["rate_limit_retries"]).as_py())
    assert retries_429 > 0 and rep.rate_limited == retries_429
    assert rep.timeline is not None and rep.timeline.rate_limited.sum() == retries_429
    assert rep.timeline.ok.sum() + rep.timeline.failed.sum() == parts.num_rows
    assert f"{retries_429:,} 429 responses in all" in page
    assert len(rep.latency) == 58 and "p99" in page

    # every text from the results is escaped, in the page and in the charts
    assert rep.errors_by_type == {"invalid_request": 2}
    assert "&#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27;" in page
    assert "context" in " ".join(rep.error_examples["invalid_request"])
    assert html_cell(ODD_MODEL) in page and ODD_MODEL not in page
    assert any(ODD_MODEL in svg_text(c) for c in charts)
    assert any("invalid_request" in svg_text(c) for c in charts)
    assert not list(tmp_path.glob(".report.html.tmp-*"))


def html_cell(text: str) -> str:
    return f"<td>{text.replace('<', '&lt;').replace('>', '&gt;')}</td>"


async def test_a_job_of_only_errors(tmp_path: Path, mock_server) -> None:
    server = await mock_server(faults={"503": 1.0})
    spec = spec_for(tmp_path, server, prompts(tmp_path / "in.csv", 12), max_attempts=1)
    assert (await arun_job(spec, progress=False)).failed == 12
    rep = write_report(tmp_path / "job", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert_self_contained(page)
    assert (rep.ok, rep.failed, rep.errors_by_type) == (0, 12, {"server_error": 12})
    assert rep.cost_text == "$0 (no usage recorded)"
    assert "No successful request yet" in page and "No row has a successful result" in page
    assert "nothing was paid for" in page
    assert len(images(page)) == 2  # throughput and errors
    assert rep.state == "finished with failed rows"


async def test_a_job_with_no_results_still_gives_a_page(tmp_path: Path, mock_server) -> None:
    server = await mock_server(api_key="sk-other")  # 401: the job stops before any result
    spec = spec_for(tmp_path, server, prompts(tmp_path / "in.csv", 5))
    assert (await arun_job(spec, progress=False)).exit_code == 3
    rep = write_report(tmp_path / "job", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert_self_contained(page)
    assert (rep.total_rows, rep.ok, rep.failed, rep.pending, rep.results_recorded) == (5, 0, 0, 5, 0)
    assert "No results recorded yet: nothing to chart" in page
    assert images(page) == []
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page


def test_not_a_job_directory(tmp_path: Path) -> None:
    with pytest.raises(JobStateError, match="not a batchhub job directory"):
        write_report(tmp_path, tmp_path / "r.html")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a batchhub job directory" in result.output
    assert not (tmp_path / "report.html").exists()


def test_output_must_be_a_file_in_an_existing_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        write_report(tmp_path, tmp_path / "nowhere" / "r.html")
    with pytest.raises(UsageError, match="is a directory"):
        write_report(tmp_path, tmp_path)


def synthetic_job(job_dir: Path, n: int) -> None:
    """A job of `n` results written straight to one part (as a run of millions would leave it),
    in two runs a day apart, with a status and a column this version does not know."""
    rng = np.random.default_rng(0)
    day0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    half = n // 2
    finished = np.concatenate(
        [day0 + np.sort(rng.uniform(0, 600, half)), day0 + 86400 + np.sort(rng.uniform(0, 600, n - half))]
    )
    status = np.where(rng.random(n) < 0.98, "ok", "error").astype(object)
    status[:10] = "invalid_output"
    ok = status == "ok"
    prompt = rng.integers(20, 400, n)
    completion = rng.integers(1, 200, n)
    columns = {
        "row_id": pa.array(np.arange(n)),
        "status": pa.array(status, pa.string()),
        "model": pa.array(np.where(np.arange(n) % 4 == 0, "gpt-4o", "gpt-4o-mini").astype(object), pa.string()),
        "prompt_tokens": pa.array(prompt, mask=~ok),
        "completion_tokens": pa.array(completion, mask=~ok),
        "latency_s": pa.array(rng.lognormal(-0.5, 0.6, n), mask=~ok),
        "rate_limit_retries": pa.array(rng.poisson(0.05, n).astype(np.int32)),
        "attempts": pa.array(np.ones(n, dtype=np.int32)),
        "error_type": pa.array(np.where(status == "error", "server_error", None), pa.string()),
        "error_message": pa.array(np.where(status == "error", "HTTP 503 <overloaded>", None), pa.string()),
        "finished_at": pa.array((finished * 1e6).astype(np.int64)).cast(pa.timestamp("us", tz="UTC")),
        "seq": pa.array(np.arange(1, n + 1)),
        "custom_id": pa.array([None] * n, pa.string()),
    }
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in RESULT_SCHEMA]
    table = pa.Table.from_arrays([*arrays, columns["custom_id"]], names=[*RESULT_SCHEMA.names, "custom_id"])
    (job_dir / "results").mkdir(parents=True)
    pq.write_table(table, job_dir / "results" / "part-000001.parquet")
    run = {"batchhub_version": "0.1.0", "elapsed_s": 600.0}
    JobStore(job_dir).write_manifest(
        {
            "format_version": 1,
            "input": {"path": "big.csv", "rows": n + 5},
            "spec": {"name": "big", "model": "gpt-4o-mini"},
            "runs": [
                {**run, "started_at": "2026-01-01T00:00:00Z", "ended_at": "2026-01-01T00:10:00Z"},
                {**run, "started_at": "2026-01-02T00:00:00Z", "ended_at": "2026-01-02T00:10:00Z"},
            ],
        }
    )


def test_a_large_job_resumed_a_day_later(tmp_path: Path) -> None:
    n = 300_000
    synthetic_job(tmp_path / "big", n)
    rep = job_report(tmp_path / "big")
    part = pq.read_table(tmp_path / "big" / "results").to_pandas()
    ok = int((part["status"] == "ok").sum())
    assert (rep.ok, rep.failed, rep.pending) == (ok, n - ok, 5)
    assert rep.errors_by_type["invalid_output"] == 10  # a status without an error type is named by its status
    assert rep.error_examples["server_error"] == ["HTTP 503 <overloaded>"]
    assert len(rep.latency) == ok and len(rep.row_prompt_tokens) == ok
    bill = cost_report(usage_table(tmp_path / "big"), PriceBook.build())
    assert rep.bill is not None and rep.bill.total_usd == pytest.approx(bill.total_usd)
    # the day between the runs is left out: 20 minutes of running time in buckets of 30 s, not hours
    t = rep.timeline
    assert t is not None
    assert 1195 < t.span_s < 1205 and t.bucket_s == 30 and len(t.run_starts) == 1
    assert t.ok.sum() + t.failed.sum() == n
    page = render_html(rep)
    assert_self_contained(page)
    charts = images(page)
    assert len(charts) == 5
    assert "idle time between runs left out" in svg_text(charts[0])
    assert "HTTP 503 &lt;overloaded&gt;" in page


def test_readme_example(tmp_path: Path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Report\n", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip().split()[1:] for line in section.splitlines() if line.startswith("    batchhub ")]
    assert [c[0] for c in commands] == ["run", "report"]
    (tmp_path / "jobs").mkdir()
    shutil.copy(ROOT / "jobs" / "demo.toml", tmp_path / "jobs" / "demo.toml")
    shutil.copytree(ROOT / "sample_data", tmp_path / "sample_data")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(main, [*commands[0], "--quiet"], catch_exceptions=False).exit_code == 0
    result = runner.invoke(main, commands[1], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "wrote report.html: 200 ok, 0 failed, 0 pending of 200 rows; cost $" in result.output
    page = (tmp_path / "report.html").read_text()
    assert_self_contained(page)
    assert len(images(page)) == 4 and "No failed rows." in page
    # the spec names the job too, and without -o the page goes into the job directory
    assert runner.invoke(main, ["report", "jobs/demo.toml"]).exit_code == 0
    assert (tmp_path / "jobs" / "demo" / "report.html").read_text().count("<section") == 5


def test_matplotlib_is_not_loaded_by_the_package_or_the_cli() -> None:
    code = "import sys, batchhub, batchhub.cli, batchhub.report_html; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
