"""The public SDK: `load(path)` gives a `Model` that generates, streams, scores and tokenizes.

Shaped after onnxruntime-genai and mlx-lm: one object owning the sessions, cache and tokenizer, a prefill
that processes the prompt in chunks (bounding attention scratch memory at long prompts), and a decode loop
that feeds one token at a time through the KV cache.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.artifact import read_manifest
from edge_runtime.engine import Engine
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.kv_formats import DEFAULT_KV_FORMAT, DEFAULT_SLIDING_KV_FORMAT, kv_format
from edge_runtime.memory import return_freed_memory_to_os
from edge_runtime.sampling import Sampler, SamplingParams
from edge_runtime.tokenizer import StreamDecoder, Tokenizer

DEFAULT_PREFILL_CHUNK = 256
LOW_MEMORY_PREFILL_CHUNK = 64


@dataclass
class GenerationStats:
    """Timings of the last generate/stream call, as llama.cpp prints them."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time spent producing them (the first comes from prefill)."""
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


class Model:
    def __init__(self, path: Path, threads: int | None = None, context_length: int | None = None,
                 prefill_chunk: int | None = None, low_memory: bool = False, kv: str = DEFAULT_KV_FORMAT,
                 kv_recent: int | None = None, kv_sliding: str = DEFAULT_SLIDING_KV_FORMAT) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.spec = self.manifest.spec
        self.kv_format = kv_format(kv)
        self.kv_recent = self.kv_format.default_recent if kv_recent is None else kv_recent
        if self.kv_recent < 0:
            raise EdgeRuntimeError(f"kv_recent={kv_recent}: must be 0 or more")
        self.kv_sliding_format = kv_format(kv_sliding)
        self.engine = Engine(self.path, self.manifest, threads, self.kv_format, self.kv_recent, self.kv_sliding_format)
        self.tokenizer = Tokenizer(self.path / self.manifest.tokenizer["tokenizer"], self.spec.bos_token_id)
        limit = self.spec.max_position_embeddings
        if context_length is not None and not 0 < context_length <= limit:
            raise EdgeRuntimeError(f"context_length={context_length}: must be between 1 and the model's {limit}")
        self.context_length = context_length or limit
        if low_memory:
            return_freed_memory_to_os()
        if prefill_chunk is None:
            prefill_chunk = LOW_MEMORY_PREFILL_CHUNK if low_memory else DEFAULT_PREFILL_CHUNK
        if prefill_chunk < 1:
            raise EdgeRuntimeError(f"prefill_chunk={prefill_chunk}: must be at least 1")
        self.prefill_chunk = prefill_chunk
        self.eos_token_ids, self.default_sampling = self._generation_defaults()
        self.stats = GenerationStats()

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
            )
        return eos, params

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, starting with BOS."""
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def logits(self, token_ids: list[int] | np.ndarray, mode: str = "prefill") -> np.ndarray:
        """float32 [T, vocab] logits of every position, from an empty cache.

        "prefill" runs the sequence in chunks of `prefill_chunk`; "decode" feeds one token at a time
        through the KV cache, exactly as generation does. Both must agree with the reference model.
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if mode not in ("prefill", "decode"):
            raise EdgeRuntimeError(f"mode={mode!r}: must be 'prefill' or 'decode'")
        self._check_fits(len(ids))
        self.engine.reset()
        step = self.prefill_chunk if mode == "prefill" else 1
        return np.concatenate([self.engine.forward(ids[s:s + step], all_logits=True)
                               for s in range(0, len(ids), step)])

    def _check_fits(self, n: int) -> None:
        if n == 0:
            raise EdgeRuntimeError("no tokens given")
        if n > self.context_length:
            raise EdgeRuntimeError(
                f"the prompt has {n} tokens but the context holds {self.context_length}; shorten the prompt"
            )

    def feed(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Run tokens after those already cached, in prefill chunks; logits [1, vocab] of the last position."""
        ids = np.asarray(token_ids, dtype=np.int64)
        logits = None
        for s in range(0, len(ids), self.prefill_chunk):
            logits = self.engine.forward(ids[s:s + self.prefill_chunk], all_logits=False)
        return logits

    def _prefill(self, ids: list[int]) -> np.ndarray:
        self.engine.reset()
        return self.feed(ids)[-1]

    def generate_tokens(self, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None,
                        seed: int | None = None) -> Iterator[int]:
        """Token ids after `prompt_ids`, stopping at EOS, `max_new_tokens` or the end of the context."""
        if max_new_tokens < 0:
            raise EdgeRuntimeError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        d = self.default_sampling
        sampler = Sampler(SamplingParams(
            temperature=d.temperature if temperature is None else temperature,
            top_k=d.top_k if top_k is None else top_k,
            top_p=d.top_p if top_p is None else top_p,
        ), seed)
        self._check_fits(len(prompt_ids))
        self.stats = stats = GenerationStats(prompt_tokens=len(prompt_ids))
        if max_new_tokens == 0:
            return
        start = time.perf_counter()
        logits = self._prefill(prompt_ids)
        stats.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        position = len(prompt_ids)
        while True:
            token = sampler(logits)
            if token in self.eos_token_ids:
                break
            stats.generated_tokens += 1
            yield token
            if stats.generated_tokens >= max_new_tokens or position >= self.context_length:
                break
            logits = self.engine.forward(np.asarray([token]), all_logits=False)[-1]
            position += 1
            stats.decode_seconds = time.perf_counter() - start

    def stream(self, prompt: str, max_new_tokens: int = 256, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> Iterator[str]:
        """Text pieces of the continuation of `prompt` as they are decoded."""
        decoder = StreamDecoder(self.tokenizer)
        for token in self.generate_tokens(self.encode(prompt), max_new_tokens, temperature, top_k, top_p, seed):
            if piece := decoder.push(token):
                yield piece
        if rest := decoder.flush():
            yield rest

    def generate(self, prompt: str, max_new_tokens: int = 256, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
        """The continuation of `prompt` (the prompt itself is not repeated)."""
        ids = list(self.generate_tokens(self.encode(prompt), max_new_tokens, temperature, top_k, top_p, seed))
        return self.decode(ids)


def load(path: str | Path, *, threads: int | None = None, context_length: int | None = None,
         prefill_chunk: int | None = None, low_memory: bool = False, kv: str = DEFAULT_KV_FORMAT,
         kv_recent: int | None = None, kv_sliding: str = DEFAULT_SLIDING_KV_FORMAT) -> Model:
    """Open an exported artifact directory.

    `kv` is the KV cache format (edge_runtime.kv_formats.KV_FORMATS: fp32, fp16, int8, TurboQuant tq4 to tq2.5
    and their -mse/-prod variants, qjl); `kv_recent` keeps that many most recent tokens exactly besides their
    codes (default: the format's, 32 for compressed formats, 0 for fp32/fp16/int8); `kv_sliding` is the format
    of the sliding layers' rings, which stop at the window (default fp32: exact and fastest). `prefill_chunk`
    (default 256) bounds the prompt tokens run at once. `low_memory` trades prefill speed for resident memory:
    64-token chunks and freed scratch returned to the OS (see `memory.return_freed_memory_to_os`), for
    devices where the model barely fits.
    """
    return Model(Path(path), threads=threads, context_length=context_length, prefill_chunk=prefill_chunk,
                 low_memory=low_memory, kv=kv, kv_recent=kv_recent, kv_sliding=kv_sliding)
