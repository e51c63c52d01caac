"""Gemma 4 "E" text decoder as ONNX graphs: PLE prologue, one graph per decoder layer, and the LM head.

Layer graphs take their KV cache as read-only inputs ([kv_heads, head_dim, slots] keys, pre-transposed so
scores are a plain MatMul, and [kv_heads, slots, head_dim] values) plus additive masks, and return the
new tokens' keys and values for the runtime to place in its cache. Attention is split into a "past" block
and a "new tokens" block joined by a two-block softmax, so no step ever copies the cache: decode costs
O(1) cache writes and one read of the cache, whatever the context. KV-shared layers receive their source
layer's cache and new keys/values, and may be run for fewer query tokens than there are new keys (prefill
only needs the last position's hidden state past the first shared layer).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_runtime.artifact import HEAD_GRAPH, PROLOGUE_GRAPH, layer_graph
from edge_runtime.model_spec import ModelSpec
from export.onnx_graph import GraphBuilder, LinearWeight

Weights = Callable[[str], np.ndarray]
NewGraph = Callable[[str], GraphBuilder]


def build_prologue(spec: ModelSpec, w: Weights, new_graph: NewGraph, out: Path) -> int:
    """Context part of PLE: RMSNorm(proj(embeds) / sqrt(H)) as [layers, T, width]."""
    g = new_graph("prologue")
    n, p = spec.num_hidden_layers, spec.hidden_size_per_layer_input
    x = g.input("inputs_embeds", ["T", spec.hidden_size])
    proj = g.linear(x, "per_layer_model_projection", w("per_layer_model_projection.weight"))
    proj = g.op("Mul", proj, g.const(spec.hidden_size ** -0.5))
    proj = g.reshape(proj, [0, n, p])
    proj = g.rms_norm(proj, g.weight("per_layer_projection_norm", w("per_layer_projection_norm.weight")),
                      spec.rms_norm_eps)
    g.output(g.op("Transpose", proj, perm=[1, 0, 2]), "ple_context", [n, "T", p])
    return g.save(out / PROLOGUE_GRAPH)


def build_head(spec: ModelSpec, w: Weights, embed: LinearWeight, new_graph: NewGraph, out: Path) -> int:
    """Final norm, tied LM head (the embedding table as the exporter wrote it) and logit softcapping."""
    g = new_graph("head")
    x = g.input("hidden", ["T", spec.hidden_size])
    x = g.rms_norm(x, g.weight("norm", w("norm.weight")), spec.rms_norm_eps)
    logits = g.linear(x, "embed_tokens", embed)
    cap = spec.final_logit_softcapping
    if cap is not None:
        logits = g.op("Mul", g.op("Tanh", g.op("Mul", logits, g.const(1.0 / cap))), g.const(cap))
    g.output(logits, "logits", ["T", spec.vocab_size])
    return g.save(out / HEAD_GRAPH)


def _rope(g: GraphBuilder, x: str, cos: str, sin: str) -> str:
    """x * cos + rotate_half(x) * sin on [T, heads, head_dim], cos/sin given as [T, 1, head_dim]."""
    x1, x2 = g.op("Split", x, axis=-1, num_outputs=2, n_out=2)
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def build_layer(spec: ModelSpec, i: int, w: Weights, new_graph: NewGraph, out: Path) -> int:
    g = new_graph(f"layer_{i}")
    h, hd, eps = spec.hidden_size, spec.head_dims[i], spec.rms_norm_eps
    nh, kvh = spec.num_attention_heads, spec.num_key_value_heads
    groups, shared = nh // kvh, spec.is_kv_shared(i)
    pre = f"layers.{i}."

    def weight(name: str) -> str:
        return g.weight(name, w(pre + name))

    def linear(x: str, name: str) -> str:
        return g.linear(x, name, w(pre + name + ".weight"))

    hidden = g.input("hidden", ["T", h])
    ple_rows = g.input("ple_rows", ["T", spec.hidden_size_per_layer_input])
    ple_context = g.input("ple_context", ["T", spec.hidden_size_per_layer_input])
    # Inputs come with the singleton axes attention broadcasts over (numpy views, free), sparing a node each.
    cos = g.input("cos", ["T", 1, hd])
    sin = g.input("sin", ["T", 1, hd])
    past_kt = g.input("past_key_t", [kvh, 1, hd, "S"])
    past_v = g.input("past_value", [kvh, 1, "S", hd])
    mask_past = g.input("mask_past", ["T", "S"])
    mask_new = g.input("mask_new", ["T", "N"])

    x = g.rms_norm(hidden, weight("input_layernorm.weight"), eps)
    q = g.reshape(linear(x, "self_attn.q_proj"), [0, nh, hd])
    q = _rope(g, g.rms_norm(q, weight("self_attn.q_norm.weight"), eps), cos, sin)
    q = g.op("Transpose", g.reshape(q, [0, kvh, groups, hd]), perm=[1, 2, 0, 3])  # [kvh, G, T, hd]

    if shared:
        new_kt = g.input("new_key_t", [kvh, 1, hd, "N"])
        new_v = g.input("new_value", [kvh, 1, "N", hd])
    else:
        k = g.reshape(linear(x, "self_attn.k_proj"), [0, kvh, hd])
        k = _rope(g, g.rms_norm(k, weight("self_attn.k_norm.weight"), eps), cos, sin)
        v = g.rms_norm(g.reshape(linear(x, "self_attn.v_proj"), [0, kvh, hd]), None, eps, hd)
        key_t = g.op("Transpose", k, perm=[1, 2, 0])  # [kvh, hd, N]
        value = g.op("Transpose", v, perm=[1, 0, 2])  # [kvh, N, hd]
        g.output(key_t, "present_key_t", [kvh, hd, "T"])
        g.output(value, "present_value", [kvh, "T", hd])
        new_kt, new_v = g.unsqueeze(key_t, 1), g.unsqueeze(value, 1)

    # Gemma 4 attention has scaling 1.0: q and k are RMS-normalised instead.
    s_past = g.op("Add", g.op("MatMul", q, past_kt), mask_past)  # [kvh, G, T, S]
    s_new = g.op("Add", g.op("MatMul", q, new_kt), mask_new)  # [kvh, G, T, N]
    top = g.op("Max", g.op("ReduceMax", s_past, g.const([-1], np.int64), keepdims=1),
               g.op("ReduceMax", s_new, g.const([-1], np.int64), keepdims=1))
    e_past = g.op("Exp", g.op("Sub", s_past, top))
    e_new = g.op("Exp", g.op("Sub", s_new, top))
    denom = g.op("Add", g.op("ReduceSum", e_past, g.const([-1], np.int64), keepdims=1),
                 g.op("ReduceSum", e_new, g.const([-1], np.int64), keepdims=1))
    attn = g.op("Add", g.op("MatMul", e_past, past_v), g.op("MatMul", e_new, new_v))
    attn = g.op("Div", attn, denom)  # [kvh, G, T, hd]
    attn = g.reshape(g.op("Transpose", attn, perm=[2, 0, 1, 3]), [0, nh * hd])
    attn = linear(attn, "self_attn.o_proj")
    hidden = g.op("Add", hidden, g.rms_norm(attn, weight("post_attention_layernorm.weight"), eps))

    x = g.rms_norm(hidden, weight("pre_feedforward_layernorm.weight"), eps)
    gate = g.gelu_tanh(linear(x, "mlp.gate_proj"))
    mlp = linear(g.op("Mul", gate, linear(x, "mlp.up_proj")), "mlp.down_proj")
    hidden = g.op("Add", hidden, g.rms_norm(mlp, weight("post_feedforward_layernorm.weight"), eps))

    per_layer = g.op("Mul", g.op("Add", ple_context, ple_rows), g.const(2.0 ** -0.5))
    gate = g.gelu_tanh(linear(hidden, "per_layer_input_gate"))
    ple = linear(g.op("Mul", gate, per_layer), "per_layer_projection")
    hidden = g.op("Add", hidden, g.rms_norm(ple, weight("post_per_layer_input_norm.weight"), eps))
    hidden = g.op("Mul", hidden, weight("layer_scalar"))
    g.output(hidden, "hidden_out", ["T", h])
    return g.save(out / layer_graph(i))

