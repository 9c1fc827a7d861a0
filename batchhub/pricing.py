"""Prices, and the cost of usage.

Where prices come from, in order:

1. `--prices FILE` (JSON or TOML), merged over
2. the job spec's `[prices]` table, merged over
3. the bundled data of `genai-prices` (a maintained, dated price database that
   also maps a dated snapshot name such as `gpt-4o-2024-08-06` to its model, and
   knows cached-input and tiered prices).

An override names a model exactly, or its family: a name that ends in a date
(`-2024-08-06`, `-20240806`) or a four-digit snapshot (`-0613`) falls back to the
name without it. genai-prices applies its own published match rules per model
(snapshot names to their model), and `provider/model` names are looked up at that
provider. Every price reports what it was priced as. Nothing else is guessed: a model no source knows is *unknown*,
never $0, and every report says which models those are and where each price came from.

Override shape (per model, USD per million tokens)::

    {"my-model": {"input_per_million": 1.25, "output_per_million": 10.0, "cached_input_per_million": 0.125}}

A job sent through the Batch API (`via = "batch"`: its results carry a `batch_id`) is
priced at the model's batch price (`lookup(model, batch=True)`): an override's own
`batch_input_per_million`, `batch_output_per_million` (and `batch_cached_input_per_million`)
when it has them; else genai-prices' batch price of the model, where it has one; else the
live price at the providers' published Batch API discount (`defaults.BATCH_DISCOUNT`), and
its source says so.

Tiered prices (a higher rate for every token of a request whose prompt is past a
threshold, as some providers charge) are applied per request.

genai-prices' answers are saved between jobs (`SavedPrices`): importing it and its data
takes ~0.15 s of CPU, a quarter of a job's start-up, and a model priced once that day by
the same genai-prices version is read back instead.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from batchhub import defaults
from batchhub.cache_dir import default_cache_dir
from batchhub.errors import UsageError
from batchhub.manifest import Manifest

BATCH_KEYS = {"batch_input_per_million", "batch_output_per_million", "batch_cached_input_per_million"}
OVERRIDE_KEYS = {"input_per_million", "output_per_million", "cached_input_per_million"} | BATCH_KEYS
#: what genai-prices is told of a request sent through the Batch API
_BATCH_CONTEXT = {"processing": "batch"}
_DATED = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")


@dataclass(frozen=True)
class Rate:
    """USD per million tokens; `tiers` are (prompt-token threshold, rate) pairs applied above the threshold."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()

    def for_prompt(self, prompt_tokens: float) -> float:
        """The rate for one request with this many prompt tokens."""
        rate = self.base
        for start, tier_rate in sorted(self.tiers):
            if prompt_tokens > start:
                rate = tier_rate
        return rate

    def for_prompts(self, prompt_tokens: np.ndarray) -> np.ndarray:
        rate = np.full(len(prompt_tokens), self.base, dtype=np.float64)
        for start, tier_rate in sorted(self.tiers):
            rate[prompt_tokens > start] = tier_rate
        return rate

    def scaled(self, factor: float) -> Rate:
        """This rate with every price times `factor` (the tiers' thresholds kept)."""
        return Rate(self.base * factor, tuple((start, rate * factor) for start, rate in self.tiers))

    def describe(self) -> str:
        text = f"${self.base:g}"
        return text + (" (+tiers)" if self.tiers else "")


