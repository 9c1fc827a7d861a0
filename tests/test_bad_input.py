"""The bad input catalog, through the command line, on the built-in simulator.

Two kinds of bad input, as the README's failure policy sorts them:

- a mistake about the whole job (an unusable file, a missing column, an option out
  of range): one line `error: ...`, exit 2, and nothing written, neither in a new
  job directory nor in an existing one (every file of a finished job keeps its
  exact bytes, and its export stays the same);
- a bad row (null or empty prompt, a prompt over the context window, a per-row
  value out of range): that row fails with its own `error_type`, the others are
  answered, exit 1.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from batchhub.cli import main
from batchhub.io import open_input
from batchhub.requests import RequestBuilder
from batchhub.spec import JobSpec
from batchhub.store import JobStore

PROMPTS = [f"Tell me one fact about owls, number {i}." for i in range(6)]


def invoke(*args: str | Path) -> Result:
    # exceptions are caught so that a crash shows as a failed assertion on its output, not a test error
    return CliRunner().invoke(main, [str(a) for a in args])


def run(data: Path, job: Path, *extra: str | Path) -> Result:
    return invoke("run", data, "--mock", "--model", "m", "--job-dir", job, "-q", *extra)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root: relative path -> sha256 of its bytes ("dir" for a folder)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def usage_error_problems(result: Result, fragments: tuple[str, ...]) -> list[str]:
    """What is wrong with `result` as an exit-2 usage error (empty list: nothing)."""
    problems = []
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"crashed with {type(result.exception).__name__}: {result.exception}")
    if result.exit_code != 2:
        problems.append(f"exit code {result.exit_code}, not 2")
    lines = [line for line in result.output.splitlines() if line.strip()]
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"output is not one line starting with 'error: ': {result.output!r}")
    problems += [f"{fragment!r} not in {result.output!r}" for fragment in fragments if fragment not in result.output]
    return problems


def assert_usage_error(result: Result, *fragments: str) -> None:
    problems = usage_error_problems(result, fragments)
    assert not problems, "; ".join(problems)


def write_prompts(path: Path, prompts: list[str] = PROMPTS) -> Path:
    pd.DataFrame({"prompt": prompts, "topic": ["owls"] * len(prompts)}).to_csv(path, index=False)
    return path


def export(job: Path, out: Path) -> pd.DataFrame:
    result = invoke("export", job, "-o", out)
    assert result.exit_code == 0, result.output
    return pd.read_parquet(out)


# -- the catalog of whole-job mistakes --------------------------------------------------


@dataclass
class Case:
    """A bad invocation: an input file (None: the good one) and extra options, or a spec file."""

    content: bytes | None = None
    name: str = "bad.csv"
    extra: tuple[str, ...] = ()
    #: text of a TOML spec (formatted with input= and job_dir=) used instead of an input file
    spec: str | None = None
    fragments: tuple[str, ...] = field(default_factory=tuple)

    def invoke(self, folder: Path, good: Path, job: Path) -> Result:
        data = good
        if self.content is not None:
            data = folder / self.name
            data.write_bytes(self.content)
        if self.spec is not None:
            spec = folder / "bad-spec.toml"
            spec.write_text(self.spec.format(input=json.dumps(str(data)), job_dir=json.dumps(str(job))))
            return invoke("run", spec, "-q")
        return run(data, job, *self.extra)


def parquet_bytes(table: pa.Table, tmp: Path) -> bytes:
    pq.write_table(table, tmp)
    return tmp.read_bytes()


CASES: dict[str, Case] = {
    "empty file": Case(b"", fragments=("bad.csv", "empty")),
    "header only": Case(b"prompt,topic\n", fragments=("bad.csv", "no rows")),
    "missing prompt column": Case(b"text,topic\nhello,owls\n", fragments=("'prompt'",)),
    "template field not in the data": Case(extra=("--template", "About {topic}: {nope}"), fragments=("{nope}",)),
    "template with an unmatched brace": Case(extra=("--template", "Say {prompt"), fragments=("template",)),
    "positional template field": Case(extra=("--template", "Say {}"), fragments=("template",)),
    "template width too large": Case(extra=("--template", "{prompt:>9223372036854775807}"), fragments=("10,000",)),
    "template unknown conversion": Case(extra=("--template", "{prompt!x}"), fragments=("!x",)),
    "template nested field in a format spec": Case(extra=("--template", "{prompt:{topic}}"), fragments=("nested",)),
    "template with JSON braces": Case(
        extra=("--template", 'As {"label": "x"}: {prompt}'), fragments=("use {{ and }} for literal braces",)
    ),
    "template field typo": Case(extra=("--template", "About {topc}"), fragments=("did you mean {topic}?",)),
    "non-UTF-8 bytes in a cell": Case(b"prompt,topic\nhello \xff\xfe world,owls\nfine,owls\n", fragments=("bad.csv",)),
    "non-UTF-8 bytes in the header": Case(b"pr\xe9mpt,topic\nhello,owls\n", fragments=("bad.csv",)),
    "duplicate column names": Case(b"prompt,topic,prompt\na,b,c\n", fragments=("bad.csv", "duplicate")),
    "a CSV named .parquet": Case(b"prompt,topic\nhello,owls\n", name="bad.parquet", fragments=("bad.parquet",)),
    "a spec file with an unknown key": Case(
        spec='input = {input}\njob_dir = {job_dir}\nmodel = "m"\nbase_url = "mock://"\nmax_tokenz = 5\n',
        fragments=("max_tokenz",),
    ),
    "a spec file with an unknown [mock] key": Case(
        spec='input = {input}\njob_dir = {job_dir}\nmodel = "m"\nbase_url = "mock://"\n[mock]\nlatency = 5\n',
        fragments=("latency",),
    ),
    "--temperature -1": Case(extra=("--temperature", "-1"), fragments=("temperature",)),
    "--temperature 2.5": Case(extra=("--temperature", "2.5"), fragments=("temperature",)),
    "--max-tokens 0": Case(extra=("--max-tokens", "0"), fragments=("max_tokens",)),
    "--max-tokens -3": Case(extra=("--max-tokens", "-3"), fragments=("max_tokens",)),
    "--concurrency 0": Case(extra=("--concurrency", "0"), fragments=("concurrency",)),
    "--concurrency 10000000": Case(extra=("--concurrency", "10000000"), fragments=("concurrency", "1,000")),
    "--concurrency fast": Case(extra=("--concurrency", "fast"), fragments=("concurrency", '"auto"', "'fast'")),
    "a spec file with concurrency = 2.5": Case(
        spec='input = {input}\njob_dir = {job_dir}\nmodel = "m"\nbase_url = "mock://"\nconcurrency = 2.5\n',
        fragments=("concurrency", '"auto"', "2.5"),
    ),
    "--rpm -1": Case(extra=("--rpm", "-1"), fragments=("rpm",)),
    "--tpm 0": Case(extra=("--tpm", "0"), fragments=("tpm",)),
    "--rps 0": Case(extra=("--rps", "0"), fragments=("rps",)),
    "--rpm 10**400": Case(extra=("--rpm", str(10**400)), fragments=("rpm must be",)),
    "--tpm 10**400": Case(extra=("--tpm", str(10**400)), fragments=("tpm must be",)),
    "--rps 10**20": Case(extra=("--rps", str(10**20)), fragments=("rps must be",)),
    "--burst 0": Case(extra=("--burst", "0"), fragments=("burst", "seconds")),
    "--burst -1": Case(extra=("--burst", "-1"), fragments=("burst must be",)),
    "--burst nan": Case(extra=("--burst", "nan"), fragments=("burst must be",)),
    "--burst inf": Case(extra=("--burst", "inf"), fragments=("burst must be",)),
    "a spec file with burst = true": Case(
        spec='input = {input}\njob_dir = {job_dir}\nmodel = "m"\nbase_url = "mock://"\nburst = true\n',
        fragments=("burst must be",),
    ),
    "--timeout 0": Case(extra=("--timeout", "0"), fragments=("timeout",)),
    "--max-attempts 0": Case(extra=("--max-attempts", "0"), fragments=("max_attempts",)),
    "--max-cost 0": Case(extra=("--max-cost", "0"), fragments=("max_cost",)),
    "five --stop values": Case(extra=tuple(x for s in "abcde" for x in ("--stop", s)), fragments=("at most 4",)),
    "--param-column of a missing column": Case(extra=("--param-column", "temperature=nope"), fragments=("nope",)),
    "--param-column of a parameter that cannot be set per row": Case(
        extra=("--param-column", "top_p=topic"), fragments=("top_p",)
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_whole_job_mistake_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    good = write_prompts(tmp_path / "in.csv")
    job = tmp_path / "job"
    before = snapshot(tmp_path)
    result = CASES[case].invoke(tmp_path, good, job)
    assert_usage_error(result, *CASES[case].fragments)
    assert not job.exists()
    # nothing anywhere else either (a default jobs/ folder, a temp file): only the case's own input
    written = set(snapshot(tmp_path)) - set(before) - {CASES[case].name, "bad-spec.toml"}
    assert not written, written


def test_non_utf8_bytes_past_the_first_block_stop_the_job_at_that_row(tmp_path: Path) -> None:
    """The CSV reader infers types from its first block; a bad byte later is still bad input. In a
    file this large it is found while the job sends (tests/test_flat_start.py): the job stops there,
    exit 2 and one line, the rows before it kept; the file fixed, the next run sends only the rest."""
    data = tmp_path / "late.csv"
    filler = "x" * (1024 * 1024)

    def write(bad: bytes) -> None:
        with data.open("wb") as fh:
            fh.write(b"id,pad,prompt\n")
            for i in range(17):  # 17 MiB of good rows: the bad byte lands in a later block
                fh.write(f"{i},{filler},question {i}\n".encode())
            fh.write(b"17,y,bad " + bad + b" byte\n18,y,fine\n")

    write(b"\xff")
    job = tmp_path / "job"
    result = run(data, job)
    assert_usage_error(result, "late.csv")
    assert JobStore(job).manifest().input.bad_input == result.output.strip().removeprefix("error: ")
    before = JobStore(job).results(["row_id", "status"]).to_pylist()
    assert all(r["row_id"] < 17 and r["status"] == "ok" for r in before)
    write(b"good")
    again = run(data, job)
    assert again.exit_code == 0, again.output
    assert sorted(r["row_id"] for r in JobStore(job).results(["row_id"]).to_pylist()) == list(range(19))


def test_lone_surrogate_in_a_jsonl_prompt_fails_cleanly(tmp_path: Path) -> None:
    """JSON allows the escape "\\ud800", which decodes to text that cannot be encoded as UTF-8.

    Either outcome keeps the README's promises: the job refuses the file (exit 2, one line,
    nothing written) or that row fails as invalid (exit 1) while the others are answered.
    """
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "first"}\n{"prompt": "caf\\ud800"}\n{"prompt": "third"}\n')
    job = tmp_path / "job"
    result = run(data, job)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code == 2:
        assert_usage_error(result, "in.jsonl")
        assert not job.exists()
        return
    assert result.exit_code == 1, result.output
    df = export(job, tmp_path / "out.parquet")
    assert df["status"].tolist() == ["ok", "error", "ok"]
    assert df.loc[1, "error_type"] == "invalid_row"


# -- nothing already in the job directory is damaged --------------------------------------


def test_bad_input_against_a_finished_job_changes_no_byte_of_it(tmp_path: Path) -> None:
    good = write_prompts(tmp_path / "in.csv")
    job = tmp_path / "job"
    first = run(good, job)
    assert first.exit_code == 0, first.output
    exported = export(job, tmp_path / "before.parquet")
    assert exported["status"].tolist() == ["ok"] * len(PROMPTS)
    hashes = snapshot(job)
    assert "job.json" in hashes and any(name.startswith("results/part-") for name in hashes)

    cases: dict[str, Callable[[], Result]] = {
        name: (lambda case=case, i=i: case.invoke(tmp_path / f"case{i}", good, job))
        for i, (name, case) in enumerate(CASES.items())
    }
    for i in range(len(CASES)):
        (tmp_path / f"case{i}").mkdir()

    # (a changed input file, another model or template for the same job are not bad input: the job resumes
    # and sends only the requests it has no reply for: tests/test_reuse.py)
    expected: dict[str, tuple[str, ...]] = {}

    # the catalog's cases may be refused for their own reason or because the input differs from the
    # job's: either way exit 2, one line, and not a byte changed
    problems: list[str] = []
    for name, call in cases.items():
        result = call()
        fragments = expected.get(name, ())
        problems += [f"{name}: {p}" for p in usage_error_problems(result, fragments)]
        now = snapshot(job)
        if now != hashes:
            changed = sorted(k for k in set(now) | set(hashes) if now.get(k) != hashes.get(k))
            problems.append(f"{name}: the job directory changed: {changed}")
            hashes = now  # report each case's own damage only
    assert not problems, "\n".join(problems)
    after = export(job, tmp_path / "after.parquet")
    pd.testing.assert_frame_equal(after, exported)


# -- bad rows: that row fails, the others are answered -----------------------------------


def test_empty_prompts_in_a_csv_fail_alone_without_being_sent(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    data.write_text('id,prompt\n0,hello\n1,\n2,"   "\n3,world\n4,"\n\t"\n')
    job = tmp_path / "job"
    result = run(data, job)
    assert result.exit_code == 1, result.output
    assert "HTTP requests 2 (" in result.output  # only the two good rows were sent
    df = export(job, tmp_path / "out.parquet")
    assert df["status"].tolist() == ["ok", "error", "error", "ok", "error"]
    bad = df[df["status"] == "error"]
    assert set(bad["error_type"]) == {"empty_prompt"}
    assert (bad["attempts"] == 0).all() and bad["http_status"].isna().all()


def test_null_missing_and_empty_prompts_in_jsonl_and_parquet_fail_alone(tmp_path: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"prompt": "hello"}\n{"prompt": null}\n{}\n{"prompt": ""}\n{"prompt": "world"}\n')
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hello", None, "", " ", "world"]}), parquet)
    for data, sent in ((jsonl, "HTTP requests 2 ("), (parquet, "2 replies reused (2 from the cache)")):
        job = tmp_path / f"job-{data.suffix[1:]}"
        result = run(data, job)
        assert result.exit_code == 1, result.output
        assert sent in result.output  # only the good rows were asked (the second job found them cached)
        df = export(job, tmp_path / f"out-{data.suffix[1:]}.parquet")
        assert df["status"].tolist() == ["ok", "error", "error", "error", "ok"], data
        assert set(df.loc[1:3, "error_type"]) == {"empty_prompt"}
        assert (df.loc[1:3, "attempts"] == 0).all()


def test_a_null_template_field_fails_that_row_only(tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    data.write_text(
        '{"name": "Ann", "q": "why"}\n{"name": null, "q": "how"}\n{"q": "what"}\n{"name": "Bo", "q": "who"}\n'
    )
    job = tmp_path / "job"
    result = run(data, job, "--template", "{name} asks {q}")
    assert result.exit_code == 1, result.output
    df = export(job, tmp_path / "out.parquet")
    assert df["status"].tolist() == ["ok", "error", "error", "ok"]
    assert set(df.loc[1:2, "error_type"]) == {"empty_prompt"}


def test_a_one_megabyte_prompt_is_rejected_by_the_server_and_fails_alone(tmp_path: Path) -> None:
    huge = "word " * 200_000  # 1 MB, far over the simulator's 16,384-token context window
    data = write_prompts(tmp_path / "in.csv", ["hello", huge, "world"])
    assert data.stat().st_size > 1_000_000
    job = tmp_path / "job"
    result = run(data, job, "--max-attempts", "3")
    assert result.exit_code == 1, result.output
    df = export(job, tmp_path / "out.parquet")
    assert df["status"].tolist() == ["ok", "error", "ok"]
    row = df.loc[1]
    assert (row["error_type"], row["http_status"], row["attempts"]) == ("invalid_request", 400, 1)  # not retried
    assert "context length" in row["error_message"]
    assert huge[:1000] not in row["error_message"]  # the message does not carry the prompt


def test_out_of_range_per_row_values_fail_their_rows_only(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    pd.DataFrame(
        {
            "prompt": [f"question {i}" for i in range(8)],
            "temp": ["0.5", "", "7", "abc", "-1", "2", "", ""],
            "mt": ["", "12", "", "", "", "", "0", "2.5"],
            "stops": ["", '["a","b"]', "", "", "", '["a","b","c","d","e"]', "", ""],
        }
    ).to_csv(data, index=False)
    job = tmp_path / "job"
    params = ("--param-column", "temperature=temp", "--param-column", "max_tokens=mt", "--param-column", "stop=stops")
    result = run(data, job, *params)
    assert result.exit_code == 1, result.output
    assert "HTTP requests 2 (" in result.output  # the bad rows were not sent
    df = export(job, tmp_path / "out.parquet")
    assert df["status"].tolist() == ["ok", "ok", "error", "error", "error", "error", "error", "error"]
    bad = df[df["status"] == "error"]
    assert set(bad["error_type"]) == {"invalid_row"}
    assert (bad["attempts"] == 0).all()
    messages = df["error_message"].tolist()
    assert "temp" in messages[2] and "temperature" in messages[2]
    assert "max_tokens" in messages[6] and "stop" in messages[5]


# -- formats: the content decides, not the name -------------------------------------------


def test_a_parquet_file_named_csv_is_read_as_parquet(tmp_path: Path) -> None:
    data = tmp_path / "actually-parquet.csv"
    pq.write_table(pa.table({"prompt": PROMPTS[:3]}), data)
    job = tmp_path / "job"
    result = run(data, job)
    assert result.exit_code == 0, result.output
    assert export(job, tmp_path / "out.parquet")["status"].tolist() == ["ok"] * 3


NESTED = pa.table(
    {
        "prompt": ["first question", "second question"],
        "meta": [{"k": 1, "s": "alpha"}, {"k": 2, "s": "beta"}],
        "tags": [[10, 20], [30]],
    }
)


def test_a_parquet_file_with_nested_columns_the_job_does_not_use(tmp_path: Path) -> None:
    data = tmp_path / "nested.parquet"
    pq.write_table(NESTED, data)
    job = tmp_path / "job"
    result = run(data, job)
    assert result.exit_code == 0, result.output
    df = export(job, tmp_path / "out.parquet")
    assert df["status"].tolist() == ["ok", "ok"]
    assert df["meta"].tolist() == NESTED.column("meta").to_pylist()  # nested input columns survive the export
    assert [list(t) for t in df["tags"]] == [[10, 20], [30]]


def test_nested_columns_used_as_template_fields_render_their_values(tmp_path: Path) -> None:
    data = tmp_path / "nested.parquet"
    pq.write_table(NESTED, data)
    template = "{prompt} / meta: {meta} / tags: {tags}"
    job = tmp_path / "job"
    result = run(data, job, "--template", template)
    assert result.exit_code == 0, result.output
    assert export(job, tmp_path / "out.parquet")["status"].tolist() == ["ok", "ok"]
    # what was sent: every nested value is in the prompt text
    source = open_input(data)
    builder = RequestBuilder(JobSpec(input=data, model="m", template=template), source.columns)
    rows = next(source.iter_rows(builder.needed_columns))
    prompts = [builder.build(row).messages[0]["content"] for row in rows]
    for text, k, s, tags in zip(prompts, (1, 2), ("alpha", "beta"), ("10, 20", "30"), strict=True):
        assert text.startswith(("first question / meta: ", "second question / meta: "))
        assert str(k) in text and s in text and tags in text
