"""Gemma 4 "E" text decoder as ONNX graphs cut only where attention is: one segment per attention (plan.py).

Attention is the runtime's (edge_runtime.attention), because it reads the KV cache in whatever format the user
picked at run time, including TurboQuant and QJL codes no ONNX operator understands. Everything between two
attentions is one graph: segment i runs the rest of layer i-1 (o_proj, MLP, PLE) and then layer i's attention
inputs (norm, q/k/v, their norms and RoPE); segment 0 also projects the PLE context, and the last segment ends
in the final norm and the LM head. A decode step is thus N + 1 onnxruntime calls (E2B: 36, where cutting each
layer in two took 72), and every call does as much as it can.

Within a segment the nodes are few and fused where onnxruntime has a kernel for it (a step of E2B runs some
1,500 nodes, and at batch 1 each costs microseconds whatever its size): q, k and v come from one matrix product
(their rows concatenated: the same codes and scales, row for row, in every format), gate and up likewise; the
residual add and the next norm are one SkipSimplifiedLayerNormalization; RoPE is com.microsoft.RotaryEmbedding,
fed the step's own cos/sin rows.

Tensors cross segments in the layouts the runtime uses without copying (contract.py; plan.py names them). The
segment that takes `rows` gathers those token rows of the residual stream and of its RoPE tables: everything after
runs on them alone.
lm_head, ple_context and attention_inputs are Gemma 3n's too (families/gemma3n/graphs.py): its attention, PLE context
and head are Gemma 4's.
Needs onnx: only export imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto

from edge_runtime.export.onnx_graph import MS_DOMAIN, GraphBuilder, LinearWeight
from edge_runtime.families.family import HEAD
from edge_runtime.families.gemma4.config import Gemma4Spec
from edge_runtime.families.gemma4.plan import (
    ATTENTION,
    COS,
    HIDDEN,
    HIDDEN_OUT,
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
from edge_runtime.families.gemma4.shapes import (
    DOWN_PROJ_NAME,
    GATE_UP_NAME,
    O_PROJ_NAME,
    PLE_GATE_NAME,
    PLE_MODEL_PROJECTION,
    PLE_PROJECTION_NAME,
    qkv_name,
)
from edge_runtime.model_spec import ModelSpec
from edge_runtime.weight_recipe import DOWN_PROJ, GATE_UP, O_PROJ, PER_LAYER, QKV, WeightRecipe

Weights = Callable[[str], np.ndarray]
NewGraph = Callable[[str], GraphBuilder]


def build_segment(spec: Gemma4Spec, i: int, w: Weights, head: LinearWeight, recipe: WeightRecipe, new_graph: NewGraph,
                  path: Path) -> int:
    """Write segment i's graph to `path`, each linear in the format `recipe` gives its role; returns the weight bytes
    it reads per call."""
    g = new_graph(path.stem)
    n, h = spec.num_hidden_layers, spec.hidden_size
    if i == 0:
        hidden = g.input(INPUTS_EMBEDS, ["T", h])
        g.output(ple_context(spec, g, w, hidden, recipe), PLE_CONTEXT, [n, "T", spec.hidden_size_per_layer_input])
    else:
        hidden = _layer_output(spec, i - 1, g, w, recipe)
    rows = g.input(ROWS_INPUT, ["R"], TensorProto.INT64) if i == rows_segment(spec) else None
    if rows is not None:
        hidden = g.op("Gather", hidden, rows, axis=0)
    if i == n:
        lm_head(spec, g, w, hidden, head)
    else:
        if i > 0:
            g.output(hidden, HIDDEN_OUT, ["T", h])
        attention_inputs(spec, i, g, w, recipe, hidden, rows)
    return g.save(path)


def lm_head(spec: ModelSpec, g: GraphBuilder, w: Weights, hidden: str, head: LinearWeight) -> None:
    """The final norm, the tied LM head and the logit softcap, returned as the logits."""
    x = g.rms_norm(hidden, g.weight("norm", w("norm.weight")), spec.rms_norm_eps)
    logits = g.linear(x, HEAD, head)
    cap = spec.final_logit_softcapping
    if cap is not None:
        logits = g.op("Mul", g.op("Tanh", g.op("Mul", logits, g.const(1.0 / cap))), g.const(cap))
    g.output(logits, LOGITS, ["T", spec.vocab_size])


def ple_context(spec: ModelSpec, g: GraphBuilder, w: Weights, embeds: str, recipe: WeightRecipe) -> str:
    """Context part of PLE: RMSNorm(proj(embeds) / sqrt(H)) as [layers, T, width]."""
    n, p = spec.num_hidden_layers, spec.hidden_size_per_layer_input
    [proj] = g.slotted_linear(embeds, PLE_MODEL_PROJECTION, w(f"{PLE_MODEL_PROJECTION}.weight"),
                              recipe.format_for(PER_LAYER), spec.hidden_size, [(PLE_MODEL_PROJECTION, n * p)])
    proj = g.op("Mul", proj, g.const(spec.hidden_size ** -0.5))
    proj = g.reshape(proj, [0, n, p])
    proj = g.rms_norm(proj, g.weight("per_layer_projection_norm", w("per_layer_projection_norm.weight")),
                      spec.rms_norm_eps)
    return g.op("Transpose", proj, perm=[1, 0, 2])


def _rope(g: GraphBuilder, x: str, heads: int, head_dim: int, cos: str, sin: str) -> str:
    """Rotate-half RoPE on x [T, heads, head_dim] with the step's cos/sin rows [T, head_dim / 2]."""
    flat = g.reshape(x, [1, -1, heads * head_dim])
    rotated = g.op("RotaryEmbedding", flat, g.const([0], np.int64), cos, sin, domain=MS_DOMAIN, interleaved=0,
                   num_heads=heads, rotary_embedding_dim=head_dim)
    return g.reshape(rotated, [-1, heads, head_dim])


