"""The one per-user folder where gptoss keeps what it derives, unpacks or builds."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "GPTOSS_CACHE"


def cache_root() -> Path:
    """`$GPTOSS_CACHE`, else `$XDG_CACHE_HOME/gptoss`, else `~/.cache/gptoss`. Subfolders: vocab
    and tokenizer (the o200k files), demo (the unpacked demo model), ext (kernel builds)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gptoss"
