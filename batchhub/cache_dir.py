"""The per-user cache folder: saved genai-prices answers and the reply cache live there.

`$BATCHHUB_CACHE` names it; unset, it is `$XDG_CACHE_HOME/batchhub` (else `~/.cache/batchhub`);
`BATCHHUB_CACHE=off` (or empty) keeps nothing there. A job may name another folder for its
replies (`--cache DIR`).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "BATCHHUB_CACHE"


def default_cache_dir() -> Path | None:
    """The cache folder as the environment says, or None when it is turned off (or there is no home)."""
    folder = os.environ.get(CACHE_ENV)
    if folder is None:
        try:
            return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batchhub"
        except RuntimeError:  # no home directory
            return None
    if not folder.strip() or folder.strip().lower() == "off":
        return None
    return Path(folder)
