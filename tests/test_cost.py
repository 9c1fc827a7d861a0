"""Cost: price lookup and arithmetic, the cost report, estimates, and the --max-cost budget."""

from __future__ import annotations

import json
from pathlib import Path

import bpe_openai
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchhub import arun_job
from batchhub.cli import main
from batchhub.cost import render, report, usage_table
from batchhub.errors import UsageError
from batchhub.estimate import count_prompts, estimate, sample_row_ids
from batchhub.mock import MockConfig, MockServer
from batchhub.pricing import PriceBook, Rate, load_prices_file
from batchhub.spec import JobSpec
from batchhub.tokens import APPROXIMATE, TokenCounter, encoding_name

ROOT = Path(__file__).resolve().parent.parent
MY_PRICES = {"my-model": {"input_per_million": 1.25, "output_per_million": 10.0, "cached_input_per_million": 0.125}}


def test_override_arithmetic_by_hand() -> None:
    price = PriceBook.build(MY_PRICES).lookup("my-model")
    assert price is not None and price.source == "spec [prices]"
    # 1,000 prompt tokens of which 200 cached, 500 completion tokens:
    # (800 * 1.25 + 200 * 0.125 + 500 * 10) / 1e6 = (1000 + 25 + 5000) / 1e6
    assert price.request_cost(1000, 500, 200) == pytest.approx(0.006025)
    inp, out = price.costs(np.array([1000, 2_000_000]), np.array([500, 0]), np.array([200, 0]))
    assert inp.tolist() == pytest.approx([0.001025, 2.5])
    assert out.tolist() == pytest.approx([0.005, 0.0])


def test_bundled_prices_and_snapshot_names() -> None:
    book = PriceBook()
    mini = book.lookup("gpt-4o-mini")
    assert mini is not None and mini.source.startswith("genai-prices ")
    assert (mini.input.base, mini.output.base) == (0.15, 0.6)
    # a million in and a million out: 0.15 + 0.60
    assert mini.request_cost(1_000_000, 1_000_000) == pytest.approx(0.75)
    dated = book.lookup("gpt-4o-mini-2024-07-18")
    assert dated is not None and dated.priced_as == "gpt-4o-mini"
    qualified = book.lookup("openai/gpt-4o-mini")
    assert qualified is not None and qualified.priced_as == "gpt-4o-mini"


def test_unknown_model_is_unknown_not_zero() -> None:
    assert PriceBook().lookup("totally-made-up-model") is None
    table = pa.table(
        {
            "model": ["gpt-4o-mini", "totally-made-up-model"],
            "prompt_tokens": [1_000_000, 5],
            "completion_tokens": [0, 5],
            "status": ["ok", "ok"],
        }
    )
    rep = report(table, PriceBook())
    assert rep.unknown_models == ["totally-made-up-model"]
    assert rep.total_usd == pytest.approx(0.15)
    made_up = next(m for m in rep.models if m.model == "totally-made-up-model")
    assert made_up.total_usd is None and made_up.requests == 1
    text = render(rep)
    assert "unknown price for: totally-made-up-model" in text
    assert "$0.1500 + unknown" in text
    assert not rep.complete


