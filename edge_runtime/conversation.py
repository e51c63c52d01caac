"""A multi-turn chat over one model: the transcript, rendered by the model's chat template at every turn.

When the transcript and room for a reply (up to a quarter of the context) no longer fit the context, the
oldest turns are dropped, the system prompt kept, as Ollama does; `dropped_turns` counts them.

The KV cache is not copied or pinned here: each turn's prompt is the whole transcript, and the model keeps
the longest prefix of it already in its cache (`Engine.reuse`), so a turn runs only the tokens added since the
last reply. Two conversations taking turns on one model still answer correctly; they just re-run their
transcripts, as llama.cpp's server does with one slot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_runtime.model import GenerationStats, Model


class Conversation:
    def __init__(self, model: Model, system: str | None = None) -> None:
        self.model = model
        self.system = system
        self.turns: list[dict[str, str]] = []
        self.dropped_turns = 0

    @property
    def messages(self) -> list[dict[str, str]]:
        """The transcript as OpenAI-style messages, the system prompt first when there is one."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns]

    @property
    def stats(self) -> GenerationStats:
        """Counts of the last turn: `cached_tokens` of its prompt came from the cache, `processed_tokens` ran."""
        return self.model.stats

    def reset(self, system: str | None = None) -> None:
        """Forget the turns (the system prompt stays unless a new one is given)."""
        self.turns.clear()
        if system is not None:
            self.system = system

    def stream(self, text: str, max_new_tokens: int = 512, stop: Sequence[str] = (),
               **sampling: float | None) -> Iterator[str]:
        """The reply to `text`, streamed; the turn joins the transcript once the reply is complete."""
        model = self.model
        question = {"role": "user", "content": text}
        ids = model.chat_prompt_ids([*self.messages, question])
        room = min(max_new_tokens, model.context_length // 4)
        while len(ids) + room > model.context_length and self.turns:
            del self.turns[:2]
            self.dropped_turns += 1
            ids = model.chat_prompt_ids([*self.messages, question])
        pieces = []
        for piece in model.stream_ids(ids, max_new_tokens, stop, stop_token_ids=model.end_of_turn_ids, **sampling):
            pieces.append(piece)
            yield piece
        self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]

    def say(self, text: str, max_new_tokens: int = 512, stop: Sequence[str] = (),
            **sampling: float | None) -> str:
        """The reply to `text`."""
        return "".join(self.stream(text, max_new_tokens, stop, **sampling))
