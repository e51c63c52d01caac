"""Gemma 4's shapes from the spec alone: the checkpoint's tensors, and the graphs' weights as the planner counts them.

Both follow the same layers; graphs.py builds what graph_parts counts (tests/test_planner.py holds the two to the
same bytes on every weight format) and tools/make_checkpoint.py derives the tensors again, independently, from
transformers' modeling code.
"""

from __future__ import annotations

from edge_runtime.families.family import HEAD, GraphPart, Linear
from edge_runtime.families.gemma4.config import Gemma4Spec
from edge_runtime.families.gemma4.plan import rows_segment
from edge_runtime.model_spec import ModelSpec
from edge_runtime.weight_recipe import DOWN_PROJ, EMBED, GATE_UP, O_PROJ, PER_LAYER, QKV

EMBEDDING = "embed_tokens.weight"
PLE_TABLE = "embed_tokens_per_layer.weight"
# The graphs' linear weights, by the names their initializers and the manifest's weight_formats carry (the head's is
# every family's HEAD); in a layer they are prefixed "layers.<i>.".
PLE_MODEL_PROJECTION = "per_layer_model_projection"
O_PROJ_NAME, GATE_UP_NAME, DOWN_PROJ_NAME = "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"
PLE_GATE_NAME, PLE_PROJECTION_NAME = "per_layer_input_gate", "per_layer_projection"
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
               "post_per_layer_input_norm")


def checkpoint_tensors(spec: Gemma4Spec) -> dict[str, tuple[int, ...]]:
    """Name (relative to the text model) and shape of every tensor the decoder reads."""
    return {**decoder_tensors(spec), **{f"layers.{i}.layer_scalar": (1,) for i in range(spec.num_hidden_layers)}}


def decoder_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The tensors Gemma 4 and Gemma 3n both read: the embedding and PLE tables, the PLE projection and norm, the final
    norm, and each layer's attention (q, o and q's norm; k, v and k's norm unless KV-shared), MLP, PLE gate and
    projection, and its five norms."""
    s = spec
    h, p, n = s.hidden_size, s.hidden_size_per_layer_input, s.num_hidden_layers
    shapes: dict[str, tuple[int, ...]] = {
        EMBEDDING: (s.vocab_size, h),
        PLE_TABLE: (s.vocab_size_per_layer_input, n * p),
        f"{PLE_MODEL_PROJECTION}.weight": (n * p, h),
        "per_layer_projection_norm.weight": (p,),
        "norm.weight": (h,),
    }
    for i in range(n):
        hd, mlp, pre = s.head_dims[i], s.mlp_size(i), f"layers.{i}."
        shapes.update({
            pre + "self_attn.q_proj.weight": (s.num_attention_heads * hd, h),
            pre + "self_attn.q_norm.weight": (hd,),
            pre + "self_attn.o_proj.weight": (h, s.num_attention_heads * hd),
            pre + "mlp.gate_proj.weight": (mlp, h),
            pre + "mlp.up_proj.weight": (mlp, h),
            pre + "mlp.down_proj.weight": (h, mlp),
            pre + "per_layer_input_gate.weight": (p, h),
            pre + "per_layer_projection.weight": (h, p),
        })
        for norm in LAYER_NORMS:
            shapes[pre + norm + ".weight"] = (h,)
        if not s.is_kv_shared(i):
            shapes[pre + "self_attn.k_proj.weight"] = (s.num_key_value_heads * hd, h)
            shapes[pre + "self_attn.v_proj.weight"] = (s.num_key_value_heads * hd, h)
            shapes[pre + "self_attn.k_norm.weight"] = (hd,)
    return shapes


def graph_parts(spec: Gemma4Spec) -> list[tuple[GraphPart, ...]]:
    """Per segment, its parts as graphs.py builds them: the rest of layer i-1 (gate and up as one stacked weight;
    segment 0: the PLE projection), then layer i's attention inputs (q, k and v as one; the last segment: the head).
    Past the segment that takes rows, a prefill runs them at its last position only."""
    h, p, n = spec.hidden_size, spec.hidden_size_per_layer_input, spec.num_hidden_layers
    cut = rows_segment(spec)

    def rest_of_layer(i: int) -> GraphPart:
        q, m, pre = spec.num_attention_heads * spec.head_dims[i], spec.mlp_size(i), f"layers.{i}."
        return GraphPart((Linear(pre + O_PROJ_NAME, O_PROJ, h, q), Linear(pre + GATE_UP_NAME, GATE_UP, 2 * m, h),
                          Linear(pre + DOWN_PROJ_NAME, DOWN_PROJ, h, m), Linear(pre + PLE_GATE_NAME, PER_LAYER, p, h),
                          Linear(pre + PLE_PROJECTION_NAME, PER_LAYER, h, p)), 4 * h + 1, i < cut)

    def attention_inputs(i: int) -> GraphPart:
        hd, shared = spec.head_dims[i], spec.is_kv_shared(i)
        rows = (spec.num_attention_heads + (0 if shared else 2 * spec.num_key_value_heads)) * hd
        linear = Linear(f"layers.{i}.{qkv_name(shared)}", QKV, rows, h)
        return GraphPart((linear,), h + hd * (1 if shared else 2), i < cut)  # + norms

    def segment(i: int) -> tuple[GraphPart, ...]:
        first = rest_of_layer(i - 1) if i else GraphPart((Linear(PLE_MODEL_PROJECTION, PER_LAYER, n * p, h),), p, True)
        head = GraphPart((Linear(HEAD, EMBED, spec.vocab_size, h),), h, False)
        return first, head if i == n else attention_inputs(i)

    return [segment(i) for i in range(n + 1)]


def qkv_name(shared: bool) -> str:
    """The attention input projection's name: q alone on a KV-shared layer, q, k and v stacked on the others."""
    return "self_attn.q_proj" if shared else "self_attn.qkv_proj"


def activation_width(spec: Gemma4Spec) -> int:
    """Values a prompt token carries through a layer at the widest: the residual stream, its PLE rows and context,
    and the widest attention output plus MLP of a layer that runs at every position."""
    return (spec.hidden_size + 2 * spec.num_hidden_layers * spec.hidden_size_per_layer_input
            + max(spec.num_attention_heads * spec.head_dims[i] + spec.mlp_size(i) for i in spec.cache_layers()))
