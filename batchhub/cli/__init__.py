"""The `batchhub` command: parse options into a JobSpec, call the library, print, exit.

The command group and the job commands live here; `batchhub cache` and `batchhub mock-server` in
modules of their own beside it (batchhub/cli/cache.py, batchhub/cli/mock_server.py). Only this
package imports click.

Library errors become one line on stderr and the exit code of `batchhub.errors`:
0 all rows ok, 1 finished with failed rows, 2 usage or input error, 3 stopped early (resumable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from batchhub import __version__, eventloop
from batchhub.errors import EXIT_STOPPED, BatchhubError, UsageError
from batchhub.objstore import fetched, written_to
from batchhub.options import Engine, build_spec, job_dir_of
from batchhub.spec import JobSpec, parse_param


class BatchhubGroup(click.Group):
    """The `batchhub` group: a library error from any command becomes one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchhubError as exc:
            from batchhub.remote_job import in_words  # a job in a bucket is named by its URL

            message = in_words(str(exc)).replace("\n", " ")
            click.echo(f"error: {message}", err=True)
            sys.exit(exc.exit_code)


def option_pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise click.BadParameter(f"expected {what}, got {item!r}")
        out[key.strip()] = value.strip()
    return out


class _Concurrency(click.ParamType):  # type: ignore[type-arg]
    """`--concurrency N` or `auto`: a number becomes an int; any other word is left for the spec's check
    (one line naming what is allowed, as a wrong value in a spec file gets)."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value).strip()
        if text.lower() == "auto":
            return "auto"
        try:
            return int(text)
        except ValueError:
            return text


CONCURRENCY = _Concurrency()


class _PathOrURL(click.ParamType):  # type: ignore[type-arg]
    """A path on this machine (a `Path`) or an s3:// or gs:// URL (kept a `str`: `Path` would fold its `//`)."""

    name = "PATH|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from batchhub.objstore import is_url

        if isinstance(value, Path) or not is_url(value):
            return Path(value)
        return str(value)


PATH_OR_URL = _PathOrURL()


