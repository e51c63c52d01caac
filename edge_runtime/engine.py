"""One forward step of the decoder: numpy glue around one onnxruntime session per graph, run as the artifact's
graph contract says (families/contract.py), whatever the model family.

Per step: the token rows of the main embedding and of the PLE store are read from their memory maps (only those
rows) and the RoPE tables computed; then each graph runs on the values its feeds name, its kept outputs become
values for later graphs, and its query attends over its cache layer's keys and values in the cache's own format
(with the step's own new ones); the cache is committed once every attention ran, and the last graph returns the
logits. When only the next token's logits are wanted, the graph that takes `rows` returns the last position alone
and every value is cut to it: the graphs after it (E2B: the 20 KV-shared layers and the 262144-row head) skip the
rest of the prompt.
A step of one token after the first runs the same operations over buffers bound once (edge_runtime.decode_step):
on a small model the fixed cost per call was most of the step.
Everything the loop needs of the contract (feeds, outputs fetched, where each attention's inputs are among them)
is resolved once at load, so a layer costs the step no more Python than a hand-written loop would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from edge_runtime import onnxruntime_ops
from edge_runtime.artifact import Manifest
from edge_runtime.attention import Block, attend
from edge_runtime.decode_step import DecodeStep
from edge_runtime.embedding import EmbeddingTable
from edge_runtime.errors import ArtifactError, EdgeRuntimeError
from edge_runtime.families.contract import (
    PLE_ROWS,
    ROPE_COS,
    ROPE_SIN,
    ROWS,
    TOKEN_EMBEDDINGS,
    GraphContract,
    Segment,
    rope_table,
)
from edge_runtime.kv_cache import KVCache
from edge_runtime.kv_formats import KVFormat
from edge_runtime.lora_attach import empty_feeds
from edge_runtime.memory import give_back_freed_heap
from edge_runtime.model_spec import embed_scale
from edge_runtime.ple_store import PleStore
from edge_runtime.quant.float_codecs import Float32Codec
from edge_runtime.rope import cos_sin, inverse_frequencies
from edge_runtime.worker_threads import Workers


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
    options.log_severity_level = 3
    return options


def own_operators(manifest: Manifest) -> tuple[str, str] | None:
    """What of an artifact edge-runtime's own onnxruntime operators compute (onnxruntime_ops.py), and how to export
    it without them; None if its graphs do not use them."""
    needs = []
    own = sorted({fmt.name for fmt in manifest.weight_formats.values() if fmt.own_operator})
    if own:
        needs.append((" and ".join(own) + " weights", "--weights int8-block"))
    if manifest.lora_slots is not None and manifest.lora_slots.dtype != "float32":
        needs.append(("LoRA slots", "--lora-slot-precision fp32"))
    if not needs:
        return None
    return (" and ".join(what for what, _ in needs) + " are",
            "re-export with " + " ".join(option for _, option in needs) + " (onnxruntime's own kernels)")


def open_session(path: Path, threads: int | None = None,
                 own_ops: tuple[str, str] | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with its own pool of `threads` (default_threads() by default), knowing
    edge-runtime's own operators where the artifact's graphs use them (`own_ops`: own_operators' answer)."""
    options = _session_options(threads or default_threads())
    if own_ops:
        onnxruntime_ops.register(options, path.parent, *own_ops)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# A session's pool is woken at each of its runs (it stops spinning when a run returns: _session_options), which pays
# only where a run's matrices keep the threads busy for longer than the wake-up. Graphs reading less than this a
# call on average run on one thread: the bundled model (1.5 MB a graph) took 1.29-1.41 ms a decode step on two
# threads and 1.13-1.20 on one, alternating in one process; E2B's graphs read 33 MB each.
SMALL_GRAPH_BYTES = 4 << 20


