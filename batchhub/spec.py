"""JobSpec: every setting of a job, from a TOML spec file, flags and the environment.

Precedence, highest first: flags (or keyword arguments), the spec file, the
environment (`BATCHHUB_API_KEY`/`OPENAI_API_KEY`, `BATCHHUB_BASE_URL`/`OPENAI_BASE_URL`),
then the defaults in `batchhub.defaults`. `OPENAI_API_KEY` is used only for OpenAI's endpoint
or `$OPENAI_BASE_URL` (see `JobSpec.resolved_api_key`).

A spec file is TOML. Paths in it (`input`, `job_dir`) are relative to the spec
file's folder. Its job directory defaults to the folder named after the spec,
beside it: `jobs/demo.toml` keeps its state in `jobs/demo/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from batchhub import defaults
from batchhub.cache_dir import default_cache_dir
from batchhub.errors import UsageError
from batchhub.objstore import ObjectURL, is_url

if TYPE_CHECKING:
    from batchhub.pricing import PriceBook

#: Request parameters a column may set per row (`param_columns = {PARAM = COLUMN}`).
ROW_PARAMS = ("model", "temperature", "max_tokens", "stop", "user")

#: Settings that shape the requests: changing any of them on resume would mix
#: results of two different jobs, so it is refused (unless forced).
REQUEST_FIELDS = (
    "model",
    "template",
    "prompt_column",
    "messages_column",
    "system",
    "temperature",
    "max_tokens",
    "stop",
    "user",
    "stream",
    "param_columns",
    "params",
)

#: Body fields `params` may not set: the prompt is the job's, and these have their own setting.
RESERVED_PARAMS = {
    "messages": "the prompt comes from --template, --prompt-column or --messages-column",
    "model": "use --model (or a model column via --param-column)",
    "stream": "use --stream",
}

#: Body fields that also have their own setting: either place is fine, not both.
DEDICATED_PARAMS = ("temperature", "max_tokens", "stop", "user")


#: `concurrency = "auto"`
AUTO = "auto"

#: `via`: rows sent one request each to the Chat Completions endpoint, or in files through the Batch API
VIAS = ("live", "batch")


def check_concurrency(value: object) -> None:
    """Refuse a concurrency that is neither "auto" nor a whole number in 1..MAX_CONCURRENCY."""
    if value == AUTO:
        return
    if isinstance(value, int) and not isinstance(value, bool) and value > defaults.MAX_CONCURRENCY:
        raise UsageError(f'concurrency must be at most {defaults.MAX_CONCURRENCY:,} (or "auto"), not {value:,}')
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(
            f'concurrency must be "auto" or a whole number from 1 to {defaults.MAX_CONCURRENCY:,}, not {value!r}'
        )


@dataclass
class JobSpec:
    """Every setting of a job. Build one with `load_spec` / `JobSpec.from_mapping`, or directly."""

    #: a path, or an object's URL (`s3://bucket/key`), kept as a str
    input: Path | str | None = None
    #: a folder on this machine, or (a `str`) an s3:// or gs:// URL: batchhub/remote_job.py
    job_dir: Path | str | None = None
    name: str | None = None

    model: str | None = None
    template: str | None = None
    prompt_column: str | None = None
    messages_column: str | None = None
    system: str | None = None
    param_columns: dict[str, str] = field(default_factory=dict)

    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    user: str | None = None
    stream: bool = False
    #: any other body field, sent as given (a `[params]` table, or `--param key=JSON`)
    params: dict[str, Any] = field(default_factory=dict)

    #: expect a JSON object in each reply's content (else status `invalid_output`)
    json: bool = False
    #: a JSON Schema file each reply's content must validate against (implies `json`)
    json_schema: Path | None = None
    #: send a row again up to this many times when its reply is `invalid_output`
    retry_invalid: int = 0

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    #: requests in flight at once, or "auto": found from the server's latency (batchhub/concurrency.py)
    concurrency: int | str = defaults.CONCURRENCY
    rpm: int | None = None
    tpm: int | None = None
    #: requests per second: `rps * 60` a minute with a burst of at most a second (with `rpm`, both apply)
    rps: int | None = None
    #: seconds of each limit sent at once at most (a job starts with none sent, then paces)
    burst: float = defaults.BURST_S
    max_attempts: int = defaults.MAX_ATTEMPTS
    max_rate_limit_retries: int = defaults.MAX_RATE_LIMIT_RETRIES
    timeout: float = defaults.TIMEOUT_S
    #: most bytes read of one reply (a stream's events together); a larger reply fails its row
    max_response_bytes: int = defaults.MAX_RESPONSE_BYTES
    #: first backoff ceiling in seconds after a 5xx/timeout (doubles per failure, full jitter)
    backoff_base: float = defaults.BACKOFF_BASE_S
    flush_rows: int = defaults.FLUSH_ROWS
    flush_seconds: float = defaults.FLUSH_SECONDS
    stop_grace: float = defaults.STOP_GRACE_S

    #: stop before the job's total cost could pass this many USD
    max_cost: float | None = None
    #: price overrides (a `[prices]` table): model -> {input_per_million, output_per_million, ...}
    prices: dict[str, Any] = field(default_factory=dict)
    #: a JSON or TOML file of price overrides, merged over `prices`
    prices_file: Path | None = None

    retry_failed: bool = False
    #: stop (exit 3) when the run's first results are all the same non-retryable error
    fail_fast: bool = True
    force: bool = False
    #: the reply cache's folder (default: the per-user cache folder, batchhub/cache_dir.py)
    cache: Path | None = None
    #: neither read nor write the reply cache (this job's own replies are still reused)
    no_cache: bool = False
    #: reuse no reply: send every row and let its reply replace the cached one
    fresh: bool = False
    quiet: bool = False

    #: how rows are sent: "live" (the Chat Completions endpoint, the default) or "batch" (the provider's
    #: Batch API: files of requests, half the price, done within 24 hours; batchhub/batch_run.py)
    via: str = "live"
    #: `via = "batch"`: the most requests and bytes of one batch input file (the provider's limits)
    batch_requests: int = defaults.BATCH_REQUESTS
    batch_bytes: int = defaults.BATCH_BYTES
    #: `via = "batch"`: the most seconds between two polls of a live batch
    batch_poll: float = defaults.BATCH_POLL_S
    #: `via = "batch"`: leave a batch's input, output and error files at the provider once its results are
    #: recorded (by default they are deleted: a provider keeps files until then, against the account's storage)
    keep_batch_files: bool = False

    #: settings of the built-in simulator (a `[mock]` table), used when base_url is mock://
    mock: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the one place `stop` is normalised: a string, a tuple (repeated --stop) or a list -> a list
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)

    # -- derived -------------------------------------------------------------

    @property
    def is_mock(self) -> bool:
        return self.resolved_base_url() == defaults.MOCK_BASE_URL

    def resolved_base_url(self) -> str:
        url = (
            self.base_url
            or os.environ.get("BATCHHUB_BASE_URL")
            or os.environ.get("OPENAI_BASE_URL")
            or defaults.DEFAULT_BASE_URL
        )
        return url.rstrip("/") if url != defaults.MOCK_BASE_URL else url

    def resolved_api_key(self) -> str | None:
        """The key for this job's endpoint, without surrounding whitespace; None when it has none.

        `--api-key` (`api_key=`), then BATCHHUB_API_KEY, go to whatever endpoint the job names;
        OPENAI_API_KEY only to OpenAI's, or to $OPENAI_BASE_URL when that is the job's base URL.
        The simulator gets an explicit key or `defaults.MOCK_API_KEY`, never OPENAI_API_KEY.
        """
        key = self.api_key or os.environ.get("BATCHHUB_API_KEY")
        if not key and not self.is_mock and self._openai_key_fits():
            key = os.environ.get("OPENAI_API_KEY")
        if not key:
            return defaults.MOCK_API_KEY if self.is_mock else None
        return key.strip()

    def require_api_key(self) -> str:
        """`resolved_api_key()`, or a UsageError that says which key to set (and never quotes one)."""
        key = self.resolved_api_key()
        if key:
            return key
        url = _without_credentials(self.resolved_base_url())
        if os.environ.get("OPENAI_API_KEY") and not self._openai_key_fits():
            raise UsageError(
                f"OPENAI_API_KEY is sent only to OpenAI ({defaults.OPENAI_BASE_URL}) or to $OPENAI_BASE_URL, "
                f"and this job sends to {url}: set BATCHHUB_API_KEY, or pass --api-key, with the key for it"
            )
        which = "OPENAI_API_KEY (or BATCHHUB_API_KEY)" if self._openai_key_fits() else "BATCHHUB_API_KEY"
        raise UsageError(f"no API key for {url}: set {which}, or pass --api-key")

    def _openai_key_fits(self) -> bool:
        """Whether this job's endpoint is one OPENAI_API_KEY is meant for."""
        url = _endpoint(self.resolved_base_url())
        meant = [defaults.OPENAI_BASE_URL, os.environ.get("OPENAI_BASE_URL") or defaults.OPENAI_BASE_URL]
        return url is not None and url in [_endpoint(m) for m in meant]

    def resolved_job_dir(self) -> Path:
        """The job's folder on this machine: its job directory, or for a job in a bucket, the stage
        where this machine works on it (`job_url()` is then the job's URL)."""
        url = self.job_url()
        if url is not None:
            from batchhub.remote_job import folder_for

            return folder_for(url, "stage")
        if self.job_dir is not None:
            return Path(self.job_dir)
        if self.input is None:
            raise UsageError("no input file given")
        # "reviews.csv.gz" -> reviews; leading dots dropped, so ".hidden.csv" is not "" (jobs/ itself)
        return Path("jobs") / (Path(self.input).name.lstrip(".").split(".")[0] or "job")

    def job_url(self) -> ObjectURL | None:
        """The job directory's URL when it is in a bucket (StorageError for a bad one), else None."""
        if not is_url(self.job_dir):
            return None
        return ObjectURL.parse(str(self.job_dir))

    def request_config(self) -> dict[str, Any]:
        """The settings that shape requests, as JSON-ready values (compared on resume)."""
        return {name: _jsonable(getattr(self, name)) for name in REQUEST_FIELDS}

    def price_book(self) -> PriceBook:
        """Prices for this job: `prices_file` over the spec's `[prices]` over the bundled data."""
        from batchhub.pricing import PriceBook

        return PriceBook.build(self.prices, self.prices_file)

    def to_manifest(self) -> dict[str, Any]:
        """Every setting worth recording in job.json. Never the API key."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("api_key", "quiet", "force", "retry_failed", "fresh"):
                continue
            out[f.name] = _jsonable(getattr(self, f.name))
        # the simulator's accepted key (or any setting named like a secret) is not recorded either
        out["mock"] = {k: v for k, v in out["mock"].items() if not _SECRET_NAME.search(str(k))}
        return out

    # -- validation -----------------------------------------------------------

    def validate(self) -> None:
        """Refuse out-of-range or contradictory settings before anything is read or sent."""
        if self.input is None:
            raise UsageError("no input file: give INPUT or `input = ...` in the spec")
        if self.job_url() is not None and self.via == "batch":
            raise UsageError(
                "--via batch keeps its batches' ledger in a job directory on this machine: "
                "give a local --job-dir, or run live with the job in a bucket"
            )
        sources = [s for s in ("template", "messages_column") if getattr(self, s)]
        if len(sources) > 1 or (sources and self.prompt_column):
            raise UsageError("give only one of --template, --prompt-column and --messages-column")
        check_temperature(self.temperature)
        check_max_tokens(self.max_tokens)
        check_stop(self.stop)
        if self.user is not None and not isinstance(self.user, str):
            raise UsageError("user must be a string")
        check_params(self.params, self)
        if isinstance(self.retry_invalid, bool) or not isinstance(self.retry_invalid, int) or self.retry_invalid < 0:
            raise UsageError(f"retry_invalid must be a whole number, 0 or more, not {self.retry_invalid!r}")
        if not isinstance(self.fail_fast, bool):
            raise UsageError(f"fail_fast must be true or false, not {self.fail_fast!r}")
        if self.retry_invalid and not (self.json or self.json_schema):
            raise UsageError("retry_invalid needs --json or --json-schema (nothing else makes a reply invalid)")
        unknown = set(self.param_columns) - set(ROW_PARAMS)
        if unknown:
            raise UsageError(
                f"param_columns: {', '.join(sorted(unknown))} cannot be set per row (allowed: {', '.join(ROW_PARAMS)})"
            )
        check_concurrency(self.concurrency)
        self._validate_via()
        for name in ("no_cache", "fresh"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if self.no_cache and self.cache is not None:
            raise UsageError("give --cache DIR or --no-cache, not both")
        _positive_int("max_attempts", self.max_attempts)
        _positive_int("flush_rows", self.flush_rows)
        _positive_int("max_response_bytes", self.max_response_bytes)
        if self.max_rate_limit_retries < 0:
            raise UsageError("max_rate_limit_retries must be 0 or more")
        for name in ("rpm", "tpm", "rps"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
                if value > defaults.MAX_LIMIT_COUNT:
                    raise UsageError(f"{name} must be at most {defaults.MAX_LIMIT_COUNT:,}, not {value:,}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, (int, float)) or not 0 < self.burst < math.inf:
            raise UsageError(f"burst must be a positive number of seconds, not {self.burst!r}")
        for name in ("timeout", "flush_seconds", "backoff_base"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise UsageError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.max_cost is not None and (
            isinstance(self.max_cost, bool) or not isinstance(self.max_cost, (int, float)) or not self.max_cost > 0
        ):
            raise UsageError(f"max_cost must be a positive number of USD, not {self.max_cost!r}")
        if self.stop_grace < 0:
            raise UsageError("stop_grace must be 0 or more seconds")
        url = self.resolved_base_url()
        if _has_credentials(url):
            # aiohttp refuses them beside a key, and job.json would keep them: never quote them
            raise UsageError(
                "the base URL contains a user name or password (user:password@host), which batchhub "
                "neither sends nor stores: remove it and give the key with --api-key or BATCHHUB_API_KEY"
            )
        if url != defaults.MOCK_BASE_URL and not url.startswith(("http://", "https://")):
            raise UsageError(f"base_url must start with http:// or https:// (or be mock://), not {url!r}")

    def _validate_via(self) -> None:
        if self.via not in VIAS:
            raise UsageError(f"via must be one of {', '.join(repr(v) for v in VIAS)}, not {self.via!r}")
        _positive_int("batch_requests", self.batch_requests)
        _positive_int("batch_bytes", self.batch_bytes)
        poll = self.batch_poll
        if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0 < poll < math.inf:
            raise UsageError(f"batch_poll must be a positive number of seconds, not {poll!r}")
        if not isinstance(self.keep_batch_files, bool):
            raise UsageError(f"keep_batch_files must be true or false, not {self.keep_batch_files!r}")
        if self.via == "batch" and self.stream:
            raise UsageError("--stream cannot go with --via batch: the Batch API answers whole replies, never streams")

    def reply_cache_dir(self) -> Path | None:
        """The reply cache's folder for this job; None when it uses none (--no-cache, or the cache turned off)."""
        if self.no_cache:
            return None
        return self.cache if self.cache is not None else default_cache_dir()

    @property
    def auto_concurrency(self) -> bool:
        """`concurrency = "auto"`: the limit is found as the job runs."""
        return self.concurrency == AUTO

    @property
    def max_in_flight(self) -> int:
        """The most requests in flight this job may have: its concurrency, or the ceiling of "auto"."""
        return defaults.MAX_CONCURRENCY if self.concurrency == AUTO else int(self.concurrency)

    # -- building ---------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, base_dir: Path | None = None, origin: str = "spec") -> JobSpec:
        """A spec from a mapping (a parsed TOML file or keyword arguments). Unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)} - {"api_key"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"{origin}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        data = dict(data)
        for key in ("input", "job_dir", "prices_file", "json_schema", "cache"):
            if key in ("input", "job_dir") and is_url(data.get(key)):
                continue  # an object's URL: never a Path (`s3://b/k` would be `s3:/b/k`), never relative
            if data.get(key) is not None:
                path = Path(os.path.expanduser(str(data[key])))
                data[key] = path if path.is_absolute() or base_dir is None else base_dir / path
        for key, kind in (("param_columns", dict), ("mock", dict), ("prices", dict), ("params", dict)):
            if key in data and not isinstance(data[key], kind):
                raise UsageError(f"{origin}: {key} must be a table")
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - names are checked above
            raise UsageError(f"{origin}: {exc}") from exc

    def merged(self, overrides: dict[str, Any]) -> JobSpec:
        """A copy with every override that is not None applied (flags win over the file)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "template" in changes or "messages_column" in changes or "prompt_column" in changes:
            # a prompt source given as a flag replaces the file's, whichever kind it was
            for key in ("template", "messages_column", "prompt_column"):
                changes.setdefault(key, None)
        return dataclasses.replace(self, **changes)