@click.group(cls=BatchhubGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchhub")
def main() -> None:
    """Run a dataset of prompts through a Chat Completions API as one resumable, rate-limited job."""


JOB_OPTIONS = [
    click.option("--model", help="Model name sent with every request (a --param-column may set it per row)."),
    click.option("--template", help='Prompt template over columns, e.g. "Classify: {review}".'),
    click.option("--prompt-column", help="Column holding the prompt text (default: prompt)."),
    click.option("--messages-column", help="Column holding a list of chat messages (or its JSON text)."),
    click.option("--system", help="System message put before every prompt."),
    click.option(
        "--param-column",
        "param_columns",
        multiple=True,
        metavar="PARAM=COLUMN",
        help="Let a column set model, temperature, max_tokens, stop or user per row. Repeatable.",
    ),
    click.option(
        "--param",
        "params",
        multiple=True,
        metavar="KEY=JSON",
        help='Any other body field, as JSON: --param seed=7, --param \'response_format={"type":"json_object"}\'. '
        "Repeatable; merged over the spec's [params].",
    ),
    click.option(
        "--json-schema",
        type=click.Path(path_type=Path),
        help="JSON Schema file each reply's content must match (replies that do not: status invalid_output).",
    ),
    click.option(
        "--retry-invalid",
        type=int,
        metavar="N",
        help="Send a row again up to N times when its reply is invalid_output (each reply is paid for).",
    ),
    click.option(
        "--base-url",
        help="API base URL (default: $BATCHHUB_BASE_URL, $OPENAI_BASE_URL, then https://ai-tokenhub.com/v1).",
    ),
    click.option(
        "--api-key", help="API key (prefer $BATCHHUB_API_KEY: a flag is visible to other users of the machine)."
    ),
    click.option(
        "--job-dir",
        type=PATH_OR_URL,
        help="Where the job keeps its state (default: jobs/NAME): a folder, or an s3:// or gs:// URL.",
    ),
    click.option(
        "--concurrency",
        type=CONCURRENCY,
        metavar="N|auto",
        help="Requests in flight at once (default 32), or auto: found from the server's latency "
        "(for a self-hosted server with a capacity).",
    ),
    click.option("--rpm", type=int, help="Requests-per-minute limit to stay under."),
    click.option("--tpm", type=int, help="Tokens-per-minute limit to stay under."),
    click.option(
        "--rps", type=int, help="Requests-per-second limit to stay under (a burst of at most 1 s; with --rpm, both)."
    ),
    click.option(
        "--burst",
        type=float,
        metavar="SECONDS",
        help="Seconds of each limit sent at once at most, then paced (default 0.5).",
    ),
    click.option(
        "--max-attempts", type=int, help="Attempts per row for 5xx, timeouts and garbled responses (default 5)."
    ),
    click.option("--timeout", type=float, help="Seconds one request may take (default 120)."),
    click.option(
        "--max-response-bytes",
        type=int,
        help="Most bytes read of one reply; a larger one fails its row (default 16 MiB).",
    ),
    click.option("--temperature", type=float, help="Sampling temperature, 0 to 2."),
    click.option("--max-tokens", type=int, help="Most completion tokens per request."),
    click.option("--stop", multiple=True, help="Stop sequence (repeat for up to 4)."),
    click.option("--user", help="End-user id sent with each request."),
    click.option("--stream/--no-stream", default=None, help="Use Server-Sent Events streaming."),
    click.option("--retry-failed", is_flag=True, default=None, help="Send again the rows that failed in earlier runs."),
    click.option(
        "--fail-fast/--no-fail-fast",
        default=None,
        help="Stop (exit 3, rows left pending) when a run's first results are all the same 4xx error "
        "(default); --no-fail-fast when such failures really are per row.",
    ),
    click.option(
        "--force",
        is_flag=True,
        default=None,
        help="Changed request settings: keep each row's result made under the settings replaced (never another "
        "row's); without it, a changed input or changed settings resume too, sending only new requests.",
    ),
    click.option(
        "--cache",
        type=click.Path(path_type=Path),
        metavar="DIR",
        help="The reply cache's folder (default: $BATCHHUB_CACHE, else ~/.cache/batchhub).",
    ),
    click.option(
        "--no-cache",
        is_flag=True,
        default=None,
        help="Neither read nor write the reply cache (the job's own replies are still reused).",
    ),
    click.option(
        "--fresh",
        is_flag=True,
        default=None,
        help="Reuse no reply: send every row without a result and let its reply replace the cached one.",
    ),
    click.option(
        "--via",
        type=click.Choice(["live", "batch"]),
        default=None,
        help="How rows are sent: live (the Chat Completions endpoint, default) or batch (the provider's Batch "
        "API: half the price, done within 24 hours; run again to collect).",
    ),
    click.option(
        "--batch-requests", type=int, metavar="N", help="--via batch: most requests per batch file (default 50000)."
    ),
    click.option(
        "--batch-bytes", type=int, metavar="BYTES", help="--via batch: most bytes per batch file (default 200,000,000)."
    ),
    click.option(
        "--batch-poll",
        type=float,
        metavar="SECONDS",
        help="--via batch: most seconds between two polls of a live batch (default 60).",
    ),
    click.option(
        "--keep-batch-files",
        is_flag=True,
        default=None,
        help="--via batch: leave each batch's files at the provider (by default deleted once its results are "
        "recorded).",
    ),
    click.option("--flush-rows", type=int, help="Write a checkpoint part every N results (default 5000)."),
    click.option("--flush-seconds", type=float, help="... or every T seconds, whichever comes first (default 30)."),
    click.option("--quiet", "-q", is_flag=True, default=None, help="No progress bar."),
    click.option(
        "--prices",
        "prices_file",
        type=click.Path(path_type=Path),
        help="JSON or TOML file of model prices (USD per million tokens), merged over the bundled ones.",
    ),
    click.option(
        "--mock", is_flag=True, default=False, help="Send to the built-in simulated endpoint (no key, no network)."
    ),
]


#: `run --json`; `estimate` keeps `--json` for printing its report as JSON (the reply check changes no estimate)
EXPECT_JSON = click.option(
    "--json", "json", is_flag=True, default=None, help="Expect a JSON object in each reply's content."
)


def job_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options that define a job, shared by `run` and `estimate`."""
    for option in reversed(JOB_OPTIONS):
        command = option(command)
    return command


@main.command(short_help="Run a job, or resume it: send the rows without a result.")
@click.argument("input_or_spec", type=click.Path(path_type=str))  # str: an s3:// URL is no Path
@job_options
@EXPECT_JSON
@click.option("--max-cost", type=float, help="Stop before the job's total cost could pass this many USD.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help='Where to run: this process, or a Ray cluster (pip install "batchhub[ray]"), one task per input shard.',
)
@click.option("--ray-address", help="Ray cluster to join with --engine ray (e.g. auto; default: Ray's own choice).")
@click.option("--shard-rows", type=int, help="Rows per input shard, one Ray task each (default 10000).")
@click.option("--max-shards-in-flight", type=int, help="Ray tasks running at once (default: the cluster's CPUs).")
def run(input_or_spec: str, **options: Any) -> None:
    """Run a job, or resume it: INPUT_OR_SPEC is a CSV, Parquet or JSONL file, or a TOML job spec.

    Running the same command again resumes: only rows without a result are sent.
    Exit codes: 0 all rows ok, 1 some rows failed, 2 bad usage or input, 3 stopped early (resumable).

    \b
    Examples:
      # a CSV, a model and a prompt template over its columns (run it again to resume)
      batchhub run reviews.csv --model gpt-4o-mini --template 'Classify: {review}'
      # the demo job on the built-in simulator (no key, no network)
      batchhub run jobs/demo.toml --mock
      # stay under rate limits and a budget; send the failed rows again
      batchhub run jobs/demo.toml --rpm 500 --tpm 200000 --max-cost 5 --retry-failed
    """
    from batchhub.runner import prepare_job
    from batchhub.summary import resume_lines, summary_lines

    eventloop.choice()  # a bad $BATCHHUB_EVENT_LOOP is refused before the job directory is touched
    where = Engine.from_options(options, flags=True)  # takes the engine's options out of the job's
    spec = _spec_from_cli(input_or_spec, options)
    prepared = prepare_job(spec)
    job = where.make_job(prepared)
    verb = "resuming" if prepared.resumed else "starting"
    if not spec.quiet:
        rows = "rows counted as it runs" if prepared.n_rows is None else f"{prepared.n_rows:,} rows"
        click.echo(f"{verb} job {prepared.store.location} ({rows}, {prepared.source.format})", err=True)
    with eventloop.settled_gc():  # this process runs this one job
        summary = _run_until_done(job.run(), job.request_stop)
    for line in summary_lines(summary, prepared.prices.label, quiet=spec.quiet):
        click.echo(line, err=True)
    if summary.exit_code == EXIT_STOPPED:
        for line in resume_lines(sys.argv[1:]):
            click.echo(line, err=True)
    sys.exit(summary.exit_code)


def _run_until_done(coro: Any, on_signal: Callable[[], None]) -> Any:
    """Run a job coroutine with Ctrl-C and SIGTERM asking it to stop (not killing it)."""

    async def go() -> Any:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            # not possible off the main thread or on some platforms: Ctrl-C then simply ends the process
            # (asyncio says so with RuntimeError or NotImplementedError, uvloop with ValueError)
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal)
                installed.append((sig, previous))
        try:
            return await coro
        finally:
            # as they were: a closed uvloop loop keeps its handler installed, and a later Ctrl-C in this
            # process (a script or test calling the CLI again, or `batchhub.run()`) would reach the dead loop
            for sig, previous in installed:
                loop.remove_signal_handler(sig)
                if previous is not None:
                    signal.signal(sig, previous)

    try:
        return eventloop.run(go())
    finally:
        coro.close()  # never started when the loop was refused: no "never awaited" warning (else a no-op)


def _spec_from_cli(target: str, options: dict[str, Any]) -> JobSpec:
    """The job's flags parsed into `build_spec` options (a repeatable flag not given is None)."""
    given = {name: (value or None) if isinstance(value, tuple) else value for name, value in options.items()}
    if given["param_columns"]:
        given["param_columns"] = option_pairs(given["param_columns"], "PARAM=COLUMN")
    if given["params"]:
        given["params"] = dict(parse_param(text) for text in given["params"])
    return build_spec(target, given, origin="the command line")


@main.command(short_help="Show a job's rows by status, errors, tokens, cost and time.")
@click.argument("job_dir", type=PATH_OR_URL)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(job_dir: Path | str, as_json: bool) -> None:
    """Show a job's rows by status, tokens used, cost and time spent: JOB_DIR is a job directory or its spec."""
    from batchhub.status import job_status, render

    status = job_status(job_dir_of(job_dir))
    if isinstance(job_dir, str):  # a URL: say the job's name, not where this machine keeps its copy
        status.job_dir = job_dir
    click.echo(json.dumps(status.to_dict(), indent=2) if as_json else render(status))


@main.command(short_help="Write input and results to one file, in input order.")
@click.argument("job_dir", type=PATH_OR_URL)
@click.option(
    "-o",
    "--output",
    required=True,
    type=PATH_OR_URL,
    help="Output file: .parquet, .csv or .jsonl; a path, or an s3:// or gs:// URL.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "csv", "jsonl", "openai-batch"]),
    help="Output format (default: from the extension). openai-batch: one OpenAI Batch output line per finished row.",
)
@click.option(
    "--expand-json",
    is_flag=True,
    help="Spread the top-level keys of each reply's JSON object into columns (a clashing name gets a json_ prefix).",
)
@click.option(
    "--id-column",
    help="For openai-batch: the input column to use as custom_id (default: custom_id, else the row number).",
)
@click.option("--force", is_flag=True, help="Export even if the input file changed since the job ran.")
def export(
    job_dir: Path | str, output: Path | str, fmt: str | None, expand_json: bool, id_column: str | None, force: bool
) -> None:
    """Write one file in input order: the input columns and the result columns. JOB_DIR is a job
    directory or its spec.

    With --format openai-batch, write the OpenAI Batch API's output format instead:
    one line per finished row, {"id", "custom_id", "response": {"status_code",
    "request_id", "body"}, "error"}.
    """
    from batchhub.export import export_job, export_openai_batch

    if fmt == "openai-batch":
        if expand_json:
            raise UsageError("--expand-json makes columns; it does not apply to --format openai-batch")
        with written_to(output) as path:
            rows = export_openai_batch(job_dir_of(job_dir), path, id_column=id_column, force=force)
    else:
        if id_column is not None:
            raise UsageError("--id-column applies only to --format openai-batch")
        target = job_dir_of(job_dir)
        with written_to(output) as path:
            rows = export_job(target, path, format=fmt, force=force, expand_json=expand_json)  # type: ignore[arg-type]
    click.echo(f"wrote {rows:,} rows to {output}", err=True)


@main.command(short_help="What a job, an export or a Parquet file cost, by model.")
@click.argument("target", type=PATH_OR_URL)
@click.option(
    "--prices",
    "prices_file",
    type=click.Path(path_type=Path),
    help="JSON or TOML file of model prices (USD per million tokens), merged over the bundled ones.",
)
@click.option("--model", help="Price a Parquet file that has no model column as this model.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def cost(target: Path | str, prices_file: Path | None, model: str | None, as_json: bool) -> None:
    """What a job cost, by model: TARGET is a job directory, its spec, an export or any Parquet file
    with prompt_tokens and completion_tokens columns."""
    with contextlib.ExitStack() as stack:
        if isinstance(target, str):  # a URL: a job directory in a bucket, or an export (any Parquet object)
            target = stack.enter_context(fetched(target)) or job_dir_of(target)
        _cost(target, prices_file, model, as_json)


def _cost(target: Path, prices_file: Path | None, model: str | None, as_json: bool) -> None:
    from batchhub.cost import job_prices, job_via, render, report, usage_table

    book = job_prices(target, prices_file)
    if target.suffix.lower() == ".toml":
        target = job_dir_of(target)
    cost_report = report(usage_table(target, model), book, via=job_via(target))
    click.echo(json.dumps(cost_report.to_dict(), indent=2) if as_json else render(cost_report))


@main.command(short_help="Estimate a job's tokens and cost before running it.")
@click.argument("input_or_spec", type=click.Path(path_type=str))  # str: an s3:// URL is no Path
@job_options
@click.option("--sample", type=int, help="Send N rows spread over the input first (they become part of the job).")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate(input_or_spec: str, sample: int | None, as_json: bool, **options: Any) -> None:
    """Estimate a job's tokens and cost before running it: INPUT_OR_SPEC and options as for `run`.

    Prompt tokens are counted with the model's tokenizer (offline); completion tokens and cost are a range,
    narrowed by --sample N.
    """
    from batchhub.estimate import estimate as make_estimate
    from batchhub.estimate import render, run_sample

    spec = _spec_from_cli(input_or_spec, options)
    spec.validate()
    if sample is not None and sample < 1:
        raise UsageError(f"--sample must be at least 1, not {sample}")
    book = spec.price_book()
    stats = None
    if sample:
        holder: list[Any] = []
        stats, summary = _run_until_done(
            run_sample(spec, sample, on_start=holder.append), lambda: holder[0].request_stop() if holder else None
        )
        if summary.stopped:
            click.echo(f"error: the sample run stopped: {summary.message or summary.stopped}", err=True)
            sys.exit(EXIT_STOPPED)
    result = make_estimate(spec, book, stats)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else render(result))


@main.command(short_help="Write a self-contained HTML report about a job.")
@click.argument("job_dir", type=PATH_OR_URL)
@click.option(
    "-o",
    "--output",
    type=PATH_OR_URL,
    help="The HTML file to write, a path or a URL (default: report.html in the job directory).",
)
@click.option(
    "--prices",
    "prices_file",
    type=click.Path(path_type=Path),
    help="JSON or TOML file of model prices (USD per million tokens), merged over the job's own.",
)
def report(job_dir: Path | str, output: Path | str | None, prices_file: Path | None) -> None:
    """Write one self-contained HTML page about a job: rows, cost, tokens and time, with charts of
    throughput and 429s over time, latency, tokens per row, cost by model and errors by type.

    JOB_DIR is a job directory or its spec file. The page needs no network to open (charts are
    embedded SVG, no scripts). Safe to run while the job runs.
    """
    from batchhub.report import write_report

    folder = job_dir_of(job_dir)
    if output is None:  # beside the job's other files: in its bucket for a job in one
        output = f"{job_dir.rstrip('/')}/report.html" if isinstance(job_dir, str) else folder / "report.html"
    target = output
    with written_to(target) as path:
        page = write_report(folder, path, prices_file=prices_file)
    click.echo(
        f"wrote {target}: {page.ok:,} ok, {page.failed:,} failed, {page.pending:,} pending "
        f"of {page.total_rows:,} rows; cost {page.cost_text}" + (f"; {page.reuse_text}" if page.reuse_text else ""),
        err=True,
    )


@main.command(short_help="List a job's batches (--via batch), or --cancel them.")
@click.argument("job_dir", type=PATH_OR_URL)
@click.option(
    "--cancel",
    is_flag=True,
    help="Cancel the job's live batches, wait for them to end and record what they finished "
    "(their other rows are pending: sent again by the next run, live or batch).",
)
@click.option("--api-key", help="API key (prefer $BATCHHUB_API_KEY).")
@click.option("--json", "as_json", is_flag=True, help="Print the batches as JSON.")
def batches(job_dir: Path | str, cancel: bool, api_key: str | None, as_json: bool) -> None:
    """A job's batches: each one's number, id, status (live ones as the provider says now), requests, and
    how many were completed and failed. JOB_DIR is a job directory or its spec."""
    from batchhub.batch_list import job_batches, render, to_dicts
    from batchhub.options import recorded_spec
    from batchhub.runner import Job, prepare_job
    from batchhub.summary import summary_lines

    folder = job_dir_of(job_dir)
    spec = recorded_spec(folder)
    if api_key is not None:
        spec.api_key = api_key
    if cancel:
        spec.via, spec.quiet = "batch", True
        prepared = prepare_job(spec)
        job = Job(prepared, cancel_batches=True)
        summary = _run_until_done(job.run(), job.request_stop)
        for line in summary_lines(summary, prepared.prices.label):
            click.echo(line, err=True)
    lines = _run_until_done(job_batches(spec, ask=not spec.is_mock), lambda: None)
    click.echo(json.dumps(to_dicts(lines), indent=2) if as_json else render(lines, folder))


@main.command(short_help="List the jobs under a folder, with their state and cost.")
@click.argument("directory", metavar="[DIR]", default="jobs", type=PATH_OR_URL)
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON (one object per job).")
def jobs(directory: Path | str, as_json: bool) -> None:
    """List the jobs under DIR (default: jobs/) with rows ok/failed/pending, cost and last update.

    A job is a folder holding job.json, at any depth. STATE is finished (or finished with failed rows),
    stopped (stopped early: run it again to resume), running (its process is alive), running? (it
    runs on another host and its files changed lately), killed (its run never ended: run it again to
    resume), or error (the directory cannot be read; the reason is shown).
    """
    from batchhub.jobs import list_jobs, render

    listings = list_jobs(directory)
    if as_json:
        click.echo(json.dumps([item.to_dict() for item in listings], indent=2))
        return
    if not listings:
        click.echo(f"no jobs under {directory} (a job is a folder holding job.json)", err=True)
        return
    click.echo(render(listings))


@main.command(short_help="Print the shell completion script (bash, zsh or fish).")
@click.argument("shell", metavar="[SHELL]", required=False, type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str | None) -> None:
    """Print the shell completion script for SHELL (bash, zsh or fish; default: from $SHELL).

    \b
    bash:  eval "$(batchhub completion bash)"    in ~/.bashrc
    zsh:   eval "$(batchhub completion zsh)"     in ~/.zshrc
    fish:  batchhub completion fish > ~/.config/fish/completions/batchhub.fish
    """
    import os

    from click.shell_completion import get_completion_class

    if shell is None:
        shell = Path(os.environ.get("SHELL", "")).name
        if shell not in ("bash", "zsh", "fish"):
            raise click.UsageError("cannot tell the shell from $SHELL: name it (bash, zsh or fish)")
    complete = get_completion_class(shell)
    assert complete is not None  # the three are built into click
    click.echo(complete(main, {}, "batchhub", "_BATCHHUB_COMPLETE").source())


# the commands of their own modules, registered on `main` as they are imported
from batchhub.cli import cache as _cache  # noqa: E402, F401
from batchhub.cli import mock_server as _mock_server  # noqa: E402, F401
