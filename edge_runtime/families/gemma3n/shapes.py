"""Gemma 3n's shapes from the spec alone: the checkpoint's tensors, and the graphs' weights as the planner counts them.

Both follow the same layers; graphs.py builds what graph_parts counts (tests/test_planner.py holds the two to the
same bytes on every weight format), and the checkpoint's tensors are what transformers' Gemma3nForCausalLM builds
(tests/test_gemma3n.py), which tools/gemma3n_checkpoint.py derives again, independently, with the KV-shared layers'
published K/V weights that nothing reads.
"""

from __future__ import annotations

from edge_runtime.families.family import HEAD, GraphPart, Linear
from edge_runtime.families.gemma3n.config import Gemma3nSpec
from edge_runtime.families.gemma4.plan import rows_segment
from edge_runtime.families.gemma4.shapes import (
    DOWN_PROJ_NAME,
    GATE_UP_NAME,
    O_PROJ_NAME,
    PLE_GATE_NAME,
    PLE_MODEL_PROJECTION,
    PLE_PROJECTION_NAME,
    decoder_tensors,
    qkv_name,
)
from edge_runtime.weight_recipe import DOWN_PROJ, EMBED, GATE_UP, O_PROJ, OTHER, PER_LAYER, QKV

ALTUP_PROJECTIONS = "altup_projections"  # the S - 1 projections of segment 0, stacked into one weight
LAUREL_LEFT_NAME, LAUREL_RIGHT_NAME = "laurel.linear_left", "laurel.linear_right"


def unembed_name(k: int) -> str:
    """Stream k's (k >= 1) projection back before the head."""
    return f"altup_unembed_projections.{k - 1}"


def checkpoint_tensors(spec: Gemma3nSpec) -> dict[str, tuple[int, ...]]:
    """Name (relative to the text model) and shape of every tensor the decoder reads: Gemma 4's decoder tensors (no
    layer_scalar), AltUp's and LAuReL's."""
    h, streams, r = spec.hidden_size, spec.altup_num_inputs, spec.laurel_rank
    shapes = decoder_tensors(spec)
    for k in range(streams - 1):
        shapes[f"{ALTUP_PROJECTIONS}.{k}.weight"] = (h, h)
        shapes[f"{unembed_name(k + 1)}.weight"] = (h, h)
    for i in range(spec.num_hidden_layers):
        pre = f"layers.{i}."
        shapes.update({
            pre + "altup.correct_output_scale": (h,),
            pre + "altup.correction_coefs.weight": (streams, streams),
            pre + "altup.prediction_coefs.weight": (streams * streams, streams),
            pre + "altup.modality_router.weight": (streams, h),
            pre + "altup.router_norm.weight": (h,),
            pre + f"{LAUREL_LEFT_NAME}.weight": (r, h),
            pre + f"{LAUREL_RIGHT_NAME}.weight": (h, r),
            pre + "laurel.post_laurel_norm.weight": (h,),
        })
    return shapes


def graph_parts(spec: Gemma3nSpec) -> list[tuple[GraphPart, ...]]:
    """Per segment, its parts as graphs.py builds them: the rest of layer i-1 (gate and up as one stacked weight;
    segment 0: the PLE projection and the streams' expansion, one stacked weight), then layer i's AltUp prediction and
    attention inputs (q, k and v as one; the last segment: the streams' collapse and the head). The router and the
    AltUp coefficients are float32 matrices, counted with the vectors. Past the segment that takes rows, a prefill
    runs them at its last position only."""
    h, p, n, s = spec.hidden_size, spec.hidden_size_per_layer_input, spec.num_hidden_layers, spec.altup_num_inputs
    cut = rows_segment(spec)
    router = h + s * h  # router_norm, modality_router

    def rest_of_layer(i: int) -> GraphPart:
        q, m, r = spec.num_attention_heads * spec.head_dims[i], spec.mlp_size(i), spec.laurel_rank
        # input_layernorm again, LAuReL's norm and the layer's other four; correction_coefs, correct_output_scale
        vectors = 6 * h + router + s * s + (h if spec.altup_correct_scale else 0)
        pre = f"layers.{i}."
        return GraphPart((Linear(pre + O_PROJ_NAME, O_PROJ, h, q), Linear(pre + LAUREL_LEFT_NAME, OTHER, r, h),
                          Linear(pre + LAUREL_RIGHT_NAME, OTHER, h, r), Linear(pre + GATE_UP_NAME, GATE_UP, 2 * m, h),
                          Linear(pre + DOWN_PROJ_NAME, DOWN_PROJ, h, m), Linear(pre + PLE_GATE_NAME, PER_LAYER, p, h),
                          Linear(pre + PLE_PROJECTION_NAME, PER_LAYER, h, p)), vectors, i < cut)

    def attention_inputs(i: int) -> GraphPart:
        hd, shared = spec.head_dims[i], spec.is_kv_shared(i)
        rows = (spec.num_attention_heads + (0 if shared else 2 * spec.num_key_value_heads)) * hd
        vectors = router + s * s * s + h + hd * (1 if shared else 2)  # the prediction; input_layernorm, q/k norms
        return GraphPart((Linear(f"layers.{i}.{qkv_name(shared)}", QKV, rows, h),), vectors, i < cut)

    def segment(i: int) -> tuple[GraphPart, ...]:
        if i == 0:
            first: tuple[GraphPart, ...] = (GraphPart((Linear(PLE_MODEL_PROJECTION, PER_LAYER, n * p, h),), p, True),
                                            GraphPart((Linear(ALTUP_PROJECTIONS, OTHER, (s - 1) * h, h),), 0, True))
        else:
            first = (rest_of_layer(i - 1),)
        if i == n:
            unembed = tuple(Linear(unembed_name(k), OTHER, h, h) for k in range(1, s))
            return *first, GraphPart((*unembed, Linear(HEAD, EMBED, spec.vocab_size, h)), h, False)
        return *first, attention_inputs(i)

    return [segment(i) for i in range(n + 1)]


def activation_width(spec: Gemma3nSpec) -> int:
    """Values a prompt token carries through a layer at the widest: the S streams (where Gemma 4 carries one residual
    stream), its PLE rows and context, and the widest attention output plus MLP of a layer that runs at every
    position. The planner's scratch fit per value is Gemma 4's (measured on E2B), not measured on Gemma 3n."""
    return (spec.altup_num_inputs * spec.hidden_size + 2 * spec.num_hidden_layers * spec.hidden_size_per_layer_input
            + max(spec.num_attention_heads * spec.head_dims[i] + spec.mlp_size(i) for i in spec.cache_layers()))
