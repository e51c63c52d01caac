"""The progress callback long work reports through (export, loading, bench, perplexity).

`progress(stage, done, total)`: a stage name and how far it is, in the stage's own units. `notice(message)`: a
one-off sentence the user should see (not an error). The library never draws or prints anything; the CLI turns
these calls into a rich progress bar and `note:` lines, an app into whatever its UI shows.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def no_progress(stage: str, done: int, total: int) -> None:
    """The default: report nowhere."""


Notice = Callable[[str], None]


def no_notice(message: str) -> None:
    """The default for one-off notes (e.g. an interrupted export's leftovers removed): say nothing."""
