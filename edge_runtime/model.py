"""The public SDK: `load(path)` gives a `Model` that generates, streams, chats, scores and tokenizes.

Shaped after onnxruntime-genai and mlx-lm: one object owning the sessions, cache and tokenizer, a prefill
that processes the prompt in chunks (bounding attention scratch memory at long prompts), and a decode loop
that feeds one token at a time through the KV cache. Every generation first keeps the longest prefix of its
prompt that is already cached (as llama.cpp's server does), so a chat turn runs only the tokens added since the
last reply. One model has one cache: a lock makes threads sharing it take turns, a generation at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime import openai_shapes
from edge_runtime.artifact import Manifest, read_manifest
from edge_runtime.chat_reply import ChatReply, chat_prompt
from edge_runtime.chat_template import ChatTemplate
from edge_runtime.constrained_decoding import Constraint, GrammarVocabulary, constraint_for
from edge_runtime.conversation import Conversation
from edge_runtime.cpu_features import has_int8_dot_product
from edge_runtime.engine import Engine
from edge_runtime.errors import ContextLengthError, EdgeRuntimeError
from edge_runtime.generation_stats import GenerationStats
from edge_runtime.integrity import check_artifact
from edge_runtime.kv_formats import DEFAULT_KV_FORMAT, default_sliding_format, kv_format
from edge_runtime.lora_attach import adapter_feeds
from edge_runtime.memory import give_back_freed_heap, return_freed_memory_to_os
from edge_runtime.model_store import resolve_model
from edge_runtime.profiles import Profile, resolve_profile
from edge_runtime.progress import Progress, no_progress
from edge_runtime.sampling import Sampler, SamplingParams
from edge_runtime.stop_sequences import StopSequences
from edge_runtime.tokenizer import StreamDecoder, Tokenizer
from edge_runtime.tool_declarations import check_tools

DEFAULT_PREFILL_CHUNK = 256
LOW_MEMORY_PREFILL_CHUNK = 64
log = logging.getLogger("edge_runtime.model")


def _check_threads(threads: int | None) -> None:
    """None picks the profile's count, else up to 4; 0 and negatives are refused rather than read as "default"."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise EdgeRuntimeError(f"threads={threads!r}: must be a whole number of at least 1 (or None: the profile's "
                               "count, else up to 4)")


def _warn_of_slow_kernels(path: Path, manifest: Manifest) -> None:
    """A format whose kernel needs int8 dot products still runs without them, but onnxruntime then widens each of its
    weights to float32 at every step (many times slower): said once at load, with what to export instead."""
    slow = sorted({fmt.name for fmt in manifest.weight_formats.values() if fmt.needs_int8_dot_product})
    if slow and not has_int8_dot_product():
        log.warning("%s: this CPU has no int8 dot-product instructions, which %s weights need to run fast (onnxruntime "
                    "widens them to float32 at every step here); re-export with --weights int8 or int4",
                    path, " and ".join(slow))


