"""Gemma 3n's step plan: one graph per attention, as Gemma 4's, with AltUp's streams carried between them.

Segment i runs the rest of layer i-1 (LAuReL, o_proj, MLP, AltUp's correction and PLE) and then layer i's AltUp
prediction and attention inputs; segment 0 also projects the PLE context and expands the token embeddings into the
streams, and the last segment collapses the streams and ends in the LM head. Carried between graphs: `predictions`
[T, streams, H], the streams as AltUp's predict step leaves them (stream 0, the active one, goes through attention),
and `ple_context` [layers, T, p]. The next graph normalizes the active stream again for LAuReL, rather than carrying
that norm: one more norm per layer against one more [T, H] tensor per boundary. Attention is Gemma 4's: scaling 1.0
(the q/k norms set the logits' scale), no softcap, a KV-shared layer reading the last unshared layer of its type, and
the segment that starts the KV-shared layers (the head's, when none are) takes `rows`.
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
from edge_runtime.families.gemma3n.config import Gemma3nSpec
from edge_runtime.families.gemma4.plan import (
    ATTENTION,
    COS,
    INPUTS_EMBEDS,
    KEY,
    LOGITS,
    PLE_CONTEXT,
    PLE_ROWS_INPUT,
    QUERY,
    ROWS_INPUT,
    SIN,
    VALUE,
    rows_segment,
)

# Graph input and output names beyond Gemma 4's (graphs.py builds the graphs with them)
PREDICTIONS, PREDICTIONS_OUT = "predictions", "predictions_out"


def contract(spec: Gemma3nSpec) -> GraphContract:
    n, cut = spec.num_hidden_layers, rows_segment(spec)
    segments = []
    for i in range(n + 1):
        if i == 0:
            feeds = [Feed(INPUTS_EMBEDS, TOKEN_EMBEDDINGS)]
        else:  # the rest of layer i - 1
            feeds = [Feed(PREDICTIONS, PREDICTIONS), Feed(ATTENTION, ATTENTION), Feed(PLE_ROWS_INPUT, PLE_ROWS, i - 1),
                     Feed(PLE_CONTEXT, PLE_CONTEXT, i - 1)]
        if i == cut:
            feeds.append(Feed(ROWS_INPUT, ROWS))
        if i == n:
            segments.append(Segment(segment_graph(i), tuple(feeds), {LOGITS: LOGITS}, None, i == cut))
            break
        layer_type, shared = spec.layer_types[i], spec.is_kv_shared(i)
        feeds += [Feed(COS, rope_table(ROPE_COS, layer_type)), Feed(SIN, rope_table(ROPE_SIN, layer_type))]
        attention = Attention(layer=i, kv_layer=spec.kv_sources[i], layer_type=layer_type,
                              window=spec.window(layer_type), scaling=1.0, softcap=None, query=QUERY,
                              key=None if shared else KEY, value=None if shared else VALUE, result=ATTENTION)
        outputs = {PREDICTIONS_OUT: PREDICTIONS, **({PLE_CONTEXT: PLE_CONTEXT} if i == 0 else {})}
        segments.append(Segment(segment_graph(i), tuple(feeds), outputs, attention, i == cut))
    return GraphContract(carried={PREDICTIONS: (TOKENS, "streams", "hidden"),
                                  PLE_CONTEXT: ("layers", TOKENS, "ple_width")},
                         segments=tuple(segments), logits=LOGITS)