@dataclass(frozen=True)
class ModelPrice:
    """The price of one model, and where it came from."""

    model: str
    priced_as: str
    provider: str | None
    input: Rate
    output: Rate
    cached_input: Rate | None
    source: str
    #: the price of a request sent through the Batch API (True) or live
    batch: bool = False

    def costs(
        self, prompt: np.ndarray, completion: np.ndarray, cached: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-request (input USD, output USD) for arrays of token counts (nulls as 0)."""
        prompt = np.asarray(prompt, dtype=np.float64)
        completion = np.asarray(completion, dtype=np.float64)
        cached = np.zeros_like(prompt) if cached is None else np.minimum(np.asarray(cached, dtype=np.float64), prompt)
        cached_rate = (self.cached_input or self.input).for_prompts(prompt)
        input_usd = ((prompt - cached) * self.input.for_prompts(prompt) + cached * cached_rate) / 1e6
        output_usd = completion * self.output.for_prompts(prompt) / 1e6
        return input_usd, output_usd

    def request_cost(self, prompt_tokens: float, completion_tokens: float, cached_tokens: float = 0) -> float:
        """The cost of one request (the same arithmetic as `costs`, without arrays: it runs per response)."""
        cached = min(cached_tokens, prompt_tokens)
        cached_rate = (self.cached_input or self.input).for_prompt(prompt_tokens)
        return (
            (prompt_tokens - cached) * self.input.for_prompt(prompt_tokens)
            + cached * cached_rate
            + completion_tokens * self.output.for_prompt(prompt_tokens)
        ) / 1e6


def _rate(value: Any) -> Rate | None:
    """A genai-prices price (Decimal or TieredPrices) as a Rate."""
    if value is None:
        return None
    tiers = getattr(value, "tiers", None)
    if tiers is not None:
        return Rate(float(value.base), tuple((int(t.start), float(t.price)) for t in tiers))
    return Rate(float(value))


def _check_override(model: str, entry: Any, origin: str) -> dict[str, float]:
    if not isinstance(entry, Mapping):
        raise UsageError(f"{origin}: prices for {model!r} must be a table of {', '.join(sorted(OVERRIDE_KEYS))}")
    unknown = set(entry) - OVERRIDE_KEYS
    if unknown:
        raise UsageError(
            f"{origin}: unknown price key(s) {', '.join(sorted(unknown))} for {model!r} "
            f"(known: {', '.join(sorted(OVERRIDE_KEYS))})"
        )
    for key in ("input_per_million", "output_per_million"):
        if key not in entry:
            raise UsageError(f"{origin}: prices for {model!r} need {key}")
    if BATCH_KEYS & set(entry):
        for key in ("batch_input_per_million", "batch_output_per_million"):
            if key not in entry:
                raise UsageError(f"{origin}: batch prices for {model!r} need {key} too")
    out = {}
    for key, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise UsageError(f"{origin}: {key} for {model!r} must be a number >= 0, not {value!r}")
        out[key] = float(value)
    return out


def load_prices_file(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a price override file (JSON, or TOML by its .toml extension)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read prices file {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode()) if path.suffix.lower() == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"prices file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from exc
    if not isinstance(data, dict):
        raise UsageError(f"prices file {path} must hold a table of model -> prices")
    return {str(m): _check_override(str(m), e, str(path)) for m, e in data.items()}


def _rate_record(rate: Rate | None) -> list[Any] | None:
    return None if rate is None else [rate.base, [list(t) for t in rate.tiers]]


def _rate_of(record: Any) -> Rate | None:
    if record is None:
        return None
    base, tiers = record
    return Rate(float(base), tuple((int(start), float(rate)) for start, rate in tiers))


class SavedPrices:
    """genai-prices' answers kept in one small JSON file per genai-prices version, by model and UTC day.

    Only answers that cannot change within the day are saved: a model whose price depends on
    the time of day (off-peak rates) or on anything but the date is looked up every time. A
    file that cannot be read or written is no error: the price is looked up as without it.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._saved: dict[str, Any] | None = None

    @classmethod
    def default(cls) -> SavedPrices:
        folder = default_cache_dir()
        return cls(None if folder is None else folder / f"prices-genai-prices-{_genai_prices_version()}.json")

    def _all(self) -> dict[str, Any]:
        if self._saved is None:
            self._saved = {}
            if self.path is not None:
                try:
                    loaded = json.loads(self.path.read_bytes())
                except (OSError, ValueError):
                    loaded = None
                self._saved = loaded if isinstance(loaded, dict) else {}
        return self._saved

    def get(self, key: str) -> tuple[bool, ModelPrice | None]:
        """(found, price) for `key` (`model@day`, `model@day@batch` for the batch price); a record that
        does not read as a price is not found."""
        if key not in self._all():
            return False, None
        record = self._all()[key]
        if record is None:
            return True, None
        batch = key.endswith("@batch")
        try:
            model = key.removesuffix("@batch").rpartition("@")[0]
            kind = record.get("kind", "live")
            input_rate, output_rate = _rate_of(record["input"]), _rate_of(record["output"])
            if input_rate is None or output_rate is None or kind not in _KINDS or (kind != "live") != batch:
                return False, None
            return True, ModelPrice(
                model=model,
                priced_as=str(record["priced_as"]),
                provider=record["provider"],
                input=input_rate,
                output=output_rate,
                cached_input=_rate_of(record["cached_input"]),
                source=_genai_prices_source(kind),
                batch=batch,
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return False, None

    def put(self, key: str, price: ModelPrice | None, kind: str = "live") -> None:
        """Save `price` (None: no source knows the model) under `key`; `kind` is where a price came
        from (`_KINDS`)."""
        saved = self._all()
        if len(saved) >= defaults.SAVED_PRICES_MAX:  # a key a model a day: start afresh rather than grow for ever
            saved.clear()
        saved[key] = (
            None
            if price is None
            else {
                "priced_as": price.priced_as,
                "provider": price.provider,
                "input": _rate_record(price.input),
                "output": _rate_record(price.output),
                "cached_input": _rate_record(price.cached_input),
                "kind": kind,
            }
        )
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".prices-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(saved, fh, separators=(",", ":"))
                os.replace(tmp, self.path)  # whole or not at all: another job may read it now
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass  # a read-only or full disk: the next job looks the price up again


#: where a genai-prices price came from: its live price, its batch price, its live price at the
#: published Batch API discount
_KINDS = ("live", "batch", "discount")


def _genai_prices_source(kind: str) -> str:
    """A genai-prices price's source as reports print it."""
    version = _genai_prices_version()
    if kind == "batch":
        return f"genai-prices {version} batch price (bundled data)"
    if kind == "discount":
        return f"genai-prices {version} live price {discount_note()}"
    return f"genai-prices {version} (bundled data)"


def discount_note() -> str:
    """How a batch price that no source gives is made: "at the published 50% Batch API discount"."""
    return f"at the published {1 - defaults.BATCH_DISCOUNT:.0%} Batch API discount"


def _day(when: datetime | None) -> date:
    """The UTC day genai-prices prices a request of `when` (None: now) at."""
    if when is None:
        return datetime.now(UTC).date()
    return when.astimezone(UTC).date() if when.tzinfo is not None else when.date()


def _same_all_day(model_info: Any) -> bool:
    """Whether a genai-prices model's prices depend on nothing but the date (none, or start dates only),
    its price variants (the batch price) included."""
    from genai_prices.types import StartDateConstraint

    prices = getattr(model_info, "prices", None)
    variants = getattr(model_info, "price_variants", None)
    conditional = [*(prices if isinstance(prices, list) else ()), *(variants if isinstance(variants, list) else ())]
    return all(getattr(p, "constraint", None) is None or type(p.constraint) is StartDateConstraint for p in conditional)


def _has_batch_variant(calc: Any, when: datetime | None) -> bool:
    """Whether genai-prices priced `calc` with a batch price of its own, rather than returning the live
    price unchanged: the model has a price variant for batch processing that applies on that day (and
    the model is its provider's own, not one it falls back to, whose variants genai-prices ignores)."""
    if not any(model is calc.model for model in getattr(calc.provider, "models", ())):
        return False
    at = when if when is not None else datetime.now(UTC)
    for variant in getattr(calc.model, "price_variants", None) or ():
        if variant.constraint is not None and not variant.constraint.active(at):
            continue
        if not all(_BATCH_CONTEXT.get(key) == value for key, value in variant.when.items()):
            continue
        if any(price is not None for price in vars(variant.prices).values()):
            return True
    return False


def _genai_prices_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genai-prices")
    except PackageNotFoundError:  # pragma: no cover - a declared dependency
        return "unknown"


@dataclass
class PriceBook:
    """Looks up model prices: overrides first, then genai-prices' bundled data."""

    overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    override_sources: dict[str, str] = field(default_factory=dict)
    _cache: dict[str, ModelPrice | None] = field(default_factory=dict, repr=False)
    #: genai-prices' answers of earlier jobs (None: $BATCHHUB_CACHE's, read at the first lookup)
    saved: SavedPrices | None = field(default=None, repr=False)

    @classmethod
    def build(cls, spec_prices: Mapping[str, Any] | None = None, prices_file: str | Path | None = None) -> PriceBook:
        """Spec `[prices]` merged over the defaults, then `--prices FILE` over both."""
        book = cls()
        if spec_prices:
            for model, entry in spec_prices.items():
                book.overrides[str(model)] = _check_override(str(model), entry, "spec [prices]")
                book.override_sources[str(model)] = "spec [prices]"
        if prices_file is not None:
            for model, entry in load_prices_file(prices_file).items():
                book.overrides[model] = entry
                book.override_sources[model] = f"--prices {prices_file}"
        return book

    def to_record(self) -> dict[str, Any]:
        """The override table and where each entry came from, as recorded in job.json."""
        return {"overrides": self.overrides, "sources": self.override_sources}

    @classmethod
    def for_job(cls, manifest: Manifest, prices_file: str | Path | None = None) -> PriceBook:
        """The prices a job ran with, from its job.json, with a reader's `--prices FILE` over them.

        The override table is recorded at run time, so a relative or since-moved prices file is
        never read again. A job recorded before that is priced from its spec as it was saved.
        """
        recorded = manifest.prices
        if recorded is None or not isinstance(recorded.get("overrides"), dict):
            saved = manifest.spec
            return cls.build(saved.get("prices") or {}, prices_file or saved.get("prices_file"))
        book = cls()
        sources = recorded.get("sources")
        if not isinstance(sources, dict):
            sources = {}
        for model, entry in recorded["overrides"].items():
            book.overrides[str(model)] = _check_override(str(model), entry, "job.json prices")
            book.override_sources[str(model)] = f"{sources.get(model, 'prices')} (recorded in job.json)"
        if prices_file is not None:
            for model, entry in load_prices_file(prices_file).items():
                book.overrides[model] = entry
                book.override_sources[model] = f"--prices {prices_file}"
        return book

    @property
    def default_source(self) -> str:
        return f"genai-prices {_genai_prices_version()} (bundled data)"

    @property
    def label(self) -> str:
        """Where this book's prices come from, in one line."""
        if not self.overrides:
            return self.default_source
        by_source: dict[str, list[str]] = {}
        for model, source in self.override_sources.items():
            by_source.setdefault(source, []).append(model)
        parts = [f"{source} for {', '.join(sorted(models))}" for source, models in by_source.items()]
        return "; ".join([*parts, self.default_source])

    def lookup(self, model: str, when: datetime | None = None, *, batch: bool = False) -> ModelPrice | None:
        """The price of `model` (`batch`: of a request sent through the Batch API), or None when no source
        knows it."""
        key = f"{model}@{when.date() if when else ''}" + ("@batch" if batch else "")
        if key not in self._cache:
            self._cache[key] = self._lookup(model, when, batch)
        return self._cache[key]

    def _lookup(self, model: str, when: datetime | None, batch: bool) -> ModelPrice | None:
        for name in (model, _DATED.sub("", model)):
            entry = self.overrides.get(name)
            if entry is not None:
                return self._from_override(model, name, entry, batch)
        return self._from_genai_prices(model, when, batch)

    def _from_override(self, model: str, name: str, entry: dict[str, float], batch: bool) -> ModelPrice:
        """An override's price; its batch price: its own batch rates, else its live rates at the discount."""
        source = self.override_sources.get(name, "override")
        prefix = "batch_" if batch and "batch_input_per_million" in entry else ""
        cached = entry.get(f"{prefix}cached_input_per_million")
        price = ModelPrice(
            model=model,
            priced_as=name,
            provider=None,
            input=Rate(entry[f"{prefix}input_per_million"]),
            output=Rate(entry[f"{prefix}output_per_million"]),
            cached_input=Rate(cached) if cached is not None else None,
            source=f"{source} batch prices" if prefix else source,
            batch=batch,
        )
        if batch and not prefix:
            return _discounted(price, f"{source} {discount_note()}")
        return price

    def _from_genai_prices(self, model: str, when: datetime | None, batch: bool) -> ModelPrice | None:
        if self.saved is None:
            self.saved = SavedPrices.default()
        key = f"{model}@{_day(when).isoformat()}" + ("@batch" if batch else "")
        found, saved = self.saved.get(key)
        if found:
            return saved

        from genai_prices import Usage, calc_price

        usage = Usage(input_tokens=1, output_tokens=1)
        provider, _, name = model.rpartition("/")
        context = _BATCH_CONTEXT if batch else None
        try:
            if provider:  # "openai/gpt-4o": a provider-qualified name, as LiteLLM writes them
                calc = calc_price(
                    usage, name, provider_id=provider, genai_request_timestamp=when, price_context=context
                )
            else:
                calc = calc_price(usage, model, genai_request_timestamp=when, price_context=context)
        except (LookupError, ValueError):
            self.saved.put(key, None)  # unknown to this genai-prices version, whatever the time
            return None
        price = calc.model_price
        input_rate = _rate(getattr(price, "input_mtok", None))
        output_rate = _rate(getattr(price, "output_mtok", None))
        if input_rate is None or output_rate is None:
            return None
        kind = ("batch" if _has_batch_variant(calc, when) else "discount") if batch else "live"
        found_price = ModelPrice(
            model=model,
            priced_as=calc.model.id,
            provider=calc.provider.id,
            input=input_rate,
            output=output_rate,
            cached_input=_rate(getattr(price, "cache_read_mtok", None)),
            source=_genai_prices_source(kind),
            batch=batch,
        )
        if kind == "discount":  # the live price, returned unchanged: at the published discount
            found_price = _discounted(found_price, found_price.source)
        if _same_all_day(calc.model):
            self.saved.put(key, found_price, kind)
        return found_price


def _discounted(price: ModelPrice, source: str) -> ModelPrice:
    """A live price at the published Batch API discount, as the batch price of a model no source gives one."""
    factor = defaults.BATCH_DISCOUNT
    return replace(
        price,
        input=price.input.scaled(factor),
        output=price.output.scaled(factor),
        cached_input=None if price.cached_input is None else price.cached_input.scaled(factor),
        source=source,
        batch=True,
    )


@dataclass
class ModelCost:
    model: str
    priced_as: str | None
    provider: str | None
    source: str | None
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    input_usd: float | None
    output_usd: float | None
    total_usd: float | None
    #: how these replies were sent: "live", or "batch" (through the Batch API, at its price)
    via: str = "live"


@dataclass
class CostReport:
    """Cost by model. `total_usd` covers known prices only; `unknown_models` lists the rest."""

    models: list[ModelCost]
    total_usd: float
    unknown_models: list[str]
    responses_without_usage: int
    sources: list[str]
    #: the part of total_usd charged at worst case rather than reported, and over how many results
    assumed_usd: float = 0.0
    assumed_results: int = 0
    #: replies reused rather than sent (the `reused` column): from this job's other rows, from the reply
    #: cache. They are not in the figures above; `saved_usd` is what they would have cost priced as
    #: those are (known prices only; `saved_unknown_models` lists the rest), `saved_models` by model
    reused_from_job: int = 0
    reused_from_cache: int = 0
    saved_usd: float = 0.0
    saved_models: list[ModelCost] = field(default_factory=list)
    saved_unknown_models: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unknown_models

    @property
    def reused_replies(self) -> int:
        """Replies reused rather than sent, from this job and from the cache."""
        return self.reused_from_job + self.reused_from_cache

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"complete": self.complete, "reused_replies": self.reused_replies}


def cost_of(
    models: pa.Array | pa.ChunkedArray,
    prompt: np.ndarray,
    completion: np.ndarray,
    cached: np.ndarray | None,
    book: PriceBook,
    when: datetime | None = None,
    *,
    batch: bool = False,
) -> CostReport:
    """Price usage arrays (one entry per response; nulls already dropped) by model (`batch`: replies of
    the Batch API, at its price).

    `models` is a string column (no nulls); it is dictionary-encoded, so a job's few
    model names are looked up once each, not once per response.
    """
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(models.combine_chunks() if isinstance(models, pa.ChunkedArray) else models)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    cached_all = np.zeros(len(prompt), dtype=np.int64) if cached is None else cached
    lines: list[ModelCost] = []
    unknown: list[str] = []
    sources: set[str] = set()
    total = 0.0
    for code, model in sorted(enumerate(encoded.dictionary.to_pylist()), key=lambda pair: str(pair[1])):
        mask = codes == code
        p, c, k = prompt[mask], completion[mask], cached_all[mask]
        price = book.lookup(model, when, batch=batch)
        line = ModelCost(
            model=model,
            priced_as=price.priced_as if price else None,
            provider=price.provider if price else None,
            source=price.source if price else None,
            requests=int(mask.sum()),
            prompt_tokens=int(p.sum()),
            cached_tokens=int(k.sum()),
            completion_tokens=int(c.sum()),
            input_usd=None,
            output_usd=None,
            total_usd=None,
            via="batch" if batch else "live",
        )
        if price is None:
            unknown.append(model)
        else:
            i, o = price.costs(p, c, k)
            line.input_usd, line.output_usd = float(i.sum()), float(o.sum())
            line.total_usd = line.input_usd + line.output_usd
            total += line.total_usd
            sources.add(price.source)
        lines.append(line)
    return CostReport(lines, total, unknown, 0, sorted(sources))