def load_spec(path: str | Path) -> JobSpec:
    """Read a TOML job spec. Its job directory defaults to `<folder>/<stem>/` beside it."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise UsageError(f"spec file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"cannot read spec file {path}: {exc.strerror}") from exc
    spec = JobSpec.from_mapping(data, base_dir=path.parent, origin=str(path))
    if spec.job_dir is None:
        spec.job_dir = path.parent / path.stem
    if spec.name is None:
        spec.name = path.stem
    return spec


# -- parameter checks shared by the spec and per-row values -------------------------


def check_temperature(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise UsageError(f"temperature must be a number from 0 to 2, not {value!r}")


def check_max_tokens(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"max_tokens must be a whole number of at least 1, not {value!r}")


def check_stop(value: Any) -> None:
    if value is None:
        return
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise UsageError(f"stop must be a non-empty string or a list of them, not {value!r}")
    if len(items) > 4:
        raise UsageError(f"stop takes at most 4 sequences, not {len(items)}")


def check_params(params: Any, spec: JobSpec | None = None) -> None:
    """Refuse body fields that clash with the job's own settings, and values JSON cannot carry."""
    if not isinstance(params, dict):
        raise UsageError(f"params must be a table of body fields, not {params!r}")
    for key, value in params.items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"params: {key!r} is not a field name")
        if key in RESERVED_PARAMS:
            raise UsageError(f"params: {key} cannot be set here: {RESERVED_PARAMS[key]}")
        if key in DEDICATED_PARAMS and spec is not None and getattr(spec, key) is not None:
            raise UsageError(f"{key} is given twice: as --{key.replace('_', '-')} and in params; keep one")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"params: {key} = {value!r} cannot be sent as JSON ({exc})") from exc
    check_temperature(params.get("temperature"))
    check_max_tokens(params.get("max_tokens"))
    check_max_tokens(params.get("max_completion_tokens"))
    check_stop(params.get("stop"))
    options = params.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise UsageError(f"params: stream_options must be an object, not {options!r}")