def default_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class _Attention(NamedTuple):
    """An attention as the step loop reads it: where its query (and new keys and values) are among the graph's
    results, the cache layer it writes and the one it reads, and the query's scale (None for 1)."""

    first: int
    writes: bool
    layer: int
    kv_layer: int
    layer_type: str
    scaling: np.float32 | None
    result: str
    commits: bool  # the last attention: the cache takes the step's keys and values after it


class _Step(NamedTuple):
    session: ort.InferenceSession
    feeds: tuple[tuple[str, str, int | None], ...]  # (graph input, value, layer slice or None)
    fetch: list[str]  # graph outputs: the kept ones, then the attention's query, key and value
    kept: tuple[str, ...]  # the value names of fetch's first outputs
    takes_rows: bool
    attention: _Attention | None


def _steps(contract: GraphContract, sessions: list[ort.InferenceSession], artifact: Path,
           window: Callable[[str], int | None], slot_inputs: frozenset[str]) -> list[_Step]:
    """The contract resolved for the step loop, checked against the graphs themselves and the KV cache's windows."""
    last = max(k for k, segment in enumerate(contract.segments) if segment.attention)
    steps = []
    for k, (segment, session) in enumerate(zip(contract.segments, sessions)):
        attention = segment.attention
        fetch = [*segment.outputs]
        if attention is not None:
            fetch += [attention.query, attention.key, attention.value] if attention.key else [attention.query]
        _check_graph(segment, session, fetch, artifact, slot_inputs)
        if attention is not None and attention.window != window(attention.layer_type):
            raise ArtifactError(f"{artifact / segment.graph}: the manifest gives layer {attention.layer}'s attention "
                                f"window {attention.window}, but its {attention.layer_type} layers' is "
                                f"{window(attention.layer_type)}; the manifest is damaged, re-export")
        steps.append(_Step(
            session, tuple((f.input, f.value, f.layer) for f in segment.feeds), fetch,
            tuple(segment.outputs.values()), segment.takes_rows,
            None if attention is None else _Attention(
                len(segment.outputs), attention.key is not None, attention.layer, attention.kv_layer,
                attention.layer_type, None if attention.scaling == 1.0 else np.float32(attention.scaling),
                attention.result, k == last)))
    return steps


def _check_graph(segment: Segment, session: ort.InferenceSession, fetch: list[str], artifact: Path,
                 slot_inputs: frozenset[str]) -> None:
    inputs = sorted(i.name for i in session.get_inputs() if i.name not in slot_inputs)
    outputs = {o.name for o in session.get_outputs()}
    fed = sorted(f.input for f in segment.feeds)
    if inputs != fed or not outputs >= set(fetch):
        raise ArtifactError(f"{artifact / segment.graph}: takes {inputs} and returns {sorted(outputs)}, but the "
                            f"manifest feeds it {fed} and fetches {fetch}; the artifact is damaged, re-export")


