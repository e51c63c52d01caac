"""One forward step of the decoder: numpy glue around one onnxruntime session per graph.

Per step: the token rows of the main embedding and of the PLE store are read from their memory maps (only
those rows), the prologue graph computes PLE's context part, then each layer runs as its attention-inputs
graph, attention over its (source layer's) cache in the cache's own format, and its output graph with its
256-wide PLE slice; the cache is committed once all layers ran.
When only the next token's logits are wanted, KV-shared layers and the head run on the last position only:
their keys and values come from earlier layers, so no later position depends on them (20 of E2B's 35
layers, and the 262144-row head, skip the rest of the prompt).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_runtime.artifact import Manifest
from edge_runtime.attention import Block, attend
from edge_runtime.embedding import EmbeddingTable
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.kv_cache import KVCache
from edge_runtime.kv_formats import KVFormat
from edge_runtime.model_spec import embed_scale
from edge_runtime.ple_store import PleStore
from edge_runtime.quant.float_codecs import Float32Codec
from edge_runtime.rope import cos_sin, inverse_frequencies


def _session_options(threads: int) -> ort.SessionOptions:
    """Each session has its own pool of `threads`, whose workers spin between the parallel sections of a run and
    stop spinning when the run returns.

    onnxruntime's workers otherwise spin for 2^20 pauses after their last task, ~20 ms, longer than the gap
    between two runs: with the process-wide pool (set_global_thread_pool_sizes, which Python cannot tell to stop
    spinning) a worker always spun through attention, on a core attention's threads needed. E2B int4 at 8k, 2
    threads, three alternating runs each: attention 33.6-34.5 -> 22.6-23.6 ms a step, the step 79-80 -> 67-74 ms;
    at depth 0 the steps were level (46-51 ms both ways), so waking a stopped pool once a run costs no more than
    one shared pool did. The idle pools sleep: 36 sessions' workers take no CPU.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # Each session's arena would keep its largest prefill scratch (attention scores over the context) for
    # good: E2B int4, 256-token chunks at depth 1024, peaked 0.7 GB higher with them. Without, scratch is freed.
    options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # KleidiAI stays on (onnxruntime's default; `mlas.disable_kleidiai` would turn it off): on ARM cores with
    # dot-product instructions it runs int4 with activations quantized per row, not per block as x86 and MLAS do.
    # Measured under emulation, that costs ~0.1% perplexity; forcing MLAS's kernel would give up Arm's kernels
    # for these cores for bit-equality with x86 (README "ARM64", int4 decision).
    options.log_severity_level = 3
    return options