def parse_param(text: str) -> tuple[str, Any]:
    """`key=JSON` (a `--param` flag) -> (key, value); the value must be valid JSON."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--param {text!r}: write KEY=JSON, like --param seed=7 or --param 'user=\"me\"'")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        hint = f" (a string needs JSON quotes: --param '{key}=\"{raw}\"')" if raw and raw[0] not in '[{"' else ""
        raise UsageError(f"--param {key}: {raw!r} is not valid JSON: {exc}{hint}") from exc
    return key, value


#: `[mock]` settings never written to job.json: the key the simulator accepts, and anything named like a secret
_SECRET_NAME = re.compile(r"(?i)(key|secret|password|passwd|token)$")


def _has_credentials(url: str) -> bool:
    """Whether a URL carries a user name or password (`scheme://user:pass@host/...`)."""
    try:
        return "@" in urlsplit(url).netloc
    except ValueError:
        return "@" in url.partition("://")[2].partition("/")[0]


def _without_credentials(url: str) -> str:
    """The URL for a message: anything before an `@` in its host part left out."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}{sep}{host.rpartition('@')[2]}{slash}{path}" if sep else url


def _endpoint(url: str) -> tuple[str, str, int | None, str, str] | None:
    """A URL as (scheme, host, port, path, query), as equal as spellings of one endpoint are."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    port = port or {"http": 80, "https": 443}.get(scheme)
    return scheme, parts.hostname or "", port, parts.path.rstrip("/"), parts.query


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a whole number of at least 1, not {value!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
