"""A multi-turn chat over one model: the transcript, rendered by the model's chat template at every turn.

When the transcript and room for a reply (up to a quarter of the context) no longer fit the context, the
oldest turns are dropped, the system prompt kept, as Ollama does; `dropped_turns` counts them. A message that
cannot fit even alone is refused before anything is dropped, so that the conversation goes on as it was.

The KV cache is not copied or pinned here: each turn's prompt is the whole transcript, and the model keeps
the longest prefix of it already in its cache (`Engine.reuse`), so a turn runs only the tokens added since the
last reply. Two conversations taking turns on one model still answer correctly; they just re-run their
transcripts, as llama.cpp's server does with one slot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from edge_runtime.errors import ContextLengthError
from edge_runtime.generation_stats import GenerationStats

if TYPE_CHECKING:
    from edge_runtime.model import Model


class Conversation:
    def __init__(self, model: Model, system: str | None = None) -> None:
        self.model = model
        self.system = system
        self.turns: list[dict[str, str]] = []
        self.dropped_turns = 0
        self.stats = GenerationStats()
        """Counts of the last turn kept (`cached_tokens` of its prompt came from the cache, `processed_tokens`
        ran); zeros before the first and after `reset`, whatever else the model ran since."""

    @property
    def messages(self) -> list[dict[str, str]]:
        """The transcript as OpenAI-style messages, the system prompt first when there is one."""
        return [*self._system_message(), *self.turns]

    def _system_message(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def reset(self, system: str | None = None) -> None:
        """Forget the turns (the system prompt stays unless a new one is given)."""
        self.turns.clear()
        self.stats = GenerationStats()
        if system is not None:
            self.system = system

    def stream(self, text: str, max_new_tokens: int = 512, stop: Sequence[str] = (),
               **sampling: float | None) -> Iterator[str]:
        """The reply to `text`, streamed; the turn joins the transcript once the reply is complete."""
        model = self.model
        question = {"role": "user", "content": text}
        ids = model.chat_prompt_ids([*self.messages, question])
        if len(ids) > model.context_length:
            alone = len(model.chat_prompt_ids([*self._system_message(), question])) if self.turns else len(ids)
            if alone > model.context_length:
                raise self._too_long(alone)
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
        self.stats = model.stats

    def _too_long(self, tokens: int) -> ContextLengthError:
        return ContextLengthError(f"the message takes {tokens} tokens (with the system prompt and the chat "
                                  f"template's markers) but the context holds {self.model.context_length}; it was not "
                                  "added to the conversation: shorten it, or load the model with a longer context")

    def say(self, text: str, max_new_tokens: int = 512, stop: Sequence[str] = (),
            **sampling: float | None) -> str:
        """The reply to `text`."""
        return "".join(self.stream(text, max_new_tokens, stop, **sampling))
