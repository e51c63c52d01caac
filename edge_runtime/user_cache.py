"""Where edge-runtime keeps what it makes for this user: the bundled model's artifact, models by name, the
integrity stamps, the compiled attention kernels. One place, so that one variable moves all of it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$EDGE_RUNTIME_CACHE, else $XDG_CACHE_HOME/edge-runtime, else ~/.cache/edge-runtime."""
    if env := os.environ.get("EDGE_RUNTIME_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-runtime"