def test_override_precedence_file_over_spec_over_bundled(tmp_path: Path) -> None:
    bundled = PriceBook().lookup("gpt-4o-mini")
    spec_book = PriceBook.build({"gpt-4o-mini": {"input_per_million": 1.0, "output_per_million": 2.0}})
    assert spec_book.lookup("gpt-4o-mini").input.base == 1.0  # type: ignore[union-attr]
    f = tmp_path / "prices.toml"
    f.write_text("[gpt-4o-mini]\ninput_per_million = 3.0\noutput_per_million = 4.0\n")
    both = PriceBook.build({"gpt-4o-mini": {"input_per_million": 1.0, "output_per_million": 2.0}}, f)
    price = both.lookup("gpt-4o-mini")
    assert price is not None and (price.input.base, price.output.base) == (3.0, 4.0)
    assert price.source == f"--prices {f}"
    assert bundled is not None and bundled.input.base == 0.15
    # a dated name falls back to its family's override, and says what it was priced as
    dated = both.lookup("gpt-4o-mini-2025-01-01")
    assert dated is not None and dated.priced_as == "gpt-4o-mini" and dated.input.base == 3.0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"m": {"input_per_million": 1}}', "need output_per_million"),
        ('{"m": {"input_per_million": 1, "output_per_million": -2}}', "must be a number >= 0"),
        ('{"m": {"input_per_million": 1, "output_per_million": 2, "cache": 1}}', "unknown price key"),
        ('{"m": 5}', "must be a table"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_price_files(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(UsageError, match=match):
        load_prices_file(f)


def test_tiered_rate_applies_to_every_token_past_the_threshold() -> None:
    rate = Rate(1.0, ((200_000, 2.0),))
    assert rate.for_prompts(np.array([100, 200_000, 200_001])).tolist() == [1.0, 1.0, 2.0]


def test_tokenizer_choice() -> None:
    assert encoding_name("gpt-4o-mini") == "o200k_base"
    assert encoding_name("openai/gpt-4.1") == "o200k_base"
    assert encoding_name("gpt-3.5-turbo") == "cl100k_base"
    assert encoding_name("llama-3-70b") is None
    approx = TokenCounter.for_model("llama-3-70b")
    assert approx.label == APPROXIMATE and approx.text("x" * 40) == 10


def reviews_spec(**kw) -> JobSpec:
    return JobSpec(
        input=ROOT / "sample_data" / "reviews.csv",
        model="gpt-4o-mini",
        system="Answer with one word.",
        template="Classify the sentiment of: {review}",
        max_tokens=8,
        **kw,
    )


def test_estimate_counts_prompts_exactly_with_the_tokenizer() -> None:
    enc = bpe_openai.get_encoding("o200k_base")
    reviews = pd.read_csv(ROOT / "sample_data" / "reviews.csv")["review"]

    def tokens(review: str) -> int:
        # OpenAI's rule: 3 per message + role + content, + 3 for the reply
        system = 3 + len(enc.encode("system")) + len(enc.encode("Answer with one word."))
        return 3 + system + 3 + len(enc.encode("user")) + len(enc.encode(f"Classify the sentiment of: {review}"))

    expected = sum(tokens(review) for review in reviews)
    tallies, failing, rows, _ = count_prompts(reviews_spec())
    assert (rows, failing) == (200, 0)
    assert tallies["gpt-4o-mini"].prompt == expected
    # the estimate counts each request once: a review that appears twice is sent once (the second reuses it)
    distinct = list(dict.fromkeys(reviews))
    assert len(distinct) == 193
    est = estimate(reviews_spec(), PriceBook())
    (m,) = est.models
    assert (m.rows, est.rows_answered) == (193, 7)
    assert m.prompt_tokens == sum(tokens(review) for review in distinct) and m.exact
    assert (m.completion_low, m.completion_high) == (193, 1544)
    # by hand: prompt at $0.15/M plus 1 .. 8 completion tokens per row at $0.60/M
    assert m.cost_low == pytest.approx((m.prompt_tokens * 0.15 + 193 * 0.6) / 1e6)
    assert m.cost_high == pytest.approx((m.prompt_tokens * 0.15 + 1544 * 0.6) / 1e6)


def test_estimate_without_max_tokens_has_no_ceiling() -> None:
    spec = reviews_spec()
    spec.max_tokens = None
    (m,) = estimate(spec, PriceBook()).models
    assert m.completion_high is None and m.cost_high is None


def test_sample_rows_spread_over_the_input() -> None:
    assert sample_row_ids(1000, 5).tolist() == [0, 250, 500, 749, 999]
    assert sample_row_ids(3, 10).tolist() == [0, 1, 2]


@pytest.fixture
async def server():
    async with MockServer(MockConfig(seed=1, models=["*"])) as srv:  # a made-up model is sent too
        yield srv


def prompts(path: Path, n: int) -> Path:
    pd.DataFrame({"prompt": [f"Write a short story about a lighthouse keeper, part {i}." for i in range(n)]}).to_csv(
        path, index=False
    )
    return path


async def test_budget_stops_under_it_and_resumes_with_a_larger_one(tmp_path: Path, server) -> None:
    spec = JobSpec(
        input=prompts(tmp_path / "in.csv", 300),
        model="gpt-4o",
        base_url=server.base_url,
        api_key="k",
        job_dir=tmp_path / "job",
        concurrency=8,
        max_tokens=40,
        max_cost=0.02,
        quiet=True,
    )
    first = await arun_job(spec, progress=False)
    assert first.exit_code == 3 and first.stopped == "budget"
    assert "budget reached" in (first.message or "") and "--max-cost" in (first.message or "")
    assert 0 < first.ok < 300
    spent = report(usage_table(tmp_path / "job"), PriceBook()).total_usd
    assert spent <= 0.02  # checked from the parts, not from the runner's own count
    assert first.budget_spent_usd == pytest.approx(spent)
    spec.max_cost = 1.0
    second = await arun_job(spec, progress=False)
    assert (second.ok, second.failed, second.exit_code) == (300, 0, 0)
    assert server.stats.duplicates() == 0
    assert report(usage_table(tmp_path / "job"), PriceBook()).total_usd <= 1.0


async def test_budget_needs_a_known_price(tmp_path: Path, server) -> None:
    spec = JobSpec(
        input=prompts(tmp_path / "in.csv", 3),
        model="made-up-model",
        base_url=server.base_url,
        api_key="k",
        job_dir=tmp_path / "job",
        max_cost=1.0,
    )
    with pytest.raises(UsageError, match="needs a price for model 'made-up-model'"):
        await arun_job(spec)
    assert not (tmp_path / "job").exists()
    spec.prices = {"made-up-model": {"input_per_million": 1, "output_per_million": 1}}
    assert (await arun_job(spec, progress=False)).ok == 3


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cost_command_on_job_export_and_bare_parquet(tmp_path: Path) -> None:
    data = prompts(tmp_path / "in.csv", 20)
    assert (
        invoke("run", str(data), "--mock", "--model", "gpt-4o-mini", "--job-dir", str(tmp_path / "job"), "-q").exit_code
        == 0
    )
    result = invoke("cost", str(tmp_path / "job"), "--json")
    assert result.exit_code == 0
    doc = json.loads(result.output)
    (line,) = doc["models"]
    assert line["requests"] == 20 and doc["complete"] is True
    by_hand = (line["prompt_tokens"] * 0.15 + line["completion_tokens"] * 0.6) / 1e6
    assert doc["total_usd"] == pytest.approx(by_hand)
    invoke("export", str(tmp_path / "job"), "-o", str(tmp_path / "out.parquet"))
    exported = json.loads(invoke("cost", str(tmp_path / "out.parquet"), "--json").output)
    assert exported["total_usd"] == pytest.approx(doc["total_usd"])
    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"prompt_tokens": [1_000_000], "completion_tokens": [0]}), bare)
    assert invoke("cost", str(bare)).exit_code == 2  # which model? it will not guess
    text = invoke("cost", str(bare), "--model", "gpt-4o-mini").output
    assert "$0.1500" in text and "prices: genai-prices" in text
    junk = tmp_path / "junk.parquet"
    pq.write_table(pa.table({"x": [1]}), junk)
    result = invoke("cost", str(junk))
    assert result.exit_code == 2 and "nothing to price" in result.output


