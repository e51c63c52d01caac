"""Stop strings over streamed text, with OpenAI's semantics: the output ends just before the stop string.

Text arrives in pieces (one per decoded token), and a stop string can span pieces, so the end of what has
arrived is held back while it could still be the start of a stop string; everything before it is safe to
emit at once. Generation stops as soon as any stop string is complete, and the output ends before the
earliest one then present in the text.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge_runtime.errors import EdgeRuntimeError

MAX_STOPS = 16  # OpenAI allows 4; more are cheap here, but each piece is checked against all of them


class StopSequences:
    def __init__(self, stops: Sequence[str]) -> None:
        """`stops`: the stop strings (a single string counts as one, as OpenAI's `stop` accepts either)."""
        stops = [stops] if isinstance(stops, str) else list(stops)
        if len(stops) > MAX_STOPS:
            raise EdgeRuntimeError(f"{len(stops)} stop strings given; at most {MAX_STOPS} are supported")
        for i, stop in enumerate(stops):
            if not isinstance(stop, str):
                raise EdgeRuntimeError(f"stop[{i}]: must be a string, got {type(stop).__name__}")
            if not stop:
                raise EdgeRuntimeError(f"stop[{i}]: stop strings must not be empty")
        self.stops = tuple(dict.fromkeys(stops))
        self.hold = max((len(stop) for stop in self.stops), default=1) - 1  # longest tail that can be a prefix
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that can be emitted now that `piece` has arrived ("" once a stop string was seen)."""
        if self.stopped:
            return ""
        text = self.pending + piece
        found = [i for stop in self.stops if (i := text.find(stop)) >= 0]
        if found:
            self.stopped, self.pending = True, ""
            return text[:min(found)]
        keep = self._partial_tail(text)
        self.pending = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back tail, once the text has ended without a stop string completing."""
        rest, self.pending = self.pending, ""
        return rest

    def _partial_tail(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string (none is complete in `text`)."""
        for k in range(min(self.hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(stop.startswith(tail) for stop in self.stops):
                return k
        return 0