def open_session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with its own pool of `threads` (default_threads() by default)."""
    options = _session_options(threads or default_threads())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def default_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class Engine:
    def __init__(self, artifact: Path, manifest: Manifest, threads: int | None, kv: KVFormat, kv_recent: int,
                 kv_sliding: KVFormat) -> None:
        self.spec = spec = manifest.spec
        artifact = Path(artifact)

        def session(name: str) -> ort.InferenceSession:
            return open_session(artifact / name, threads)

        # The head's segment (the last) first: loading maps a graph's weights and repacks them before unmapping, so
        # the largest graph's transient double copy is best paid while nothing else is resident (E2B int4 block
        # 128: load peak 1.62 GB with the head last, 1.45 GB with it first).
        names = manifest.graphs["segments"]
        last = session(names[-1])
        self.segments = [*(session(name) for name in names[:-1]), last]
        self.rows_segment = manifest.graphs["rows_segment"]
        self.embed = EmbeddingTable(artifact, manifest)
        self.ple = PleStore(artifact, manifest.ple_store, manifest.formats["ple"], spec.num_hidden_layers,
                            spec.hidden_size_per_layer_input, embed_scale(spec.hidden_size_per_layer_input))
        self.inv_freq = {
            t: inverse_frequencies(spec.rope[t], spec.head_dims[spec.layer_types.index(t)])
            for t in set(spec.layer_types)
        }
        self.attention_workers = threads or default_threads()
        self.attention_pool = ThreadPoolExecutor(self.attention_workers, "attention") if self.attention_workers > 1 else None
        self.cache = KVCache(spec, kv, kv_recent, kv_sliding)
        self.tokens: list[int] = []  # the ids whose keys and values the cache holds, in order

    def reset(self) -> None:
        self.cache.reset()
        self.tokens.clear()

    def reuse(self, token_ids: list[int]) -> int:
        """Keep the longest cached prefix of `token_ids` that leaves at least one token to run; return its length.

        This is what makes a chat turn (or any prompt sharing a start with the last one) process only its new
        tokens. Where the cache cannot be cut back far enough (KVCache.can_truncate), it starts over.
        """
        cached = np.asarray(self.tokens, dtype=np.int64)
        wanted = np.asarray(token_ids, dtype=np.int64)
        n = min(len(cached), len(wanted) - 1)
        differs = np.flatnonzero(cached[:n] != wanted[:n])
        keep = int(differs[0]) if len(differs) else max(n, 0)
        if keep < len(cached):
            if not self.cache.can_truncate(keep):
                keep = 0
            self.cache.truncate(keep)
            del self.tokens[keep:]
        return keep

    def forward(self, token_ids: np.ndarray, all_logits: bool) -> np.ndarray:
        """Process these tokens after the cached ones; logits [T or 1, vocab] for all or the last position."""
        spec, cache = self.spec, self.cache
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size == 0:
            raise EdgeRuntimeError("no tokens to process")
        if ids.min() < 0 or ids.max() >= spec.vocab_size:
            raise EdgeRuntimeError(f"token id {int(ids.max() if ids.max() >= spec.vocab_size else ids.min())} "
                                   f"is outside the model's vocabulary of {spec.vocab_size}")
        positions = np.arange(cache.length, cache.length + len(ids), dtype=np.int64)
        cache.reserve(len(ids))

        hidden = self.embed.rows(ids)
        ple_rows = self.ple.rows(ids)
        rope = {t: cos_sin(f, positions) for t, f in self.inv_freq.items()}
        seen = {t: cache.visibility(t, positions) for t in self.inv_freq}
        rows = np.arange(len(ids)) if all_logits else np.arange(len(ids) - 1, len(ids))
        queries = slice(None)  # the token rows still carried: all of them until the rows segment
        new_kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        exact: dict[int, list[Block]] = {}
        offered: dict[int, list[list[Block]]] = {}  # per source layer: the blocks its attention reads, per KV head
        feeds = {"inputs_embeds": hidden}
        for i, segment in enumerate(self.segments):
            if i == self.rows_segment:
                feeds["rows"] = rows
            if i == spec.num_hidden_layers:
                return segment.run(["logits"], feeds)[0]
            layer_type, source = spec.layer_types[i], spec.kv_sources[i]
            if i == self.rows_segment:
                queries = slice(int(rows[0]), int(rows[-1]) + 1)
            cos, sin = rope[layer_type]
            feeds["cos"], feeds["sin"] = cos[queries], sin[queries]
            names = ["query", "ple_context" if i == 0 else "hidden_out"]
            names += [] if spec.is_kv_shared(i) else ["key", "value"]
            outputs = dict(zip(names, segment.run(names, feeds)))
            if i == 0:
                ple_context = outputs["ple_context"]
            else:
                hidden = outputs["hidden_out"]
            if not spec.is_kv_shared(i):
                keys, values = outputs["key"].transpose(1, 0, 2), outputs["value"].transpose(1, 0, 2)
                new_kv[i] = (keys, values)
                exact[i] = self._exact_blocks(keys, values, positions)
            layer_seen = seen[layer_type]
            if source not in offered:  # a KV-shared layer reads its source's blocks again
                offered[source] = [[*cached, new._replace(lower=layer_seen.new[0], upper=layer_seen.new[1])]
                                   for cached, new in zip(cache.blocks(source, layer_seen), exact[source])]
            blocks = offered[source]
            if queries != slice(None):
                blocks = [[block.rows(queries) for block in head] for head in blocks]
            feeds = {"hidden": hidden,
                     "attention": attend(outputs["query"], blocks, self.attention_pool, self.attention_workers),
                     "ple_rows": ple_rows[i, queries], "ple_context": ple_context[i, queries]}
            if i + 1 == spec.num_hidden_layers:
                cache.commit(new_kv, positions)
                self.tokens.extend(ids.tolist())
        raise AssertionError("the last segment returns the logits")

    @staticmethod
    def _exact_blocks(keys: np.ndarray, values: np.ndarray, positions: np.ndarray) -> list[Block]:
        """The step's own keys and values [kv_heads, T, hd] as exact blocks (what each token sees is per layer)."""
        codec = Float32Codec(keys.shape[-1])
        return [Block(codec, codec.encode(np.ascontiguousarray(k)), codec, codec.encode(np.ascontiguousarray(v)),
                      positions, positions, positions) for k, v in zip(keys, values)]