class Engine:
    def __init__(self, artifact: Path, manifest: Manifest, threads: int | None, kv: KVFormat, kv_recent: int,
                 kv_sliding: KVFormat) -> None:
        self.spec = spec = manifest.spec
        artifact = Path(artifact)

        contract = manifest.graphs
        names = [segment.graph for segment in contract.segments]
        graph_threads = 1 if manifest.read_per_token["weights"] / len(names) < SMALL_GRAPH_BYTES else threads

        slots = manifest.lora_slots
        own_ops = own_operators(manifest)

        def session(name: str) -> ort.InferenceSession:
            return open_session(artifact / name, graph_threads, own_ops)

        # The head's segment (the last) first: loading maps a graph's weights and repacks them before unmapping, so
        # the largest graph's transient double copy is best paid while nothing else is resident (E2B int4 block
        # 128: load peak 1.62 GB with the head last, 1.45 GB with it first).
        last = session(names[-1])
        self.segments = [*(session(name) for name in names[:-1]), last]
        self.empty_slots = {} if slots is None else empty_feeds(slots)
        self.steps = _steps(contract, self.segments, artifact, spec.window, frozenset(self.empty_slots))
        # Each graph's LoRA slot inputs (lora_slots.py), fed on every run: empty, or the attached adapter's.
        self.slot_feeds: list[dict[str, np.ndarray]] = [
            {i.name: self.empty_slots[i.name] for i in step.session.get_inputs() if i.name in self.empty_slots}
            for step in self.steps]
        self.logits = contract.logits
        self.token_axes = {name: (slice(None),) * axis for name, axis in contract.token_axes().items()}
        self.embed = EmbeddingTable(artifact, manifest)
        self.ple = PleStore(artifact, manifest.ple_store, manifest.formats["ple"], spec.num_hidden_layers,
                            spec.hidden_size_per_layer_input, embed_scale(spec.hidden_size_per_layer_input),
                            spec.ple_fill_row)
        self.input_vocab = spec.input_vocab_size
        self.inv_freq = {
            t: inverse_frequencies(spec.rope[t], spec.head_dims[spec.layer_types.index(t)])
            for t in set(spec.layer_types)
        }
        self.rope_names = {t: (rope_table(ROPE_COS, t), rope_table(ROPE_SIN, t)) for t in self.inv_freq}
        self.attention_workers = threads or default_threads()
        self.attention_pool = Workers(self.attention_workers) if self.attention_workers > 1 else None
        self.cache = KVCache(spec, kv, kv_recent, kv_sliding)
        self.tokens: list[int] = []  # the ids whose keys and values the cache holds, in order
        self.decode = DecodeStep.build(self)

    def reset(self) -> None:
        self.cache.reset()
        self.tokens.clear()
        if self.decode is not None:
            self.decode.drop_stale()

    def fill(self, depth: int, chunk: int, rng: np.random.Generator) -> None:
        """Empty the cache, then fill `depth` positions: `chunk` random tokens run for real, their keys and values
        committed again at the positions after them until `depth` (Model.fill_cache says why)."""
        self.reset()
        self.cache.reserve(depth)
        chunk = min(depth, chunk)
        written: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        commit = self.cache.commit

        def keep(new_kv: dict[int, tuple[np.ndarray, np.ndarray]], positions: np.ndarray) -> None:
            written.update({layer: (keys.copy(), values.copy()) for layer, (keys, values) in new_kv.items()})
            commit(new_kv, positions)

        self.cache.commit = keep  # the chunk's one commit, seen on its way in
        try:
            self.forward(rng.integers(0, self.input_vocab, chunk), all_logits=False)
        finally:
            del self.cache.commit
        give_back_freed_heap()
        for start in range(chunk, depth, chunk):
            n = min(chunk, depth - start)
            commit({layer: (keys[:, :n], values[:, :n]) for layer, (keys, values) in written.items()},
                   np.arange(start, start + n))
            self.tokens.extend(self.tokens[:n])

    def attach(self, feeds: dict[str, np.ndarray] | None) -> None:
        """Feed the LoRA slots these arrays (lora_attach.py), or empty ones for None, and empty the cache: what it holds
        was computed under the previous adapter, so no prefix of it may be reused."""
        feeds = feeds or self.empty_slots
        for step_feeds in self.slot_feeds:
            for name in step_feeds:
                step_feeds[name] = feeds[name]
        self.decode = DecodeStep.build(self)  # bound to the slots' arrays
        self.reset()

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
            # The one token left to run is the one cached there: its stored keys and values stay (KVCache.truncate).
            self.cache.truncate(keep, keep_next=0 < keep == len(wanted) - 1 and cached[keep] == wanted[keep])
            del self.tokens[keep:]
        return keep

    def forward(self, token_ids: np.ndarray, all_logits: bool) -> np.ndarray:
        """Process these tokens after the cached ones; logits [T or 1, vocab] for all or the last position."""
        spec, cache = self.spec, self.cache
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size == 0:
            raise EdgeRuntimeError("no tokens to process")
        if ids.min() < 0 or ids.max() >= self.input_vocab:
            raise EdgeRuntimeError(spec.refuse_token(int(ids.max() if ids.max() >= self.input_vocab else ids.min())))
        if len(ids) == 1 and cache.length and self.decode is not None:
            return self.decode.run(ids)
        positions = np.arange(cache.length, cache.length + len(ids), dtype=np.int64)
        cache.reserve(len(ids))
        if self.decode is not None:
            self.decode.drop_stale()

        rows = np.arange(len(ids)) if all_logits else np.arange(len(ids) - 1, len(ids))
        values = {TOKEN_EMBEDDINGS: self.embed.rows(ids), PLE_ROWS: self.ple.rows(ids), ROWS: rows}
        for t, f in self.inv_freq.items():
            cos_name, sin_name = self.rope_names[t]
            values[cos_name], values[sin_name] = cos_sin(f, positions)
        seen = {t: cache.visibility(t, positions) for t in self.inv_freq}
        queries = None  # once rows are taken from fewer tokens than the step's: those rows, as a slice
        new_kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        exact: dict[int, list[Block]] = {}
        coded: dict[int, list[Block]] = {}  # a lossy layer's own rows as its codes decode (Visibility.new_coded)
        offered: dict[int, list[list[Block]]] = {}  # per cache layer: the blocks its readers attend over, per KV head
        for (session, feeds, fetch, kept, takes_rows, attention), slot_feeds in zip(self.steps, self.slot_feeds):
            inputs = {name: values[value] if layer is None else values[value][layer] for name, value, layer in feeds}
            if slot_feeds:
                inputs.update(slot_feeds)
            results = session.run(fetch, inputs)
            if takes_rows and len(rows) < len(ids):
                queries = slice(int(rows[0]), int(rows[-1]) + 1)
                for name, value in values.items():
                    if name in self.token_axes:
                        values[name] = value[(*self.token_axes[name], queries)]
            for name, value in zip(kept, results):
                values[name] = value
            if attention is None:
                return values[self.logits]
            first, writes, layer, kv_layer, layer_type, scaling, result, commits = attention
            if writes:
                keys, vals = results[first + 1].transpose(1, 0, 2), results[first + 2].transpose(1, 0, 2)
                new_kv[layer] = (keys, vals)
                exact[layer] = self._exact_blocks(keys, vals, positions)
                if seen[layer_type].new_coded is not None and len(ids) > 1 + cache.recent_of[layer_type]:
                    coded[layer] = self._exact_blocks(*cache.round_trip(layer, keys, vals), positions)
            if kv_layer not in offered:  # a KV-shared layer reads its source's blocks again
                layer_seen = seen[layer_type]
                own = [[new._replace(lower=layer_seen.new[0], upper=layer_seen.new[1])] for new in exact[kv_layer]]
                for head, block in zip(own, coded.get(kv_layer, [])):
                    head.append(block._replace(lower=layer_seen.new_coded[0], upper=layer_seen.new_coded[1]))
                offered[kv_layer] = [[*cached, *mine] for cached, mine in zip(cache.blocks(kv_layer, layer_seen), own)]
            blocks = offered[kv_layer]
            if queries is not None:
                blocks = [[block.rows(queries) for block in head] for head in blocks]
            query = results[first] if scaling is None else results[first] * scaling
            values[result] = attend(query, blocks, self.attention_pool)
            if commits:
                cache.commit(new_kv, positions)
                self.tokens.extend(ids.tolist())
        raise AssertionError("the last graph returns the logits")

    @staticmethod
    def _exact_blocks(keys: np.ndarray, values: np.ndarray, positions: np.ndarray) -> list[Block]:
        """The step's own keys and values [kv_heads, T, hd] as exact blocks (what each token sees is per layer)."""
        codec = Float32Codec(keys.shape[-1])
        return [Block(codec, codec.encode(np.ascontiguousarray(k)), codec, codec.encode(np.ascontiguousarray(v)),
                      positions, positions, positions) for k, v in zip(keys, values)]
