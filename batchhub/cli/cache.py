"""`batchhub cache` and `batchhub cache prune`: the reply cache, shown and pruned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from batchhub.cli import main
from batchhub.errors import UsageError


def _cache_folder(cache_dir: Path | None) -> Path:
    from batchhub.cache_dir import CACHE_ENV, default_cache_dir

    folder = cache_dir if cache_dir is not None else default_cache_dir()
    if folder is None:
        raise UsageError(f"the cache is off ({CACHE_ENV}=off, or no home folder): name one with --cache DIR")
    return folder


def _open_cache(folder: Path) -> Any:
    from batchhub.reply_cache import ReplyCache

    replies = ReplyCache.open(folder)
    if replies.problem is not None:
        replies.close()
        raise UsageError(f"{replies.problem}; delete {replies.path} to start an empty cache")
    return replies


CACHE_DIR_OPTION = click.option(
    "--cache",
    "cache_dir",
    type=click.Path(path_type=Path),
    help="The cache folder (default: $BATCHHUB_CACHE, else $XDG_CACHE_HOME/batchhub or ~/.cache/batchhub).",
)


@main.group(invoke_without_command=True, short_help="Show the reply cache (entries, size, by model); prune it.")
@CACHE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.pass_context
def cache(ctx: click.Context, cache_dir: Path | None, as_json: bool) -> None:
    """Show the reply cache that jobs share: its file, entries, size on disk, oldest and newest
    entry, and entries and bytes by model (the model each request asked for).

    \b
    batchhub cache
    batchhub cache --cache /data/replies --json
    batchhub cache prune --older-than 30d
    """
    ctx.obj = cache_dir
    if ctx.invoked_subcommand is not None:
        return
    from batchhub.cache_text import render_info
    from batchhub.reply_cache import FILE_NAME, CacheInfo

    folder = _cache_folder(cache_dir)
    if not (folder / FILE_NAME).exists():
        info = CacheInfo(path=folder / FILE_NAME)
        click.echo(json.dumps(info.to_dict(), indent=2) if as_json else f"no reply cache yet in {folder}")
        return
    replies = _open_cache(folder)
    try:
        info = replies.info()
    finally:
        replies.close()
    if info.problem is not None:
        raise UsageError(f"{info.problem}; delete {info.path} to start an empty cache")
    click.echo(json.dumps(info.to_dict(), indent=2) if as_json else render_info(info))


@cache.command(short_help="Remove cached replies by age, by model or down to a size.")
@CACHE_DIR_OPTION
@click.option("--older-than", metavar="AGE", help="Remove replies cached longer ago than AGE: 30d, 12h, 90m, 2w.")
@click.option("--model", help="Remove the replies of this model (the model the request asked for).")
@click.option(
    "--max-size", metavar="SIZE", help="Then remove the oldest until the entries fit in SIZE: 2GB, 500MB, 1.5GiB."
)
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
@click.pass_context
def prune(
    ctx: click.Context,
    cache_dir: Path | None,
    older_than: str | None,
    model: str | None,
    max_size: str | None,
    as_json: bool,
) -> None:
    """Remove cached replies: those older than --older-than, those of --model (both given: those
    of that model older than that), then with --max-size the oldest until the rest fit. At least
    one of them. The pages freed are given back to the file system (incremental vacuum), so the
    file shrinks; a job sends a removed reply's request again when it needs it.
    """
    from batchhub.cache_text import human_bytes, parse_age, parse_size

    if older_than is None and model is None and max_size is None:
        raise UsageError("cache prune needs --older-than, --model or --max-size")
    older_than_s = parse_age(older_than) if older_than is not None else None
    max_bytes = parse_size(max_size) if max_size is not None else None
    folder = _cache_folder(cache_dir if cache_dir is not None else ctx.obj)
    replies = _open_cache(folder)
    try:
        before = replies.info()
        removed = replies.prune(older_than_s=older_than_s, model=model, max_bytes=max_bytes)
        after = replies.info()
    finally:
        replies.close()
    if after.problem is not None:
        raise UsageError(f"{after.problem}; delete {after.path} to start an empty cache")
    if as_json:
        figures = {"removed": removed, "bytes_before": before.bytes, **after.to_dict()}
        click.echo(json.dumps(figures, indent=2))
        return
    click.echo(
        f"removed {removed:,} of {before.entries:,} replies; {after.entries:,} left, "
        f"{human_bytes(after.bytes)} on disk (was {human_bytes(before.bytes)})"
    )
