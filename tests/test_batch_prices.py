"""The Batch API's prices: a result with a `batch_id` is priced at its model's batch price, and every
figure says where that price came from (an override's own batch rates, genai-prices' batch price, or
the live price at the published Batch API discount).

The job of the fixture is written by hand, with two models of the job's own prices so that every
figure is exact: my-model ($1 / $2 per million live, its own batch rates $0.25 / $0.50) and
other-model ($4 / $8 live, no batch rates: half of those, $2 / $4, at the discount):

    seq  row  where                      model        sent      prompt     completion  cost
    1    0    old part (no batch_id)     my-model     live      1,000,000  500,000     $2.00
    2    1    part                       my-model     batch a   1,000,000  500,000     $0.50
    3    2    part                       other-model  batch a   1,000,000  1,000,000   $6.00
    4    3    journal                    other-model  live      500,000    0           $2.00
    5    4    journal                    my-model     batch b   2,000,000  0           $0.50

Live $4 (2 replies), batch $7 (3 replies): $11 in all. Every reply priced live would be $20.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from batchhub import defaults
from batchhub.budget import Budget, one_reply_check
from batchhub.cli import main
from batchhub.cost import render, report, usage_table
from batchhub.errors import UsageError
from batchhub.manifest import Manifest
from batchhub.parts import set_damaged_parts_aside, write_part
from batchhub.prepare import start_budget
from batchhub.pricing import PriceBook, SavedPrices, load_prices_file
from batchhub.report import job_report
from batchhub.report_html import render_html
from batchhub.requests import RequestBuilder
from batchhub.result_schema import rows_to_table
from batchhub.spec import JobSpec
from batchhub.stats import RunStats
from batchhub.status import job_status
from batchhub.store import JobStore

ROOT = Path(__file__).resolve().parent.parent
PRICES = {
    "my-model": {
        "input_per_million": 1.0,
        "output_per_million": 2.0,
        "batch_input_per_million": 0.25,
        "batch_output_per_million": 0.5,
    },
    "other-model": {"input_per_million": 4.0, "output_per_million": 8.0},
}
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
GENAI = "genai-prices 0.2.3"


def result(seq: int, row: int, model: str, prompt: int, completion: int, batch_id: str | None) -> dict[str, Any]:
    return {
        "row_id": row,
        "status": "ok",
        "content": f"answer {row}",
        "model": model,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "latency_s": 0.5,
        "attempts": 1,
        "rate_limit_retries": 0,
        "http_status": 200,
        "request_hash": f"{row:064x}",
        "batch_id": batch_id,
        "finished_at": T0 + seq,
        "seq": seq,
    }


OLD_PART = [result(1, 0, "my-model", 1_000_000, 500_000, None)]
PART = [
    result(2, 1, "my-model", 1_000_000, 500_000, "batch_a"),
    result(3, 2, "other-model", 1_000_000, 1_000_000, "batch_a"),
]
JOURNAL = [
    result(4, 3, "other-model", 500_000, 0, None),
    result(5, 4, "my-model", 2_000_000, 0, "batch_b"),
]


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """The job of the module docstring, its prices recorded in its job.json."""
    job_dir = tmp_path / "job"
    results = job_dir / "results"
    results.mkdir(parents=True)
    write_part(results / "part-000001.parquet", rows_to_table(OLD_PART).drop(["batch_id"]))
    write_part(results / "part-000002.parquet", rows_to_table(PART))
    (job_dir / "journal-000003.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JOURNAL))
    JobStore(job_dir).write_manifest(
        {
            "format_version": 1,
            "input": {"path": "in.csv", "rows": 5},
            "spec": {"name": "batch", "model": "my-model", "via": "batch"},
            "prices": PriceBook.build(PRICES).to_record(),
            "runs": [
                {
                    "batchhub_version": "0.1.0",
                    "started_at": "2026-01-01T00:00:00Z",
                    "ended_at": "2026-01-01T00:00:10Z",
                    "elapsed_s": 10.0,
                }
            ],
        }
    )
    return job_dir


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# -- where a batch price comes from ----------------------------------------------------------------

DISCOUNT = f"at the published {1 - defaults.BATCH_DISCOUNT:.0%} Batch API discount"


@pytest.mark.parametrize(
    ("model", "when", "live", "batch", "source"),
    [
        # an override's own batch rates
        ("my-model", None, (1.0, 2.0), (0.25, 0.5), "spec [prices] batch prices"),
        # an override without them: its live rates at the discount
        ("other-model", None, (4.0, 8.0), (2.0, 4.0), f"spec [prices] {DISCOUNT}"),
        # genai-prices' own batch price
        ("gpt-4o-mini", None, (0.15, 0.6), (0.075, 0.3), f"{GENAI} batch price (bundled data)"),
        ("openai/gpt-4o", None, (2.5, 10.0), (1.25, 5.0), f"{GENAI} batch price (bundled data)"),
        # a model genai-prices has no batch price for: its live price at the discount
        ("claude-3-5-sonnet-latest", None, (3.0, 15.0), (1.5, 7.5), f"{GENAI} live price {DISCOUNT}"),
        # before genai-prices' batch price starts, its live price comes back unchanged: at the discount
        ("gpt-4o-mini", datetime(2025, 1, 1, tzinfo=UTC), (0.15, 0.6), (0.075, 0.3), f"{GENAI} live price {DISCOUNT}"),
    ],
)
def test_batch_price_sources(
    model: str, when: datetime | None, live: tuple[float, float], batch: tuple[float, float], source: str
) -> None:
    book = PriceBook.build(PRICES)
    live_price, batch_price = book.lookup(model, when), book.lookup(model, when, batch=True)
    assert live_price is not None and batch_price is not None
    assert (live_price.input.base, live_price.output.base) == pytest.approx(live)
    assert (batch_price.input.base, batch_price.output.base) == pytest.approx(batch)
    assert batch_price.source == source and batch_price.batch and not live_price.batch
    assert live_price.source in ("spec [prices]", f"{GENAI} (bundled data)")


def test_an_unknown_model_has_no_batch_price_either() -> None:
    assert PriceBook().lookup("totally-made-up-model", batch=True) is None


def test_a_cached_batch_rate_of_an_override() -> None:
    entry = {**PRICES["my-model"], "cached_input_per_million": 0.5, "batch_cached_input_per_million": 0.1}
    price = PriceBook.build({"m": entry}).lookup("m", batch=True)
    assert price is not None and price.cached_input is not None and price.cached_input.base == 0.1
    # 1M prompt tokens of which 400k cached, at the batch rates
    assert price.request_cost(1_000_000, 0, 400_000) == pytest.approx(0.6 * 0.25 + 0.4 * 0.1)
    discounted = PriceBook.build({"m": {**PRICES["other-model"], "cached_input_per_million": 0.5}}).lookup(
        "m", batch=True
    )
    assert discounted is not None and discounted.cached_input is not None and discounted.cached_input.base == 0.25


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"batch_input_per_million": 1}, "need batch_output_per_million too"),
        ({"batch_cached_input_per_million": 1}, "need batch_input_per_million too"),
        ({"batch_input_per_million": 1, "batch_output_per_million": -1}, "must be a number >= 0"),
        ({"batch_input_per_million": 1, "batch_output_per_million": 1, "batch_cache": 1}, "unknown price key"),
    ],
)
def test_bad_batch_prices(tmp_path: Path, entry: dict[str, Any], match: str) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"m": {"input_per_million": 1, "output_per_million": 2, **entry}}))
    with pytest.raises(UsageError, match=match):
        load_prices_file(f)


def test_a_prices_file_takes_batch_rates(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(
        "[m]\ninput_per_million = 1.0\noutput_per_million = 2.0\nbatch_input_per_million = 0.1\n"
        "batch_output_per_million = 0.2\n"
    )
    price = PriceBook.build({}, f).lookup("m", batch=True)
    assert price is not None and (price.input.base, price.output.base) == (0.1, 0.2)
    assert price.source == f"--prices {f} batch prices"


def test_saved_prices_keep_batch_and_live_apart(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    first = PriceBook(saved=SavedPrices(path))
    live, batch = first.lookup("gpt-4o-mini"), first.lookup("gpt-4o-mini", batch=True)
    claude = first.lookup("claude-3-5-sonnet-latest", batch=True)
    day = datetime.now(UTC).date().isoformat()
    assert {f"gpt-4o-mini@{day}", f"gpt-4o-mini@{day}@batch", f"claude-3-5-sonnet-latest@{day}@batch"} <= set(
        json.loads(path.read_text())
    )
    again = PriceBook(saved=SavedPrices(path))  # read back from the file, in either order
    assert again.lookup("gpt-4o-mini", batch=True) == batch
    assert again.lookup("gpt-4o-mini") == live
    assert again.lookup("claude-3-5-sonnet-latest", batch=True) == claude
    assert batch is not None and live is not None and batch.input.base == live.input.base / 2


def test_the_recorded_price_table_keeps_batch_prices(job: Path) -> None:
    book = PriceBook.for_job(Manifest.load(job / "job.json"))
    price = book.lookup("my-model", batch=True)
    assert price is not None and (price.input.base, price.output.base) == (0.25, 0.5)
    assert price.source == "spec [prices] (recorded in job.json) batch prices"


# -- the cost of results ---------------------------------------------------------------------------


def lines(rep: Any) -> dict[tuple[str, str], tuple[int, float]]:
    return {(m.model, m.via): (m.requests, m.total_usd) for m in rep.models}


def test_each_result_is_priced_at_its_own_price(job: Path) -> None:
    assert set_damaged_parts_aside(job / "results") == []  # a part from before the column is no damage
    rep = report(usage_table(job), PriceBook.build(PRICES))
    assert rep.total_usd == pytest.approx(11.0)
    assert lines(rep) == {
        ("my-model", "live"): (1, pytest.approx(2.0)),
        ("other-model", "live"): (1, pytest.approx(2.0)),
        ("my-model", "batch"): (2, pytest.approx(1.0)),
        ("other-model", "batch"): (1, pytest.approx(6.0)),
    }
    assert rep.sources == sorted(["spec [prices]", "spec [prices] batch prices", f"spec [prices] {DISCOUNT}"])
    text = render(rep)
    header = text.splitlines()[0].split()
    assert header[:3] == ["model", "via", "priced"]
    assert any(line.split()[:2] == ["other-model", "batch"] and "$6.0000" in line for line in text.splitlines())


def test_a_live_job_is_shown_as_before() -> None:
    rep = report(rows_to_table(OLD_PART), PriceBook.build(PRICES))
    assert lines(rep) == {("my-model", "live"): (1, pytest.approx(2.0))}
    assert "via" not in render(rep).splitlines()[0]


def test_the_cost_command_shows_what_went_through_the_batch_api(job: Path) -> None:
    out = invoke("cost", str(job), "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["total_usd"] == pytest.approx(11.0)
    by_via = {(m["model"], m["via"]): m["total_usd"] for m in data["models"]}
    assert by_via == {
        ("my-model", "live"): pytest.approx(2.0),
        ("other-model", "live"): pytest.approx(2.0),
        ("my-model", "batch"): pytest.approx(1.0),
        ("other-model", "batch"): pytest.approx(6.0),
    }
    assert "spec [prices] (recorded in job.json) batch prices" in data["sources"]
    text = invoke("cost", str(job)).output.splitlines()
    assert text[0].split()[:2] == ["model", "via"]
    assert [line.split()[:2] for line in text[2:6]] == [
        ["my-model", "live"],
        ["other-model", "live"],
        ["my-model", "batch"],
        ["other-model", "batch"],
    ]


def test_an_exported_parquet_with_a_batch_id_column_is_priced_the_same(job: Path, tmp_path: Path) -> None:
    latest = rows_to_table([*OLD_PART, *PART, *JOURNAL]).to_pandas()
    export = tmp_path / "export.parquet"
    latest.to_parquet(export)
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    data = json.loads(invoke("cost", str(export), "--prices", str(prices), "--json").output)
    assert data["total_usd"] == pytest.approx(11.0)
    old = tmp_path / "old.parquet"
    latest.drop(columns=["batch_id"]).to_parquet(old)  # without the column every reply was live
    data = json.loads(invoke("cost", str(old), "--prices", str(prices), "--json").output)
    assert data["total_usd"] == pytest.approx(20.0)


def test_status_and_report_price_batch_results_at_the_batch_price(job: Path) -> None:
    assert job_status(job).spent_usd == pytest.approx(11.0)
    rep = job_report(job)
    assert rep.bill is not None and rep.bill.total_usd == pytest.approx(11.0)
    assert "other-model (batch)" in render_html(rep)


def test_a_run_counts_a_batch_reply_at_the_batch_price() -> None:
    stats, book = RunStats(), PriceBook.build(PRICES)
    assert stats.count(dict(PART[0]), book, "my-model") == pytest.approx(0.5)  # type: ignore[arg-type]
    assert stats.count(dict(OLD_PART[0]), book, "my-model") == pytest.approx(2.0)  # type: ignore[arg-type]
    assert stats.cost_usd == pytest.approx(2.5)


# -- the budget ------------------------------------------------------------------------------------


def built_request() -> Any:
    spec = JobSpec(model="gpt-4o-mini", max_tokens=1000)
    return RequestBuilder(spec, ["prompt"]).build({"prompt": "Say hello."})


def test_a_batch_jobs_worst_case_is_at_the_batch_price() -> None:
    live, batch = Budget(1.0, 0.0, PriceBook()), Budget(1.0, 0.0, PriceBook(), "batch")
    built = built_request()
    # gpt-4o-mini's batch price is half its live price, input and output
    assert batch.worst_case(built) == pytest.approx(live.worst_case(built) / 2)
    assert batch.worst_case(built) > 0


def test_one_reply_check_at_the_batch_price(tmp_path: Path) -> None:
    # 1,000 completion tokens of gpt-4o-mini: $0.0006 live, $0.0003 through the Batch API
    with pytest.raises(UsageError, match=r"cost \$0\.0006"):
        one_reply_check(Budget(0.0004, 0.0, PriceBook()), "gpt-4o-mini", 1, 1000)
    one_reply_check(Budget(0.0004, 0.0, PriceBook(), "batch"), "gpt-4o-mini", 1, 1000)
    with pytest.raises(UsageError, match=r"cost \$0\.0003 at the Batch API price"):
        one_reply_check(Budget(0.0002, 0.0, PriceBook(), "batch"), "gpt-4o-mini", 1, 1000)
    # the job's budget knows its via
    spec = JobSpec(input=tmp_path / "in.csv", model="gpt-4o-mini", max_tokens=1000, max_cost=0.0004, via="batch")
    assert start_budget(spec, JobStore(tmp_path / "job"), PriceBook()).via == "batch"
    spec.via = "live"
    with pytest.raises(UsageError, match="one reply's worst case"):
        start_budget(spec, JobStore(tmp_path / "job"), PriceBook())


def test_a_resumed_budget_counts_batch_replies_at_the_batch_price(job: Path) -> None:
    spec = JobSpec(input=job / "in.csv", model="my-model", max_cost=100.0, prices=PRICES, via="batch")
    budget = start_budget(spec, JobStore(job), PriceBook.build(PRICES))
    # $11, not the $20 of every reply at the live price (nor the $4.25 of every reply read as the my-model
    # it was asked as, the cheaper reading here)
    assert budget.spent == pytest.approx(11.0)


# -- estimate --------------------------------------------------------------------------------------


def estimate_args(*more: str) -> list[str]:
    return [
        "estimate",
        str(ROOT / "sample_data" / "reviews.csv"),
        "--model",
        "gpt-4o-mini",
        "--template",
        "Classify the sentiment of: {review}",
        "--max-tokens",
        "8",
        *more,
    ]


def test_estimate_via_batch_shows_both_prices() -> None:
    out = invoke(*estimate_args("--via", "batch", "--json"))
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["via"] == "batch"
    (m,) = data["models"]
    assert (m["cost_low"], m["cost_high"]) == (m["batch_cost_low"], m["batch_cost_high"])
    # gpt-4o-mini's batch price is half its live price: input and output
    assert m["live_cost_high"] == pytest.approx(2 * m["batch_cost_high"])
    assert data["total_cost_high"] == pytest.approx(data["total_batch_cost_high"])
    assert data["total_live_cost_low"] == pytest.approx(2 * data["total_cost_low"])
    assert f"{GENAI} batch price (bundled data)" in data["prices"]
    text = invoke(*estimate_args("--via", "batch")).output
    assert "cost (Batch API)" in text and "cost live" in text
    saving = next(line for line in text.splitlines() if "the Batch API saves" in line)
    assert saving.endswith("(50%)")
    assert f"${m['batch_cost_high']:,.4f}" in text and f"${m['live_cost_high']:,.4f}" in text


def test_a_live_estimate_hints_at_the_batch_price() -> None:
    out = invoke(*estimate_args("--json"))
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["via"] == "live"
    assert data["total_cost_high"] == pytest.approx(data["total_live_cost_high"])
    assert data["total_batch_cost_high"] == pytest.approx(data["total_cost_high"] / 2)
    text = invoke(*estimate_args()).output
    hint = next(line for line in text.splitlines() if line.startswith("through the Batch API"))
    assert f"${data['total_batch_cost_high']:,.4f}" in hint
    assert "cost live" not in text


def test_estimate_refuses_an_unknown_via() -> None:
    out = CliRunner().invoke(main, estimate_args("--via", "post"))
    assert out.exit_code == 2 and "'post' is not one of 'live', 'batch'" in out.output


def test_the_readmes_batch_prices_example_is_a_prices_file(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Batch API prices.**") :]
    start = section.index("```json\n") + 8
    example = section[start : section.index("\n```", start)]
    f = tmp_path / "prices.json"
    f.write_text(example)
    price = PriceBook.build({}, f).lookup("my-model", batch=True)
    assert price is not None and (price.input.base, price.output.base) == (0.6, 5.0)
