"""Gemma 4's step plan: one graph per attention, and what flows between them (contract.py says what this declares).

Segment i runs the rest of layer i-1 (o_proj, MLP, PLE) and then layer i's attention inputs; segment 0 also
projects the PLE context from the token embeddings, and the last segment ends in the LM head. Carried between
graphs: `hidden` [T, H], the residual stream, and `ple_context` [layers, T, p], computed once by segment 0 and
sliced per layer. Every attention has scaling 1.0 (the q/k norms set the logits' scale) and no softcap; a
KV-shared layer reads the cache of the last unshared layer of its type (ModelSpec.kv_sources). The segment that
starts the KV-shared layers (the head's, when none are) takes `rows`. graphs.py builds graphs with these names.
"""

from __future__ import annotations

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
    n = spec.num_hidden_layers
    segments = []
    for i in range(n + 1):
        if i == 0:
            feeds = [Feed(INPUTS_EMBEDS, TOKEN_EMBEDDINGS)]
        else:  # the rest of layer i - 1
            feeds = [Feed(HIDDEN, TOKEN_EMBEDDINGS if i == 1 else HIDDEN), Feed(ATTENTION, ATTENTION),
                     Feed(PLE_ROWS_INPUT, PLE_ROWS, i - 1), Feed(PLE_CONTEXT, PLE_CONTEXT, i - 1)]
        if i == rows_segment(spec):
            feeds.append(Feed(ROWS_INPUT, ROWS))
        if i == n:
            segments.append(Segment(segment_graph(i), tuple(feeds), {LOGITS: LOGITS}, None, i == rows_segment(spec)))
            break
        layer_type, shared = spec.layer_types[i], spec.is_kv_shared(i)
        feeds += [Feed(COS, rope_table(ROPE_COS, layer_type)), Feed(SIN, rope_table(ROPE_SIN, layer_type))]
        attention = Attention(layer=i, kv_layer=spec.kv_sources[i], layer_type=layer_type,
                              window=spec.window(layer_type), scaling=1.0, softcap=None, query=QUERY,
                              key=None if shared else KEY, value=None if shared else VALUE, result=ATTENTION)
        outputs = {PLE_CONTEXT: PLE_CONTEXT} if i == 0 else {HIDDEN_OUT: HIDDEN}
        segments.append(Segment(segment_graph(i), tuple(feeds), outputs, attention, i == rows_segment(spec)))
    return GraphContract(carried={HIDDEN: (TOKENS, "hidden"), PLE_CONTEXT: ("layers", TOKENS, "ple_width")},
                         segments=tuple(segments), logits=LOGITS)