class Model:
    def __init__(self, path: Path, threads: int | None = None, context_length: int | None = None,
                 prefill_chunk: int | None = None, low_memory: bool = False, kv: str = DEFAULT_KV_FORMAT,
                 kv_recent: int | None = None, kv_sliding: str | None = None,
                 progress: Progress = no_progress, adapter: str | Path | None = None) -> None:
        _check_threads(threads)
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_artifact(self.path, self.manifest, progress)
        self.spec = self.manifest.spec
        self.name = self.path.resolve().name
        self.kv_format = kv_format(kv)
        self.kv_recent = self.kv_format.default_recent if kv_recent is None else kv_recent
        if self.kv_recent < 0:
            raise EdgeRuntimeError(f"kv_recent={kv_recent}: must be 0 or more")
        self.kv_sliding_format = kv_format(kv_sliding or default_sliding_format(kv))
        limit = self.spec.max_position_embeddings
        if context_length is not None and not 0 < context_length <= limit:
            raise EdgeRuntimeError(f"context_length={context_length}: must be between 1 and the model's {limit}")
        self.context_length = context_length or limit
        if prefill_chunk is None:
            prefill_chunk = LOW_MEMORY_PREFILL_CHUNK if low_memory else DEFAULT_PREFILL_CHUNK
        if prefill_chunk < 1:
            raise EdgeRuntimeError(f"prefill_chunk={prefill_chunk}: must be at least 1")
        self.prefill_chunk = prefill_chunk
        _warn_of_slow_kernels(self.path, self.manifest)
        self.engine = Engine(self.path, self.manifest, threads, self.kv_format, self.kv_recent, self.kv_sliding_format)
        self.tokenizer = Tokenizer(self.path / self.manifest.tokenizer["tokenizer"], self.spec.bos_token_id)
        if low_memory:
            return_freed_memory_to_os()
        self.eos_token_ids, self.default_sampling = self._generation_defaults()
        self.stats = GenerationStats()
        self.lock = threading.RLock()
        self.adapter: Path | None = None  # the adapter attached to the LoRA slots (set_adapter)
        self._adapter_feeds: dict[Path, dict[str, np.ndarray]] = {}
        if adapter is not None:
            self.set_adapter(adapter)

    def set_adapter(self, adapter: str | Path | None) -> None:
        """Attach the PEFT LoRA adapter directory `adapter` to the artifact's LoRA slots (export --lora-slots), or
        detach it with None, without reloading the base. An adapter is read once and kept, so switching back is a
        swap of arrays; switching empties the KV cache, which was computed under the previous adapter. An adapter
        the slots cannot take (a higher rank, a module without a slot, DoRA, modules_to_save) is refused in one line.
        """
        with self.lock:
            path = None if adapter is None else self.read_adapter(adapter)
            if path == self.adapter:
                return
            self.engine.attach(None if path is None else self._adapter_feeds[path])
            self.adapter = path

    def read_adapter(self, adapter: str | Path) -> Path:
        """Read and check the adapter at `adapter` for the LoRA slots, keeping its arrays for `set_adapter`, without
        attaching it (a server reads every adapter it offers at start); returns its resolved path."""
        path = Path(adapter).resolve()
        with self.lock:
            if path not in self._adapter_feeds:
                self._adapter_feeds[path] = adapter_feeds(Path(adapter), self.manifest.lora_slots, self.spec,
                                                          self.path)
        return path

    def _generation_defaults(self) -> tuple[set[int], SamplingParams]:
        eos = set(self.spec.eos_token_ids)
        params = SamplingParams()
        name = self.manifest.tokenizer.get("generation_config")
        if name:
            config = json.loads((self.path / name).read_text())
            extra = config.get("eos_token_id")
            eos |= set(extra if isinstance(extra, list) else [] if extra is None else [extra])
            greedy = config.get("do_sample") is False
            params = SamplingParams(
                temperature=0.0 if greedy else float(config.get("temperature", params.temperature)),
                top_k=int(config.get("top_k", params.top_k)),
                top_p=float(config.get("top_p", params.top_p)),
                min_p=float(config.get("min_p") or params.min_p),
                repetition_penalty=float(config.get("repetition_penalty", params.repetition_penalty)),
            )
        return eos, params

    @cached_property
    def chat_template(self) -> ChatTemplate:
        """The artifact's chat template, compiled on first use: plain generation does not depend on it."""
        return ChatTemplate.for_artifact(self.path, self.manifest)

    @cached_property
    def end_of_turn_ids(self) -> set[int]:
        """The tokens that end a chat reply even where generation_config omits them: the template's end of turn,
        and Gemma 4's `<|tool_response>`, which the model writes after its tool calls to wait for their results."""
        ids = (self.tokenizer.token_id(marker) for marker in self.chat_template.reply_end_markers())
        return {token for token in ids if token is not None}

    @cached_property
    def reply_stop_ids(self) -> frozenset[int]:
        """Every token that ends a chat reply: EOS and the end of turn; one set, which the reply's stream and its
        constraint (whose grammar may end only where one of them is allowed) both use."""
        return frozenset(self.eos_token_ids | self.end_of_turn_ids)

    @cached_property
    def grammar_vocabulary(self) -> GrammarVocabulary:
        """The tokenizer as the grammar engine reads it: built on the first constrained request, then kept."""
        text = (self.path / self.manifest.tokenizer["tokenizer"]).read_text(encoding="utf-8")
        return GrammarVocabulary(text, max(self.spec.input_vocab_size, self.tokenizer.vocab_size),
                                 self.reply_stop_ids)

    def constraint_for(self, response_format: Mapping[str, Any] | None = None, tools: Sequence[Any] | None = None,
                       tool_choice: str | Mapping[str, Any] | None = None, parallel_tool_calls: bool | None = None,
                       thinking: bool = False, thought_open: bool = False) -> Constraint | None:
        """The constraint OpenAI's `response_format`, `tools`, `tool_choice` and `parallel_tool_calls` put on a reply
        in Gemma 4's format, for `generate_tokens(constraint=...)`; None when they put none. Everything is checked
        (and the grammar compiled) now: a bad field raises RequestError naming it, before anything is generated.

        `thinking`: the reply may start with a thought; `thought_open`: the prompt already opened one (Gemma's
        template does after tool responses when thinking), which the reply must finish first. A constraint serves
        one generation.
        """
        return constraint_for(self.tokenizer.token_id, self.reply_stop_ids, lambda: self.grammar_vocabulary, response_format,
                              tools, tool_choice, parallel_tool_calls, thinking, thought_open)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, starting with BOS."""
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def reset(self) -> None:
        """Empty the KV cache (the next prompt is processed in full)."""
        with self.lock:
            self.engine.reset()

    def fill_cache(self, depth: int, rng: np.random.Generator) -> None:
        """Empty the KV cache, then bring it to `depth` positions in seconds, for benchmarks (`bench --fill`): one
        prefill chunk of random tokens run for real, then its keys and values committed again and again at the
        positions after it.

        A decode step reads every position the cache holds, so its cost follows the depth and the KV format; what
        the positions hold counts only through the numbers themselves (keys scoring far below the best make
        subnormal softmax weights, which an Intel core takes microcode assists on where nothing flushes them), so
        the numbers are the model's own, not random ones. A 32k context then starts in seconds rather than after
        a prefill of minutes (hours on a Pi).
        """
        self.check_fits(depth)
        with self.lock:
            self.engine.fill(depth, self.prefill_chunk, rng)

    @property
    def threads(self) -> int:
        """The threads the model runs on (each onnxruntime session's pool, attention's workers): the count given to
        `load`, else the profile's, else up to 4."""
        return self.engine.attention_workers

    @property
    def context_used(self) -> int:
        """Tokens the KV cache holds: the last generation's prompt and reply, which the next prompt reuses as far as
        it starts the same. Read without the lock, so that a server can report it while a generation runs."""
        return len(self.engine.tokens)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache has allocated now (codes, norms, exact recent rings), slots allocated ahead of use
        included: what the cache costs in memory, where `kv_read_bytes` is what a step reads of it."""
        return self.engine.cache.nbytes()

    @property
    def kv_read_bytes(self) -> int:
        """Bytes of KV cache the next decode step reads: each layer's attention reads the used slots of its source
        layer's cache, in its format. Decode is bound by memory reads, so this is its cost on top of the weights."""
        cache = self.engine.cache
        return sum(cache.bytes_read(source) for source in self.spec.kv_sources)

    def logits(self, token_ids: list[int] | np.ndarray, mode: str = "prefill") -> np.ndarray:
        """float32 [T, vocab] logits of every position, from an empty cache.

        "prefill" runs the sequence in chunks of `prefill_chunk`; "decode" feeds one token at a time
        through the KV cache, exactly as generation does. Both must agree with the reference model.
        """
        return np.concatenate(list(self.logits_in_chunks(token_ids, mode)))

    def logits_in_chunks(self, token_ids: list[int] | np.ndarray, mode: str = "prefill") -> Iterator[np.ndarray]:
        """`logits`, a chunk (or in "decode" mode a token) at a time: scoring a long text this way never holds
        [T, vocab] at once (a 512-token window of a 262144-token vocabulary is 0.5 GB of float32).

        Bad arguments raise here, not at the first chunk; the lock is held until the iterator ends or is closed.
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if mode not in ("prefill", "decode"):
            raise EdgeRuntimeError(f"mode={mode!r}: must be 'prefill' or 'decode'")
        self.check_fits(len(ids))
        return self._logits_in_chunks(ids, self.prefill_chunk if mode == "prefill" else 1)

    def _logits_in_chunks(self, ids: np.ndarray, step: int) -> Iterator[np.ndarray]:
        with self.lock:
            self.engine.reset()
            self.engine.cache.reserve(len(ids))  # sized once, as `feed` sizes a prompt
            for s in range(0, len(ids), step):
                yield self.engine.forward(ids[s:s + step], all_logits=True)

    def check_fits(self, n: int) -> None:
        if n == 0:
            raise EdgeRuntimeError("no tokens given")
        if n > self.context_length:
            raise ContextLengthError(
                f"the prompt has {n} tokens but the context holds {self.context_length}; shorten the prompt"
                " or load with a longer context"
            )

    def feed(self, token_ids: list[int] | np.ndarray,
             should_stop: Callable[[], bool] | None = None) -> np.ndarray | None:
        """Run tokens after those already cached, in prefill chunks; logits [1, vocab] of the last position.

        `should_stop` is asked before each chunk: a long prompt whose reader has left stops within a chunk,
        the chunks already run staying cached (None is returned then).
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        logits = None
        with self.lock:
            # Room for the whole prompt at once: grown chunk by chunk, each store would be copied once per chunk
            # (bytes quadratic in the prompt: a 32k prompt copied every store 128 times).
            self.engine.cache.reserve(len(ids))
            for s in range(0, len(ids), self.prefill_chunk):
                if should_stop is not None and should_stop():
                    return None
                logits = self.engine.forward(ids[s:s + self.prefill_chunk], all_logits=False)
            if len(ids) > 1:
                give_back_freed_heap()
        return logits

    def sampler(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                min_p: float | None = None, repetition_penalty: float | None = None,
                seed: int | None = None) -> Sampler:
        """A sampler with the model's defaults (generation_config.json) where an option is None."""
        d = self.default_sampling
        return Sampler(SamplingParams(
            temperature=d.temperature if temperature is None else temperature,
            top_k=d.top_k if top_k is None else top_k,
            top_p=d.top_p if top_p is None else top_p,
            min_p=d.min_p if min_p is None else min_p,
            repetition_penalty=d.repetition_penalty if repetition_penalty is None else repetition_penalty,
        ), seed)

    def generate_tokens(self, prompt_ids: Sequence[int], max_new_tokens: int = 256, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None, *,
                        min_p: float | None = None, repetition_penalty: float | None = None,
                        stop_token_ids: Sequence[int] = (), cache_prompt: bool = True,
                        should_stop: Callable[[], bool] | None = None,
                        constraint: Constraint | None = None) -> Iterator[int]:
        """Token ids after `prompt_ids`, stopping at EOS (or `stop_token_ids`), `max_new_tokens` or the context end.

        Holds the model's lock until the iterator is exhausted or closed: close a stream you abandon.
        `cache_prompt=False` runs the whole prompt even where the cache holds it (llama.cpp's cache_prompt):
        quantized kernels round differently with the batch split, so only then is a greedy answer independent
        of what the model ran before. `should_stop` is asked between prefill chunks and between tokens, so that
        a server can drop the work of a client that left. `constraint` (from `constraint_for`) masks the logits
        before each draw and ends the reply where its grammar does; its cost goes into `stats.mask_seconds`.
        """
        if max_new_tokens < 0:
            raise EdgeRuntimeError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        sampler = self.sampler(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        prompt_ids = list(prompt_ids)
        self.check_fits(len(prompt_ids))
        stops = self.eos_token_ids | set(stop_token_ids)
        if constraint is not None:
            stops |= constraint.stop_token_ids
        with self.lock:
            self.stats = stats = GenerationStats(prompt_tokens=len(prompt_ids), finish_reason="length")
            if constraint is not None:
                sampler = constraint.sampling(sampler, stats)
            if max_new_tokens == 0:
                return
            start = time.perf_counter()
            if not cache_prompt:
                self.engine.reset()
            stats.cached_tokens = self.engine.reuse(prompt_ids)
            logits = self.feed(prompt_ids[stats.cached_tokens:], should_stop)
            stats.prefill_seconds = time.perf_counter() - start
            if logits is None:
                return
            # Only ids the model can take back in are sampled (Gemma 3n's multimodal image and audio ids are not)
            usable = self.spec.input_vocab_size
            logits = logits[-1, :usable]
            start = time.perf_counter()
            history = self.engine.tokens
            while True:
                token = sampler(logits, history)
                if token in stops:
                    stats.finish_reason = "stop"
                    break
                stats.generated_tokens += 1
                yield token
                if constraint is not None and constraint.advance(token):  # nothing but a stop may follow
                    stats.finish_reason = "stop"
                    break
                if stats.generated_tokens >= max_new_tokens or len(history) >= self.context_length:
                    break
                if should_stop is not None and should_stop():
                    break
                logits = self.engine.forward(np.asarray([token]), all_logits=False)[-1, :usable]
                stats.decode_seconds = time.perf_counter() - start

    def stream_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 256, stop: Sequence[str] = (),
                   stop_token_ids: Sequence[int] = (), *, special_tokens: bool = False,
                   constraint: Constraint | None = None, **sampling: Any) -> Iterator[str]:
        """Text pieces of the continuation of `prompt_ids` as they are decoded, ending before any `stop` string.

        `sampling` takes generate_tokens' options (temperature, top_k, top_p, min_p, repetition_penalty, seed,
        cache_prompt, should_stop, constraint); `special_tokens` keeps special tokens in the text (a chat reply's
        markers).
        """
        decoder, stops = StreamDecoder(self.tokenizer, skip_special_tokens=not special_tokens), StopSequences(stop)
        tokens = self.generate_tokens(prompt_ids, max_new_tokens, stop_token_ids=stop_token_ids,
                                      constraint=constraint, **sampling)
        try:
            for token in tokens:
                if piece := stops.push(decoder.push(token)):
                    yield piece
                if stops.stopped:
                    self.stats.finish_reason = "stop"
                    return
            rest = stops.push(decoder.flush())
            if stops.stopped:
                self.stats.finish_reason = "stop"
            else:
                rest += stops.flush()
            if rest:
                yield rest
        finally:
            tokens.close()

    def stream(self, prompt: str, max_new_tokens: int = 256, stop: Sequence[str] = (),
               **sampling: float | None) -> Iterator[str]:
        """Text pieces of the continuation of `prompt` as they are decoded."""
        return self.stream_ids(self.encode(prompt), max_new_tokens, stop, **sampling)

    def generate(self, prompt: str, max_new_tokens: int = 256, stop: Sequence[str] = (),
                 **sampling: float | None) -> str:
        """The continuation of `prompt` (the prompt itself is not repeated)."""
        return "".join(self.stream(prompt, max_new_tokens, stop, **sampling))

    def render_chat(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                    add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        """`messages` (OpenAI's: system, user, assistant with tool_calls, tool results) rendered by the artifact's
        chat template, exactly as transformers' `apply_chat_template(messages, tools=tools, tokenize=False,
        **template_kwargs)` renders them; `tools` are OpenAI function declarations, `template_kwargs` the
        template's switches (Gemma 4: `enable_thinking=True`). Tool call arguments may be objects or JSON text."""
        check_tools(tools)
        return self.chat_template.render(messages, add_generation_prompt, tools=list(tools) if tools else None,
                                         **template_kwargs)

    def prompt_ids(self, text: str) -> list[int]:
        """The token ids of a rendered chat prompt. The template writes the BOS token itself, so the text is
        tokenized without adding another (and given one where a template does not write it)."""
        ids = self.tokenizer.encode(text, add_bos=False)
        if self.spec.bos_token_id is not None and ids[:1] != [self.spec.bos_token_id]:
            ids.insert(0, self.spec.bos_token_id)
        return ids

    def chat_prompt_ids(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None = None,
                        **template_kwargs: Any) -> list[int]:
        """The token ids of `messages` rendered by the chat template, ready for the model's reply."""
        return self.prompt_ids(self.render_chat(messages, tools, **template_kwargs))

    def chat_stream(self, messages: Sequence[Mapping], max_new_tokens: int = 512, stop: Sequence[str] = (),
                    **sampling: float | None) -> Iterator[str]:
        """The text of the assistant's reply to `messages` (OpenAI-style role/content dicts), streamed; a thought
        channel is left out (create_chat_completion gives it, and tool calls, as OpenAI's fields)."""
        return ChatReply(self, chat_prompt(self, messages), max_new_tokens, stop, **sampling).content()

    def chat(self, messages: Sequence[Mapping], max_new_tokens: int = 512, stop: Sequence[str] = (),
             **sampling: float | None) -> str:
        """The assistant's reply to `messages`; a conversation's earlier turns are reused from the cache."""
        return "".join(self.chat_stream(messages, max_new_tokens, stop, **sampling))

    def conversation(self, system: str | None = None, *, tools: Sequence[Mapping] | None = None,
                     tool_choice: str | Mapping = "auto", chat_template_kwargs: Mapping[str, Any] | None = None
                     ) -> Conversation:
        """A multi-turn chat that keeps its transcript (and, while it is the model's latest user, its KV cache);
        with `tools`, the model may call them and the caller adds their results (Conversation.add_tool_result)."""
        return Conversation(self, system, tools=tools, tool_choice=tool_choice,
                            chat_template_kwargs=chat_template_kwargs)

    def create_chat_completion(self, messages: Sequence[Mapping], *, max_tokens: int | None = None,
                               stream: bool = False, stop: str | Sequence[str] | None = None,
                               tools: Sequence[Mapping] | None = None, tool_choice: str | Mapping | None = None,
                               parallel_tool_calls: bool | None = None, response_format: Mapping | None = None,
                               chat_template_kwargs: Mapping[str, Any] | None = None,
                               **sampling: float | None) -> dict | Iterator[dict]:
        """OpenAI's chat.completion, or with stream=True a generator of chat.completion.chunk dicts.

        `tools`, `tool_choice` ("auto", "none", "required" or {"type": "function", "function": {"name": ...}}),
        `parallel_tool_calls` and `response_format` ({"type": "json_object"} or {"type": "json_schema", ...}) are
        OpenAI's; calls and JSON are guaranteed well-formed by constrained decoding (the `grammar` extra).
        `chat_template_kwargs` reach the template (`{"enable_thinking": True}`: the thought comes back as
        `reasoning_content`). `sampling` takes temperature, top_p, top_k, min_p, repetition_penalty, seed;
        `include_usage=True` adds the usage chunk at the end of a stream (OpenAI's stream_options).
        """
        return openai_shapes.chat_completion(self, messages, max_tokens=max_tokens, stream=stream, stop=stop,
                                             tools=tools, tool_choice=tool_choice,
                                             parallel_tool_calls=parallel_tool_calls,
                                             response_format=response_format,
                                             chat_template_kwargs=chat_template_kwargs, **sampling)

    def create_completion(self, prompt: str, *, max_tokens: int | None = None, stream: bool = False,
                          stop: str | Sequence[str] | None = None, **sampling: float | None) -> dict | Iterator[dict]:
        """OpenAI's text_completion for a plain prompt (or its stream of chunks)."""
        return openai_shapes.completion(self, prompt, max_tokens=max_tokens, stream=stream, stop=stop, **sampling)


def load(path: str | Path | None = None, *, profile: str | Profile | None = None, threads: int | None = None,
         context_length: int | None = None, prefill_chunk: int | None = None, low_memory: bool = False,
         kv: str | None = None, kv_recent: int | None = None, kv_sliding: str | None = None,
         progress: Progress = no_progress, adapter: str | Path | None = None) -> Model:
    """Open an exported artifact: a directory, a model name (see `list_models`), or the bundled model when `path`
    is None (exported into the cache on first use).

    A string is a name when it has no path separator and no such path exists (edge_runtime.model_store); a
    Path is always a path.
    `profile` (a device profile name, "auto" to detect this device, or a Profile) supplies the defaults for
    `threads`, `kv` and `context_length`, and the memory the model must fit: when the memory planner predicts
    more than the profile allows, loading is refused with the plan's one-line explanation instead of the
    process being killed by the OOM killer later.
    `kv` is the KV cache format (edge_runtime.kv_formats.KV_FORMATS: fp32, fp16 (default), int8, TurboQuant tq4 to
    tq2.5 and their -mse/-prod variants, qjl); `kv_recent` keeps that many most recent tokens exactly besides their
    codes (default: the format's, 32 for compressed formats, 0 for fp32/fp16/int8); `kv_sliding` is the format
    of the sliding layers' rings, which stop at the window (default fp16, fp32 with `kv="fp32"`:
    kv_formats.default_sliding_format). `prefill_chunk`
    (default 256) bounds the prompt tokens run at once. `low_memory` trades prefill speed for resident memory:
    64-token chunks and freed scratch returned to the OS (see `memory.return_freed_memory_to_os`), for
    devices where the model barely fits. `progress(stage, done, total)` hears how the bundled model's first
    export and the first-time SHA-256 check of the files go (edge_runtime.integrity). `adapter` is a PEFT LoRA
    adapter directory attached to the artifact's LoRA slots (`Model.set_adapter`).
    """
    _check_threads(threads)
    path = resolve_model(path, progress)
    if profile is not None:
        from edge_runtime.planner import plan_memory

        read_manifest(Path(path))  # a missing or damaged artifact is reported as such, not as a planning problem
        device = resolve_profile(profile)
        chunk = prefill_chunk or (LOW_MEMORY_PREFILL_CHUNK if low_memory else DEFAULT_PREFILL_CHUNK)
        plan = plan_memory(Path(path), device, context_length, kv=kv, kv_recent=kv_recent, kv_sliding=kv_sliding,
                           prefill_chunk=chunk, adapter=adapter)
        if not plan.fits:
            raise EdgeRuntimeError(plan.refusal())
        threads, kv, context_length = threads or device.threads, plan.kv, plan.context
    return Model(Path(path), threads=threads, context_length=context_length, prefill_chunk=prefill_chunk,
                 low_memory=low_memory, kv=kv or DEFAULT_KV_FORMAT, kv_recent=kv_recent, kv_sliding=kv_sliding,
                 progress=progress, adapter=adapter)
