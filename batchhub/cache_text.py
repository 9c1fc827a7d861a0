"""What `batchhub cache` shows and takes: the cache's info as text, ages and sizes as a user writes them."""

from __future__ import annotations

import math
import re
import time

from batchhub.errors import UsageError
from batchhub.reply_cache import CacheInfo

# -- the values `batchhub cache prune` takes ---------------------------------------------------

_AGE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_age(text: str) -> float:
    """Seconds from `30d`, `12h`, `90m`, `45s`, `2w` (a number and one unit); UsageError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise UsageError(f"--older-than: expected a number and a unit (s, m, h, d, w), e.g. 30d; got {text!r}")
    return float(match.group(1)) * _AGE_UNITS[match.group(2)]


def parse_size(text: str) -> int:
    """Bytes from `2GB`, `500MB`, `1.5GiB`, `100000` (KB, MB, GB, TB are powers of 1000; KiB... of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise UsageError(f"--max-size: expected a size such as 2GB, 500MB or 1.5GiB; got {text!r}")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not math.isfinite(value):
        raise UsageError(f"--max-size: {text!r} is not a size")
    return int(value)


# -- what `batchhub cache` prints ----------------------------------------------------------------


def human_bytes(size: int) -> str:
    """1,234,567 -> '1.2 MB' (powers of 1000, as `--max-size` reads them)."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _local_time(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def render_info(info: CacheInfo) -> str:
    """The folder, entries, size on disk, oldest and newest, then entries and bytes by model."""
    lines = [
        f"reply cache: {info.path}",
        f"entries: {info.entries:,}  size on disk: {human_bytes(info.bytes)}  "
        f"oldest: {_local_time(info.oldest)}  newest: {_local_time(info.newest)}",
    ]
    if info.by_model:
        names = [model.model if model.model is not None else "(none)" for model in info.by_model]
        width = max(len("MODEL"), *(len(name) for name in names))
        lines.append("")
        lines.append(f"{'MODEL':<{width}}  {'ENTRIES':>12}  {'BYTES':>10}")
        for name, model in zip(names, info.by_model, strict=True):
            lines.append(f"{name:<{width}}  {model.entries:>12,}  {human_bytes(model.bytes):>10}")
    return "\n".join(lines)
