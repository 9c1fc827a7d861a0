"""genai-prices' answers saved between jobs: the same prices, without importing genai-prices again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from jobprocs import child_env

from batchhub.cache_dir import CACHE_ENV
from batchhub.pricing import PriceBook, SavedPrices

MODELS = ["gpt-4o-mini", "gpt-4o-mini-2024-07-18", "openai/gpt-4o", "totally-made-up-model"]


def saved_in(folder: Path) -> SavedPrices:
    path = SavedPrices.default().path
    assert path is not None
    return SavedPrices(folder / path.name)


def test_a_saved_price_is_the_price_genai_prices_gives(tmp_path: Path) -> None:
    first = PriceBook(saved=saved_in(tmp_path))
    fresh = [first.lookup(m) for m in MODELS]
    assert fresh[0] is not None and fresh[-1] is None
    again = PriceBook(saved=saved_in(tmp_path))  # reads the file the first one wrote
    assert [again.lookup(m) for m in MODELS] == fresh
    assert len(json.loads(next(tmp_path.iterdir()).read_text())) == len(MODELS)


def test_a_new_process_prices_a_saved_model_without_importing_genai_prices(tmp_path: Path) -> None:
    code = (
        "import json, sys; from batchhub.pricing import PriceBook; p = PriceBook().lookup('gpt-4o-mini'); "
        "print(json.dumps([p.input.base, p.output.base, p.priced_as, 'genai_prices' in sys.modules]))"
    )
    env = child_env() | {CACHE_ENV: str(tmp_path)}
    runs = [json.loads(subprocess.check_output([sys.executable, "-c", code], env=env, text=True)) for _ in range(2)]
    assert runs[0][3] is True and runs[1][3] is False
    assert runs[0][:3] == runs[1][:3]


@pytest.mark.parametrize("value", ["off", "", "  "])
def test_saving_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(CACHE_ENV, value)
    assert SavedPrices.default().path is None
    assert PriceBook().lookup("gpt-4o-mini") is not None


def test_a_damaged_or_unwritable_file_only_costs_a_lookup(tmp_path: Path) -> None:
    saved = saved_in(tmp_path)
    assert saved.path is not None
    saved.path.write_text('{"gpt-4o-mini@' + datetime.now(UTC).date().isoformat() + '": {"input": "x"}')
    price = PriceBook(saved=saved).lookup("gpt-4o-mini")
    assert price == PriceBook(saved=SavedPrices(None)).lookup("gpt-4o-mini")
    wrong = saved_in(tmp_path)
    assert wrong.path is not None
    wrong.path.write_text(json.dumps({f"gpt-4o-mini@{datetime.now(UTC).date()}": {"input": [1, []]}}))
    assert PriceBook(saved=saved_in(tmp_path)).lookup("gpt-4o-mini") == price  # a record short of fields
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert PriceBook(saved=SavedPrices(blocked / "sub" / "prices.json")).lookup("gpt-4o-mini") == price


def test_a_price_that_changes_with_the_time_of_day_is_not_saved(tmp_path: Path) -> None:
    saved = saved_in(tmp_path)
    book = PriceBook(saved=saved)
    assert book.lookup("deepseek-chat") is not None  # off-peak rates: priced by the hour
    assert book.lookup("gpt-4o-mini") is not None
    on_disk = json.loads(next(tmp_path.iterdir()).read_text())
    assert [key.split("@")[0] for key in on_disk] == ["gpt-4o-mini"]


def test_prices_are_saved_by_day(tmp_path: Path) -> None:
    """A model whose price changed on a date: each day's lookup is saved and read back as that day's."""
    then, now = datetime(2024, 6, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)
    book = PriceBook(saved=saved_in(tmp_path))
    prices = {when: book.lookup("gpt-4o", when) for when in (then, now)}
    again = PriceBook(saved=saved_in(tmp_path))
    assert {when: again.lookup("gpt-4o", when) for when in (then, now)} == prices
    assert sorted(json.loads(next(tmp_path.iterdir()).read_text())) == ["gpt-4o@2024-06-01", "gpt-4o@2026-11-01"]


def test_the_tests_never_write_the_users_cache(cache_folder: Path) -> None:
    assert Path(os.environ[CACHE_ENV]) == cache_folder  # tests/conftest.py: a folder of each test's
    assert Path(tempfile.gettempdir()) in cache_folder.parents


def test_the_file_starts_afresh_rather_than_grow_for_ever(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batchhub.defaults.SAVED_PRICES_MAX", 3)
    book = PriceBook(saved=saved_in(tmp_path))
    for day in range(1, 6):
        book.lookup("gpt-4o-mini", datetime(2026, 1, day, tzinfo=UTC))
    kept = sorted(json.loads(next(tmp_path.iterdir()).read_text()))
    assert kept == ["gpt-4o-mini@2026-01-04", "gpt-4o-mini@2026-01-05"]
