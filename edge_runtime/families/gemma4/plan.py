"""Gemma 4's step plan: one graph per attention, and what flows between them (contract.py says what this declares).

Segment i runs the rest of layer i-1 (o_proj, MLP, PLE) and then layer i's attention inputs; segment 0 also
projects the PLE context from the token embeddings, and the last segment ends in the LM head. Carried between
graphs: `hidden` [T, H], the residual stream, and `ple_context` [layers, T, p], computed once by segment 0 and
sliced per layer. Every attention has scaling 1.0 (the q/k norms set the logits' scale) and no softcap; a
KV-shared layer reads the cache of the last unshared layer of its type (ModelSpec.kv_sources). The segment that
starts the KV-shared layers (the head's, when none are) takes `rows`. graphs.py builds graphs with these names.
"""

from __future__ import annotations

from collections.abc import Callable

from edge_runtime.families.contract import (
    PLE_ROWS,
    ROPE_COS,
    ROPE_SIN,
    ROWS,
    TOKEN_EMBEDDINGS,
    TOKENS,
    Attention,
    Feed,
    GraphContract,
    Segment,
    rope_table,
    segment_graph,
)
from edge_runtime.families.gemma4.config import Gemma4Spec
from edge_runtime.model_spec import ModelSpec

# Graph input and output names (graphs.py builds the graphs with them)
INPUTS_EMBEDS, COS, SIN, ROWS_INPUT = "inputs_embeds", "cos", "sin", "rows"
HIDDEN, ATTENTION, PLE_ROWS_INPUT, PLE_CONTEXT = "hidden", "attention", "ple_rows", "ple_context"
HIDDEN_OUT, QUERY, KEY, VALUE, LOGITS = "hidden_out", "query", "key", "value", "logits"


def rows_segment(spec: ModelSpec) -> int:
    """The segment that takes `rows`: where the KV-shared layers start, else the head's (Gemma 3n's plan too)."""
    return spec.first_shared_layer if spec.num_kv_shared_layers else spec.num_hidden_layers


def contract(spec: Gemma4Spec) -> GraphContract:
    """One residual stream [T, hidden] carried from graph to graph (the first takes the scaled embedding rows)."""
    return GraphContract(carried={HIDDEN: (TOKENS, "hidden"), PLE_CONTEXT: ("layers", TOKENS, "ple_width")},
                         segments=segments(spec, lambda i: Feed(HIDDEN, TOKEN_EMBEDDINGS if i == 1 else HIDDEN),
                                           lambda i: {PLE_CONTEXT: PLE_CONTEXT} if i == 0 else {HIDDEN_OUT: HIDDEN}),
                         logits=LOGITS)


def segments(spec: ModelSpec, state: Callable[[int], Feed], outputs: Callable[[int], dict[str, str]]
             ) -> tuple[Segment, ...]:
    """The graphs of a decoder cut at each attention, Gemma 4's and Gemma 3n's alike: graph 0 takes the embedding
    rows, graph i > 0 the rest of layer i - 1 (fed the carried `state(i)`, the previous attention's result and layer
    i - 1's PLE rows and context), and every graph but the last computes layer i's attention inputs with its RoPE
    tables and returns `outputs(i)`; the last returns the logits, and the one that starts the KV-shared layers takes
    `rows`."""
    n, cut = spec.num_hidden_layers, rows_segment(spec)
    chain = []
    for i in range(n + 1):
        if i == 0:
            feeds = [Feed(INPUTS_EMBEDS, TOKEN_EMBEDDINGS)]
        else:  # the rest of layer i - 1
            feeds = [state(i), Feed(ATTENTION, ATTENTION), Feed(PLE_ROWS_INPUT, PLE_ROWS, i - 1),
                     Feed(PLE_CONTEXT, PLE_CONTEXT, i - 1)]
        if i == cut:
            feeds.append(Feed(ROWS_INPUT, ROWS))
        if i == n:
            chain.append(Segment(segment_graph(i), tuple(feeds), {LOGITS: LOGITS}, None, i == cut))
            break
        layer_type, shared = spec.layer_types[i], spec.is_kv_shared(i)
        feeds += [Feed(COS, rope_table(ROPE_COS, layer_type)), Feed(SIN, rope_table(ROPE_SIN, layer_type))]
        attention = Attention(layer=i, kv_layer=spec.kv_sources[i], layer_type=layer_type,
                              window=spec.window(layer_type), scaling=1.0, softcap=None, query=QUERY,
                              key=None if shared else KEY, value=None if shared else VALUE, result=ATTENTION)
        chain.append(Segment(segment_graph(i), tuple(feeds), outputs(i), attention, i == cut))
    return tuple(chain)
