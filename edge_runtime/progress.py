"""The progress callback long work reports through (export, loading, bench, perplexity).

`progress(stage, done, total)`: a stage name and how far it is, in the stage's own units. The library never
draws anything; the CLI turns these calls into a rich progress bar, an app into whatever its UI shows.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The default: report nowhere."""