def attention_inputs(spec: ModelSpec, i: int, g: GraphBuilder, w: Weights, recipe: WeightRecipe, hidden: str,
                      rows: str | None) -> None:
    """Layer i's normed, rotated queries (and, unless it is KV-shared, its new keys and values); `rows`: the token
    rows `hidden` was gathered at, which the RoPE tables are gathered at too."""
    hd, eps = spec.head_dims[i], spec.rms_norm_eps
    nh, kvh = spec.num_attention_heads, spec.num_key_value_heads
    pre = f"layers.{i}."
    shared = spec.is_kv_shared(i)

    def weight(name: str) -> str:
        return g.weight(name, w(pre + name))

    cos = g.input(COS, ["T", hd // 2])
    sin = g.input(SIN, ["T", hd // 2])
    if rows is not None:
        cos, sin = g.op("Gather", cos, rows, axis=0), g.op("Gather", sin, rows, axis=0)
    x = g.rms_norm(hidden, weight("input_layernorm.weight"), eps)
    projections = ["q_proj"] if shared else ["q_proj", "k_proj", "v_proj"]
    stacked = np.concatenate([w(f"{pre}self_attn.{name}.weight") for name in projections])
    widths = [nh * hd] + ([] if shared else [kvh * hd, kvh * hd])
    parts = g.slotted_linear(x, pre + qkv_name(shared), stacked, recipe.format_for(QKV), spec.hidden_size,
                             [(f"{pre}self_attn.{name}", width) for name, width in zip(projections, widths)])
    q = g.rms_norm(g.reshape(parts[0], [0, nh, hd]), weight("self_attn.q_norm.weight"), eps)
    q = _rope(g, q, nh, hd, cos, sin)
    g.output(g.reshape(q, [0, kvh, nh // kvh, hd]), QUERY, ["T", kvh, nh // kvh, hd])
    if not shared:
        k = g.rms_norm(g.reshape(parts[1], [0, kvh, hd]), weight("self_attn.k_norm.weight"), eps)
        g.output(_rope(g, k, kvh, hd, cos, sin), KEY, ["T", kvh, hd])
        v = g.rms_norm(g.reshape(parts[2], [0, kvh, hd]), None, eps, hd)
        g.output(v, VALUE, ["T", kvh, hd])


def _layer_output(spec: Gemma4Spec, i: int, g: GraphBuilder, w: Weights, recipe: WeightRecipe) -> str:
    """Layer i after attention: o_proj, MLP and the layer's PLE contribution, on the residual stream."""
    h, eps, mlp = spec.hidden_size, spec.rms_norm_eps, spec.mlp_size(i)
    pre = f"layers.{i}."

    def weight(name: str) -> str:
        return g.weight(name, w(pre + name))

    def slotted(x: str, name: str, role: str, in_width: int, out_width: int = h) -> str:
        """The linear, plus its LoRA slot's update if it has one (its name is also the slot's tensor)."""
        return g.slotted_linear(x, pre + name, w(pre + name + ".weight"), recipe.format_for(role), in_width,
                                [(pre + name, out_width)])[0]

    hidden = g.input(HIDDEN, ["T", h])
    attn = g.input(ATTENTION, ["T", spec.num_attention_heads * spec.head_dims[i]])
    ple_rows = g.input(PLE_ROWS_INPUT, ["T", spec.hidden_size_per_layer_input])
    ple_context = g.input(PLE_CONTEXT, ["T", spec.hidden_size_per_layer_input])

    attn_width = spec.num_attention_heads * spec.head_dims[i]
    attn = g.rms_norm(slotted(attn, O_PROJ_NAME, O_PROJ, attn_width), weight("post_attention_layernorm.weight"), eps)
    x, hidden = g.skip_rms_norm(hidden, attn, weight("pre_feedforward_layernorm.weight"), eps)
    stacked = np.concatenate([w(pre + "mlp.gate_proj.weight"), w(pre + "mlp.up_proj.weight")])
    gate, up = g.slotted_linear(x, pre + GATE_UP_NAME, stacked, recipe.format_for(GATE_UP), h,
                                [(f"{pre}mlp.gate_proj", mlp), (f"{pre}mlp.up_proj", mlp)])
    mlp_out = slotted(g.op("Mul", g.gelu_tanh(gate), up), DOWN_PROJ_NAME, DOWN_PROJ, mlp)
    hidden = g.op("Add", hidden, g.rms_norm(mlp_out, weight("post_feedforward_layernorm.weight"), eps))

    per_layer = g.op("Mul", g.op("Add", ple_context, ple_rows), g.const(2.0 ** -0.5))
    p = spec.hidden_size_per_layer_input
    gate = g.gelu_tanh(slotted(hidden, PLE_GATE_NAME, PER_LAYER, h, p))
    ple = slotted(g.op("Mul", gate, per_layer), PLE_PROJECTION_NAME, PER_LAYER, p)
    hidden = g.op("Add", hidden, g.rms_norm(ple, weight("post_per_layer_input_norm.weight"), eps))
    return g.op("Mul", hidden, weight("layer_scalar"))
