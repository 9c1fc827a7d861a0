"""`batchhub mock-server`: the simulated Chat Completions endpoint in a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import click

from batchhub.cli import main, option_pairs
from batchhub.errors import EXIT_USAGE


@main.command("mock-server", short_help="Serve the simulated Chat Completions endpoint.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, type=int, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--rpm", type=int, help="Requests per minute before answering 429.")
@click.option("--tpm", type=int, help="Tokens per minute before answering 429.")
@click.option(
    "--limit-window",
    "limit_window_s",
    type=float,
    metavar="SECONDS",
    help="Seconds of each per-minute limit let through at once (default 60; 1: enforced per second).",
)
@click.option("--latency-ms", type=float, default=0.0, help="Mean added latency per request.")
@click.option("--capacity", type=int, help="Completions generated at once; the rest wait in a FIFO queue.")
@click.option("--max-queue", type=int, help="Requests that may wait for capacity; past it, 503 at once.")
@click.option(
    "--capacity-slowdown", type=float, help="Latency grows with the number served: x(1 + this) at full capacity."
)
@click.option(
    "--error-rate",
    "error_rates",
    multiple=True,
    metavar="KIND=P",
    help="Inject a fault with probability P: 500, 502, 503, 504, timeout, reset, truncated, html, "
    "no_usage, empty_choices, stream_cut, 429, bad_json (broken JSON when JSON is asked for), "
    "400 (the same refusal for every request). Repeatable.",
)
@click.option("--seed", type=int, default=0, help="Seed for content, latency and faults.")
@click.option("--api-key", help="Accept only this key (default: any non-empty key).")
@click.option(
    "--allowed-model", "allowed_models", multiple=True, help="Models the key may use (default: all). Repeatable."
)
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Models that exist, others get 404 model_not_found (default: OpenAI's chat models; * for any). Repeatable.",
)
@click.option("--hang-seconds", type=float, help="How long a 'timeout' fault hangs.")
@click.option(
    "--batch-seconds", type=float, help="Seconds a Batch API batch takes from validating to completed (default 1)."
)
@click.option("--no-ratelimit-headers", is_flag=True, help="Send no x-ratelimit-* headers.")
@click.option("--no-retry-after", is_flag=True, help="Send 429s without Retry-After or retry-after-ms (bare 429s).")
@click.option(
    "--echo",
    is_flag=True,
    help="Answer 'echo: ' + each request's last user message, and record those messages (GET /mock/prompts).",
)
@click.option(
    "--rpm-schedule",
    "rpm_schedule",
    multiple=True,
    metavar="SECONDS=RPM",
    help="Change the RPM limit SECONDS after start (the limit a key's tier change would set). Repeatable.",
)
def mock_server(
    error_rates: tuple[str, ...],
    allowed_models: tuple[str, ...],
    host: str,
    port: int,
    no_ratelimit_headers: bool,
    no_retry_after: bool,
    rpm_schedule: tuple[str, ...],
    **options: Any,
) -> None:
    """Serve the simulated Chat Completions endpoint (rate limits, faults, streaming) until Ctrl-C."""
    from batchhub.mock import MockConfig, serve_forever

    settings = {k: v for k, v in options.items() if v is not None}
    try:
        faults = {k: float(v) for k, v in option_pairs(error_rates, "KIND=PROBABILITY").items()}
    except ValueError as exc:
        raise click.BadParameter(f"--error-rate needs KIND=PROBABILITY: {exc}") from exc
    if faults:
        settings["faults"] = faults
    if allowed_models:
        settings["allowed_models"] = list(allowed_models)
    settings["models"] = list(settings["models"])
    settings["ratelimit_headers"] = not no_ratelimit_headers
    settings["retry_after"] = not no_retry_after
    try:
        settings["rpm_schedule"] = [[float(t), int(r)] for t, r in option_pairs(rpm_schedule, "SECONDS=RPM").items()]
    except ValueError as exc:
        raise click.BadParameter(f"--rpm-schedule needs SECONDS=RPM: {exc}") from exc
    if not settings["models"]:
        del settings["models"]
    try:
        config = MockConfig.from_dict(settings)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)

    def ready(url: str) -> None:
        click.echo(f"simulated endpoint listening on {url} (Ctrl-C to stop)", err=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(config, host, port, ready=ready))
