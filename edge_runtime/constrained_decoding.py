"""The constraint a generation runs under: the reply grammar's mask laid on the logits before each draw.

llguidance (the optional extra `grammar`) tells, from the tokens so far, which tokens may come next, as a bitmask
over the vocabulary; disallowed logits become -inf before the sampler's repetition penalty, temperature and top-k
see them (transformers' order for logits processors), so whatever is drawn keeps the reply inside the grammar.
The stop tokens (EOS, `<turn|>`, `<|tool_response>`) are llguidance's end-of-sequence tokens: allowed only where
the grammar accepts. When nothing but a stop may follow, the generation ends without another forward pass.

A request is checked whole (tools, tool_choice, parallel_tool_calls, response_format, and the grammar compiled)
when its constraint is built, before anything is generated, so a server can answer 400 naming the field.
llguidance is imported only then: generation without a constraint never touches it.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from edge_runtime.errors import EdgeRuntimeError, RequestError
from edge_runtime.gemma_grammar import (
    Markers,
    ReplyGrammar,
    check_response_format,
    reply_grammar,
)
from edge_runtime.generation_stats import GenerationStats
from edge_runtime.tool_declarations import check_parallel_tool_calls, check_tool_choice, check_tools

Sampler = Callable[[np.ndarray, Sequence[int]], int]


def import_llguidance(param: str) -> Any:
    try:
        import llguidance
    except ImportError:
        raise RequestError(f"{param}: constrained decoding needs the grammar engine llguidance, which is not "
                           "installed: pip install 'edge-runtime[grammar]'", param) from None
    return llguidance


class GrammarVocabulary:
    """The artifact's tokenizer as llguidance reads it (1.5 s to build at Gemma's 262144 tokens: build once per
    model). `n_vocab` is the logits' width; ids the tokenizer does not know are never allowed. Needs llguidance,
    which `constraint_for` checks for first."""

    def __init__(self, tokenizer_json: str, n_vocab: int, stop_ids: Iterable[int]) -> None:
        import llguidance

        self.stop_ids = frozenset(stop_ids)
        self.n_vocab = n_vocab
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=sorted(self.stop_ids))


class Constraint(ABC):
    """One reply's constraint (single use): `sampling` wraps the sampler so that each draw sees masked logits,
    `advance` is told each token kept. Its cost goes into the generation's stats: `mask_seconds` (masks computed
    and applied, tokens consumed) and `constrained_tokens` (the draws it masked)."""

    def __init__(self, stop_token_ids: Iterable[int]) -> None:
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stats = GenerationStats()
        self.started = False

    def sampling(self, sampler: Sampler, stats: GenerationStats) -> Sampler:
        if self.started:
            raise EdgeRuntimeError("a constraint serves one generation; build another with Model.constraint_for")
        self.started, self.stats = True, stats

        def masked(logits: np.ndarray, history: Sequence[int]) -> int:
            self.mask(logits)
            return sampler(logits, history)

        return masked

    @abstractmethod
    def mask(self, logits: np.ndarray) -> None:
        """Set the logits of the tokens that may not come next to -inf, in place."""

    @abstractmethod
    def advance(self, token: int) -> bool:
        """Take the token drawn; True when nothing but a stop token may follow."""


class BannedTokens(Constraint):
    """Tokens that may never be drawn (tool_choice "none": `<|tool_call>`); no grammar engine involved."""

    def __init__(self, banned: Sequence[int], stop_token_ids: Iterable[int]) -> None:
        super().__init__(stop_token_ids)
        self.banned = np.asarray(banned, dtype=np.int64)

    def mask(self, logits: np.ndarray) -> None:
        start = time.perf_counter()
        logits[self.banned[self.banned < logits.shape[0]]] = -np.inf
        self.stats.constrained_tokens += 1
        self.stats.mask_seconds += time.perf_counter() - start

    def advance(self, token: int) -> bool:
        return False


class GrammarConstraint(Constraint):
    """A reply held to a grammar by llguidance, from the first token or, with a `trigger`, from the moment the model
    draws that token (before it, the reply is free and no mask is computed)."""

    def __init__(self, matcher: Any, vocabulary: GrammarVocabulary, trigger: int | None) -> None:
        super().__init__(vocabulary.stop_ids)
        self.matcher = matcher
        self.trigger = trigger
        self.active = trigger is None
        self.bitmask = np.full((vocabulary.n_vocab + 31) // 32, -1, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> None:
        if not self.active:
            return
        start = time.perf_counter()
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), count=logits.shape[0], bitorder="little").view(bool)
        np.copyto(logits, -np.inf, where=~allowed)
        self.stats.constrained_tokens += 1
        self.stats.mask_seconds += time.perf_counter() - start

    def advance(self, token: int) -> bool:
        if not self.active:
            if token != self.trigger:
                return False
            self.active = True
        start = time.perf_counter()
        if not self.matcher.consume_token(token):  # only a token the mask allowed can be drawn
            raise RuntimeError(f"the grammar refused token {token} that its own mask allowed: "
                               f"{self.matcher.get_error()}")
        done = self.matcher.is_stopped()
        self.stats.mask_seconds += time.perf_counter() - start
        return done


def constraint_for(token_id: Callable[[str], int | None], stop_ids: frozenset[int],
                   vocabulary: Callable[[], GrammarVocabulary],
                   response_format: Mapping[str, Any] | None = None, tools: Sequence[Any] | None = None,
                   tool_choice: str | Mapping[str, Any] | None = None, parallel_tool_calls: bool | None = None,
                   thinking: bool = False, thought_open: bool = False) -> Constraint | None:
    """The constraint OpenAI's request fields put on a reply (None when they put none), every field checked and the
    grammar compiled now. `token_id` finds the markers; `stop_ids` are the tokens that end the model's reply (its EOS
    and end-of-turn ids: Model.reply_stop_ids); `vocabulary` is called only when a grammar is needed."""
    declared = check_tools(tools)
    choice = check_tool_choice(tool_choice, declared)
    parallel = check_parallel_tool_calls(parallel_tool_calls)
    schema = check_response_format(response_format)
    grammar = reply_grammar(Markers(token_id), declared, choice, parallel, schema, thinking, thought_open)
    if grammar is None:
        return None
    if grammar.lark is None:
        return BannedTokens(grammar.banned, stop_ids)
    param = "response_format" if schema is not None else "tools"
    llguidance = import_llguidance(param)
    vocab = vocabulary()
    return GrammarConstraint(_matcher(llguidance, vocab, grammar), vocab, grammar.trigger)


def _matcher(llguidance: Any, vocabulary: GrammarVocabulary, grammar: ReplyGrammar) -> Any:
    """A matcher of the grammar; a grammar the engine cannot compile is blamed on the request field it came from."""
    def compiled(lark: str) -> Any:
        return llguidance.LLMatcher(vocabulary.tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)

    matcher = compiled(grammar.lark)
    if not matcher.is_error():
        return matcher
    for param, lark in grammar.parts:
        part = compiled(lark)
        if part.is_error():
            raise RequestError(f"{param}: the grammar engine cannot compile this schema: {_reason(part.get_error())}",
                               param)
    raise RuntimeError(f"the reply grammar did not compile: {matcher.get_error()}\n{grammar.lark}")


def _reason(error: str) -> str:
    """llguidance's message without its position in our generated grammar text, which the caller never saw."""
    first = error.strip().splitlines()[0] if error.strip() else error
    return re.sub(r"^(at )?\d+\(\d+\): ", "", first)
