"""Text longer than the tokenizer takes at once is counted in pieces: estimate and --max-cost keep working."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import bpe_openai
import pytest
from click.testing import CliRunner

from batchhub import defaults
from batchhub.cli import main
from batchhub.tokens import TokenCounter, pieces

WORDS = "the quick brown fox jumps over the lazy dog, and then it naps. "
LONG = (WORDS * (1_200_000 // len(WORDS) + 1))[:1_200_000]


def test_pieces_cut_at_whitespace_and_cover_the_text() -> None:
    text = "alpha beta\ngamma " * 10
    cut = list(pieces(text, 16))
    assert "".join(cut) == text
    assert all(0 < len(p) <= 16 for p in cut)
    assert all(p[-1].isspace() or nxt[0].isspace() for p, nxt in itertools.pairwise(cut))
    # no whitespace at all: cut at the size
    assert list(pieces("x" * 40, 16)) == ["x" * 16, "x" * 16, "x" * 8]


def test_a_text_of_1_2_million_characters_is_counted_in_pieces_close_to_the_whole() -> None:
    counter = TokenCounter.for_model("gpt-4o-mini")
    count = counter.text(LONG)
    # the exact count of the whole, from the tokenizer's backend without its length guard
    exact = len(bpe_openai.get_encoding("o200k_base")._backend.encode(LONG))
    cuts = len(LONG) // defaults.TOKENIZER_PIECE_CHARS + 1
    assert exact <= count <= exact + cuts
    # text that makes more tokens than the tokenizer's per-call limit (200,000) is counted too
    dense = "a b " * 150_000
    assert counter.text(dense) == len(bpe_openai.get_encoding("o200k_base")._backend.encode(dense)) == 300_001


# aiohttp advises (a ResourceWarning, silent outside tests) streaming bodies over 1 MB
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
def test_estimate_and_max_cost_accept_a_1_2_million_character_prompt(tmp_path: Path) -> None:
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": LONG}) + "\n" + json.dumps({"prompt": "short"}) + "\n")
    result = CliRunner().invoke(
        main, ["estimate", str(data), "--model", "gpt-4o-mini", "--max-tokens", "5", "--mock", "--json"]
    )
    assert result.exit_code == 0, result.output
    (model,) = json.loads(result.output)["models"]
    assert model["rows"] == 2 and model["prompt_tokens"] > 250_000
    job = tmp_path / "job"
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(data),
            "--mock",
            "--model",
            "gpt-4o-mini",
            "--max-tokens",
            "5",
            "--max-cost",
            "100",
            "--job-dir",
            str(job),
            "-q",
        ],
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in (0, 1), result.output
    status = json.loads(CliRunner().invoke(main, ["status", str(job), "--json"]).output)
    assert status["ok"] + status["failed"] == 2
