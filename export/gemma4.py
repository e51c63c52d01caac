"""Gemma 4 "E" text decoder as ONNX graphs: PLE prologue, two graphs per decoder layer, and the LM head.

Each layer is cut at attention: the first graph returns rotated queries and the new tokens' keys and
values, the second takes the attention output through o_proj, the MLP and the layer's PLE slice. Attention
itself is the runtime's (edge_runtime.attention), because it reads the KV cache in whatever format the user
picked at run time, including TurboQuant and QJL codes that no ONNX operator understands. The cut costs one
more onnxruntime call per layer (tens of microseconds against a token's tens of milliseconds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_runtime.artifact import HEAD_GRAPH, PROLOGUE_GRAPH, layer_graphs
from edge_runtime.export.onnx_graph import GraphBuilder, LinearWeight
from edge_runtime.model_spec import ModelSpec

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
    """Layer i as two graphs with attention between them, computed by the runtime from its KV cache."""
    return _build_attention_inputs(spec, i, w, new_graph, out) + _build_layer_output(spec, i, w, new_graph, out)


def _build_attention_inputs(spec: ModelSpec, i: int, w: Weights, new_graph: NewGraph, out: Path) -> int:
    """Normed, rotated queries [kv_heads, groups, T, hd]; and the new tokens' keys and values [kv_heads, T, hd].

    KV-shared layers only compute queries: their keys and values are their source layer's.
    """
    names = layer_graphs(i)
    g = new_graph(names[0].removesuffix(".onnx"))
    h, hd, eps = spec.hidden_size, spec.head_dims[i], spec.rms_norm_eps
    nh, kvh = spec.num_attention_heads, spec.num_key_value_heads
    pre = f"layers.{i}."

    def weight(name: str) -> str:
        return g.weight(name, w(pre + name))

    hidden = g.input("hidden", ["T", h])
    # cos/sin come with the singleton head axis they broadcast over (a numpy view, free), sparing a node each.
    cos = g.input("cos", ["T", 1, hd])
    sin = g.input("sin", ["T", 1, hd])
    x = g.rms_norm(hidden, weight("input_layernorm.weight"), eps)
    q = g.reshape(g.linear(x, "self_attn.q_proj", w(pre + "self_attn.q_proj.weight")), [0, nh, hd])
    q = _rope(g, g.rms_norm(q, weight("self_attn.q_norm.weight"), eps), cos, sin)
    q = g.op("Transpose", g.reshape(q, [0, kvh, nh // kvh, hd]), perm=[1, 2, 0, 3])
    g.output(q, "query", [kvh, nh // kvh, "T", hd])
    if not spec.is_kv_shared(i):
        k = g.reshape(g.linear(x, "self_attn.k_proj", w(pre + "self_attn.k_proj.weight")), [0, kvh, hd])
        k = _rope(g, g.rms_norm(k, weight("self_attn.k_norm.weight"), eps), cos, sin)
        v = g.rms_norm(g.reshape(g.linear(x, "self_attn.v_proj", w(pre + "self_attn.v_proj.weight")), [0, kvh, hd]),
                       None, eps, hd)
        g.output(g.op("Transpose", k, perm=[1, 0, 2]), "key", [kvh, "T", hd])
        g.output(g.op("Transpose", v, perm=[1, 0, 2]), "value", [kvh, "T", hd])
    return g.save(out / names[0])


def _build_layer_output(spec: ModelSpec, i: int, w: Weights, new_graph: NewGraph, out: Path) -> int:
    """Attention output projection, MLP and the layer's PLE contribution, on the residual stream."""
    names = layer_graphs(i)
    g = new_graph(names[1].removesuffix(".onnx"))
    h, eps = spec.hidden_size, spec.rms_norm_eps
    pre = f"layers.{i}."

    def weight(name: str) -> str:
        return g.weight(name, w(pre + name))

    def linear(x: str, name: str) -> str:
        return g.linear(x, name, w(pre + name + ".weight"))

    hidden = g.input("hidden", ["T", h])
    attn = g.input("attention", ["T", spec.num_attention_heads * spec.head_dims[i]])
    ple_rows = g.input("ple_rows", ["T", spec.hidden_size_per_layer_input])
    ple_context = g.input("ple_context", ["T", spec.hidden_size_per_layer_input])

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
    return g.save(out / names[1])
