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
    TOKENS,
    Feed,
    GraphContract,
)
from edge_runtime.families.gemma3n.config import Gemma3nSpec
from edge_runtime.families.gemma4.plan import LOGITS, PLE_CONTEXT, segments

# Graph input and output names beyond Gemma 4's (graphs.py builds the graphs with them)
PREDICTIONS, PREDICTIONS_OUT = "predictions", "predictions_out"


def contract(spec: Gemma3nSpec) -> GraphContract:
    """Gemma 4's chain of graphs (gemma4/plan.segments) carrying AltUp's streams [T, S, H] where Gemma 4 carries one
    residual stream: each graph returns the next layer's predictions, which the next graph takes."""
    return GraphContract(carried={PREDICTIONS: (TOKENS, "streams", "hidden"),
                                  PLE_CONTEXT: ("layers", TOKENS, "ple_width")},
                         segments=segments(spec, lambda i: Feed(PREDICTIONS, PREDICTIONS),
                                           lambda i: {PREDICTIONS_OUT: PREDICTIONS,
                                                      **({PLE_CONTEXT: PLE_CONTEXT} if i == 0 else {})}),
                         logits=LOGITS)