def test_estimate_command_with_a_sample_that_joins_the_job(tmp_path: Path) -> None:
    data = prompts(tmp_path / "in.csv", 40)
    args = [
        "estimate",
        str(data),
        "--mock",
        "--model",
        "gpt-4o-mini",
        "--max-tokens",
        "30",
        "--job-dir",
        str(tmp_path / "job"),
    ]
    plain = json.loads(invoke(*args, "--json").output)
    assert plain["sample"] is None and plain["models"][0]["completion_high"] == 40 * 30
    assert not (tmp_path / "job").exists()  # an estimate without a sample writes nothing
    sampled = json.loads(invoke(*args, "--sample", "10", "--json", "-q").output)
    s = sampled["sample"]
    assert s["rows"] == 10 and 4 <= s["completion_mean"] <= 30
    m = sampled["models"][0]
    assert m["completion_low"] <= m["completion_expected"] <= m["completion_high"] <= 40 * 30
    status = json.loads(invoke("status", str(tmp_path / "job"), "--json").output)
    assert status["ok"] == 10 and status["pending"] == 30
    assert status["projected_usd"] == pytest.approx(status["spent_usd"] * 4)
    # running the job now sends only the other 30 rows
    result = invoke(
        "run",
        str(data),
        "--mock",
        "--model",
        "gpt-4o-mini",
        "--max-tokens",
        "30",
        "--job-dir",
        str(tmp_path / "job"),
        "-q",
    )
    assert result.exit_code == 0 and "30 results this run" in result.output
