"""The notebook API: batchhub.run / batchhub.arun on DataFrames and files, against the simulator."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import importlib.util
import inspect
import re
import signal
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

import batchhub
from batchhub import AuthenticationError, FailedRowsWarning, InputError, JobStopped, export_job
from batchhub.mock import MockConfig, MockServer
from batchhub.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "Classify the sentiment of this review: {review}"
WORDS = {"positive": "Love it, great value.", "negative": "Arrived broken, want a refund.", "neutral": "It is a mug."}


def reviews(n: int, *, shift: int = 0) -> pd.DataFrame:
    """n reviews cycling through the three sentiments, each its own text (rows asking the same are sent once),
    under a shuffled string index."""
    labels = [list(WORDS)[(i + shift) % 3] for i in range(n)]
    index = [f"r{(i * 7919) % 1000:03d}" for i in range(n)]
    texts = [f"{WORDS[label]} (review {i})" for i, label in enumerate(labels)]
    return pd.DataFrame({"n": range(n), "review": texts, "expected": labels}, index=index)


def opts(server, job_dir: Path, **kw) -> dict:
    base = {
        "model": "gpt-4o-mini",
        "template": TEMPLATE,
        "base_url": server.base_url,
        "api_key": "sk-test",
        "job_dir": job_dir,
        "concurrency": 8,
        "backoff_base": 0.01,
        "flush_rows": 17,
    }
    return base | kw


def test_dataframe_in_dataframe_out_in_input_order_with_its_index(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=2, latency_ms=3)
    df = reviews(150)
    out = batchhub.run(df, **opts(server, tmp_path / "job"))
    assert out.index.equals(df.index)
    assert out["n"].tolist() == list(range(150))
    assert out["row_id"].tolist() == list(range(150))
    assert out["content"].tolist() == df["expected"].tolist()  # each answer on its own row
    assert set(out["status"]) == {"ok"}
    assert str(out["prompt_tokens"].dtype) == "Int64"
    assert list(out.columns[:3]) == ["n", "review", "expected"]
    summary = out.attrs["batchhub"]
    assert (summary["ok"], summary["failed"], summary["http_requests"]) == (150, 0, 150)
    assert summary["job_dir"] == str(tmp_path / "job")
    # the job directory is an ordinary job: the CLI's export gives the same rows
    export_job(tmp_path / "job", tmp_path / "out.parquet")
    assert pd.read_parquet(tmp_path / "out.parquet")["content"].tolist() == out["content"].tolist()
    assert len(list((tmp_path / "job" / "results").glob("part-*.parquet"))) >= 2


def test_the_same_call_again_resumes_and_sends_nothing(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=4)
    df = reviews(40)
    first = batchhub.run(df, **opts(server, tmp_path / "job"))
    assert server.stats.completions == 40
    second = batchhub.run(df.copy(), **opts(server, tmp_path / "job", concurrency=2))  # limits may change
    assert server.stats.requests == 40
    assert second.attrs["batchhub"]["http_requests"] == 0
    assert second.attrs["batchhub"]["mismatched_results"] == 0  # every result checked against its row's request
    pd.testing.assert_frame_equal(first, second, check_like=False)


def test_a_changed_dataframe_in_the_same_job_sends_only_its_new_requests(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=5)
    job = tmp_path / "job"
    df = reviews(20)
    first = batchhub.run(df, **opts(server, job))
    changed = df.copy()
    changed.loc[changed.index[3], "review"] = "Something else entirely."
    longer = pd.concat([reviews(25).iloc[20:], changed])  # new rows first: every old row moves
    out = batchhub.run(longer, **opts(server, job))
    assert server.stats.completions == 26  # the edited row and the five new ones
    assert out["review"].tolist() == longer["review"].tolist()
    assert set(out["status"]) == {"ok"}
    # each row has its own answer: the unchanged rows the answers they had
    kept = out.iloc[5:].drop(index=changed.index[3])
    assert kept["content"].tolist() == first.drop(index=changed.index[3])["content"].tolist()
    assert out.attrs["batchhub"]["reused"] == {"job": 19}


def test_default_job_dir_follows_the_data_and_the_request_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    df = reviews(6)
    kw = {"model": "gpt-4o-mini", "template": TEMPLATE, "mock": True}
    first = batchhub.run(df, **kw)
    job_dir = first.attrs["batchhub"]["job_dir"]
    assert re.fullmatch(r"jobs/dataframe-[0-9a-f]{12}", job_dir)
    assert (tmp_path / job_dir / "input.parquet").exists()
    again = batchhub.run(df, **kw, concurrency=3)
    assert again.attrs["batchhub"]["job_dir"] == job_dir and again.attrs["batchhub"]["http_requests"] == 0
    other = batchhub.run(df, **(kw | {"template": "Sentiment? {review}"}))
    assert other.attrs["batchhub"]["job_dir"] != job_dir
    named = batchhub.run(df, **kw, name="my-reviews")
    assert named.attrs["batchhub"]["job_dir"] == "jobs/my-reviews"


def test_a_file_or_a_spec_as_input(tmp_path: Path, threaded_mock, monkeypatch: pytest.MonkeyPatch) -> None:
    server = threaded_mock(seed=6)
    monkeypatch.chdir(tmp_path)
    df = reviews(12)
    df.to_csv(tmp_path / "reviews.csv", index=False)
    kw = opts(server, tmp_path / "unused")
    del kw["job_dir"]
    out = batchhub.run("reviews.csv", **kw)
    assert out.attrs["batchhub"]["job_dir"] == "jobs/reviews"  # as `batchhub run reviews.csv`
    assert out["content"].tolist() == df["expected"].tolist()
    assert out["n"].astype(str).tolist() == [str(i) for i in range(12)]
    spec = tmp_path / "reviews.toml"
    spec.write_text(f'input = "reviews.csv"\nmodel = "gpt-4o-mini"\ntemplate = "{TEMPLATE}"\n')
    from_spec = batchhub.run("reviews.toml", base_url=server.base_url, api_key="sk-test", max_tokens=4)
    assert from_spec.attrs["batchhub"]["job_dir"] == "reviews"  # beside the spec, as for the CLI
    assert set(from_spec["status"]) == {"ok"}


async def test_arun_inside_a_running_loop(tmp_path: Path) -> None:
    async with MockServer(MockConfig(seed=7, latency_ms=2)) as server:
        df = reviews(30)
        out = await batchhub.arun(df, **opts(server, tmp_path / "job"))
        assert out["content"].tolist() == df["expected"].tolist()
        again = await batchhub.arun(df, **opts(server, tmp_path / "job"))
        assert again.attrs["batchhub"]["http_requests"] == 0
        assert server.stats.completions == 30


async def test_run_inside_a_running_loop_as_in_a_jupyter_cell(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=8)
    asyncio.get_running_loop()  # this test's loop runs, as a notebook's does
    out = batchhub.run(reviews(10), **opts(server, tmp_path / "job"))
    assert set(out["status"]) == {"ok"}
    out = batchhub.run(reviews(10), model="gpt-4o-mini", template=TEMPLATE, mock=True, job_dir=tmp_path / "m")
    assert len(out) == 10


def test_a_wrong_key_raises_and_the_job_resumes_with_the_right_one(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=9, api_key="sk-right-key-123456")
    df = reviews(30)
    with pytest.raises(AuthenticationError) as caught:
        batchhub.run(df, **opts(server, tmp_path / "job", api_key="sk-wrong-key-654321"))
    assert caught.value.status == 401
    assert "sk-wrong-key-654321" not in str(caught.value)
    out = batchhub.run(df, **opts(server, tmp_path / "job", api_key="sk-right-key-123456"))
    assert set(out["status"]) == {"ok"}


def test_failed_rows_come_back_with_a_warning(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=10)
    df = reviews(9).assign(temp=["0.5", "0.5", "3"] * 3)  # temperature 3 is out of range: that row fails
    with pytest.warns(FailedRowsWarning, match="3 of 9 rows failed") as caught:
        out = batchhub.run(df, **opts(server, tmp_path / "job", param_column={"temperature": "temp"}))
    assert caught[0].filename == __file__  # points at the caller's line
    assert out["status"].tolist() == ["ok", "ok", "error"] * 3
    assert out.loc[out["status"] == "error", "error_type"].unique().tolist() == ["invalid_row"]
    assert server.stats.requests == 6


async def test_arun_warns_of_failed_rows_at_the_callers_line(tmp_path: Path) -> None:
    df = reviews(4).assign(temp=["0.5", "3", "0.5", "0.5"])
    with pytest.warns(FailedRowsWarning, match="1 of 4 rows failed") as caught:
        out = await batchhub.arun(
            df, model="m", template=TEMPLATE, mock=True, job_dir=tmp_path / "job", param_column={"temperature": "temp"}
        )
    assert caught[0].filename == __file__
    assert out["status"].tolist() == ["ok", "error", "ok", "ok"]


def test_a_reached_budget_raises_job_stopped(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=11)
    with pytest.raises(JobStopped, match="budget") as caught:
        batchhub.run(reviews(10), **opts(server, tmp_path / "job", max_cost=3e-5, max_tokens=8))  # about 2 of 10
    assert caught.value.reason == "budget"


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    df = reviews(3)
    with pytest.raises(TypeError, match=r"'modle' \(did you mean 'model'\?\); known: .*max_tokens"):
        batchhub.run(df, modle="gpt-4o-mini", template=TEMPLATE, mock=True)
    with pytest.raises(TypeError, match="first argument"):
        batchhub.run(df, input="x.csv", model="m", mock=True)
    with pytest.raises(TypeError, match="DataFrame or the path"):
        batchhub.run([1, 2, 3], model="m", mock=True)
    with pytest.raises(InputError, match=r"\{title\}"):
        batchhub.run(df, model="m", template="Summarize {title}", mock=True)
    with pytest.raises(InputError, match="no rows"):
        batchhub.run(df.iloc[:0], model="m", template=TEMPLATE, mock=True)
    assert not (tmp_path / "jobs").exists()


def test_every_job_setting_is_a_keyword() -> None:
    fields = {f.name for f in dataclasses.fields(JobSpec)} - {"input"}
    for function in (batchhub.run, batchhub.arun):
        params = inspect.signature(function).parameters
        assert fields <= set(params), fields - set(params)
        assert next(iter(params)) == "data"
    assert {"run", "arun", "FailedRowsWarning"} <= set(batchhub.__all__)


def test_ctrl_c_stops_the_job_gracefully_and_it_resumes(tmp_path: Path, threaded_mock) -> None:
    server = threaded_mock(seed=12, latency_ms=30)
    df = reviews(60)
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def interrupt() -> None:
        server.call(server.server.wait_until(lambda s: s.completions >= 4))
        signal.pthread_kill(main, signal.SIGINT)  # what interrupting a Jupyter kernel does

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt) as caught:
        batchhub.run(df, **opts(server, tmp_path / "job", concurrency=2))
    assert "run the same call again to resume" in "".join(caught.value.__notes__)
    status = batchhub.job_status(tmp_path / "job")
    assert status.ok >= 4 and status.pending > 0
    assert status.ok == server.stats.completions  # requests in flight finished and were recorded
    out = batchhub.run(df, **opts(server, tmp_path / "job"))
    assert out["content"].tolist() == df["expected"].tolist()
    assert server.stats.requests == server.stats.completions == 60  # every row paid for once


async def test_cancelling_arun_stops_the_job_gracefully(tmp_path: Path) -> None:
    async with MockServer(MockConfig(seed=13, latency_ms=30)) as server:
        df = reviews(60)
        task = asyncio.create_task(batchhub.arun(df, **opts(server, tmp_path / "job", concurrency=2)))
        await server.wait_until(lambda s: s.completions >= 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        status = batchhub.job_status(tmp_path / "job")
        assert status.pending > 0 and status.ok == server.stats.completions
        out = await batchhub.arun(df, **opts(server, tmp_path / "job"))
        assert set(out["status"]) == {"ok"}
        assert server.stats.completions == 60


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end >= 0 else None]


async def test_the_readme_notebook_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a notebook cell: a running event loop, and top-level await allowed
    monkeypatch.chdir(tmp_path)
    section = readme_section("## In a notebook")
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        code = compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)
        if inspect.iscoroutine(result):
            await result
    first = namespace["reviews"]
    assert first["sentiment"].tolist() == ["positive", "negative", "neutral"]
    assert namespace["out"].attrs["batchhub"]["http_requests"] == 0
    assert namespace["out"].index.tolist() == ["r-101", "r-102", "r-103"]


def test_a_progress_bar_in_a_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import types

    from batchhub.progress import Progress

    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})  # what get_ipython() returns in Jupyter

    real = importlib.util.find_spec
    output = io.StringIO()  # not a terminal
    assert not Progress(total=3, file=output).enabled
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    bar = Progress(total=3, file=output)
    assert bar.enabled
    bar.stats.results, bar.stats.ok = 1, 1  # one ok result, as the job loop counts it
    bar.update()
    bar.close()
    assert "1/3" in output.getvalue()  # the text bar: no ipywidgets here


async def test_expand_json_adds_the_reply_keys_as_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({"row_id": [7, 8], "review": ["love it", "hate it"]}, index=["a", "b"])
    out = await batchhub.arun(
        frame,
        mock=True,
        model="gpt-4o-mini",
        template="Give the sentiment of: {review}",
        params={"response_format": {"type": "json_object"}},
        json=True,
        expand_json=True,
        job_dir=tmp_path / "job",
        quiet=True,
    )
    assert list(out.index) == ["a", "b"] and out["input_row_id"].tolist() == [7, 8]
    assert out["row_id"].tolist() == [0, 1] and set(out["status"]) == {"ok"}
    assert out["sentiment"].tolist() == ["positive", "negative"]
    assert out["confidence"].between(0, 1).all()
