"""Gemma 3n's text decoder as ONNX graphs cut only where attention is: one segment per attention (plan.py).

The reference is transformers/models/gemma3n/modeling_gemma3n.py (Gemma3nTextModel, Gemma3nTextDecoderLayer,
Gemma3nTextAltUp, Gemma3nTextLaurelBlock, Gemma3nTextMLP). Attention inputs, the PLE context and the head are Gemma
4's (families/gemma4/graphs.py); what is Gemma 3n's own:

- AltUp: the decoder's state is S streams [T, S, H] (transformers' [S, B, T, H] with tokens first, so that one
  batched MatMul mixes them). Segment 0 expands the scaled embedding into them (stream 0 itself, streams 1.. its
  projections rescaled to its RMS); before each layer a router (tanh of a linear of the normed active stream / H)
  gives per-token coefficients that mix the streams (predict); the layer runs on stream 0 of the predictions, and
  its output corrects every stream by its innovation, weighted by coefficients from the router of the output
  (correct); the last segment maps streams 1.. back (unembed projections, rescaled to stream 0's RMS) and averages.
  The router and the coefficient matrices ([S, H], [S^2, S], [S, S]: 0.25 M values at E2B) stay float32 in every
  weight format: they set mixing coefficients, and are read as vectors are.
- LAuReL: a rank-64 bypass of attention on the normed active stream, averaged with the attention residual.
- Sparse MLP: on layers with activation sparsity, the gate activations below mean + z * std (per token, population
  std) are cut to zero and the rest shifted down by that cut-off, before GELU.
- PLE: the gate reads the corrected active stream (times correct_output_scale), and the projection is added to
  streams 1.. only; no layer_scalar.
- LoRA slots (export --lora-slots): q, k and v take theirs in Gemma 4's attention inputs; o_proj and the MLP's here
  the same way (GraphBuilder.slotted_linear), the gate's before a sparse layer's cut-off, since PEFT adapts
  gate_proj's output.
Needs onnx: only export imports this module.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from onnx import TensorProto

from edge_runtime.export.onnx_graph import GraphBuilder, LinearWeight
from edge_runtime.families.gemma3n.config import Gemma3nSpec
from edge_runtime.families.gemma3n.plan import PREDICTIONS, PREDICTIONS_OUT
from edge_runtime.families.gemma3n.shapes import ALTUP_PROJECTIONS, LAUREL_LEFT_NAME, LAUREL_RIGHT_NAME, unembed_name
from edge_runtime.families.gemma4.graphs import NewGraph, Weights, attention_inputs, lm_head, ple_context
from edge_runtime.families.gemma4.plan import (
    ATTENTION,
    INPUTS_EMBEDS,
    PLE_CONTEXT,
    PLE_ROWS_INPUT,
    ROWS_INPUT,
    rows_segment,
)
from edge_runtime.families.gemma4.shapes import (
    DOWN_PROJ_NAME,
    GATE_UP_NAME,
    O_PROJ_NAME,
    PLE_GATE_NAME,
    PLE_PROJECTION_NAME,
)
from edge_runtime.weight_recipe import DOWN_PROJ, GATE_UP, O_PROJ, OTHER, PER_LAYER, WeightRecipe

# The role each of a layer's own linears takes its format by (LAuReL's take the base format: OTHER)
ROLE_OF = {O_PROJ_NAME: O_PROJ, PLE_GATE_NAME: PER_LAYER, PLE_PROJECTION_NAME: PER_LAYER}
MIN_MAGNITUDE = 1e-5  # transformers clamps a projected stream's mean square at this before rescaling it


def build_segment(spec: Gemma3nSpec, i: int, w: Weights, head: LinearWeight, recipe: WeightRecipe, new_graph: NewGraph,
                  path: Path) -> int:
    """Write segment i's graph to `path`, each linear in the format `recipe` gives its role (AltUp's and LAuReL's,
    which no role names, in the recipe's base format); returns the weight bytes it reads per call."""
    g = new_graph(path.stem)
    n, h = spec.num_hidden_layers, spec.hidden_size
    if i == 0:
        embeds = g.input(INPUTS_EMBEDS, ["T", h])
        g.output(ple_context(spec, g, w, embeds, recipe), PLE_CONTEXT, [n, "T", spec.hidden_size_per_layer_input])
        streams = _expand(spec, g, w, embeds, recipe)
    else:
        streams = _layer_output(spec, i - 1, g, w, recipe)
    rows = g.input(ROWS_INPUT, ["R"], TensorProto.INT64) if i == rows_segment(spec) else None
    if rows is not None:
        streams = g.op("Gather", streams, rows, axis=0)
    if i == n:
        lm_head(spec, g, w, _collapse(spec, g, w, streams, recipe), head)
    else:
        predictions = _predict(spec, i, g, w, streams)
        g.output(predictions, PREDICTIONS_OUT, ["T", spec.altup_num_inputs, h])
        attention_inputs(spec, i, g, w, recipe, _stream(g, predictions, 0), rows)
    return g.save(path)


def _stream(g: GraphBuilder, streams: str, k: int) -> str:
    """Stream k [T, H] of [T, S, H]."""
    return g.op("Gather", streams, g.const(k, np.int64), axis=1)


def _mean_square(g: GraphBuilder, x: str) -> str:
    return g.op("ReduceMean", g.op("Mul", x, x), g.const([-1], np.int64), keepdims=1)


def _rescaled(g: GraphBuilder, x: str, target: str) -> str:
    """x * target / sqrt(max(mean(x^2), 1e-5)): a projected stream brought to the RMS `target` of stream 0."""
    magnitude = g.op("Sqrt", g.op("Max", _mean_square(g, x), g.const(MIN_MAGNITUDE)))
    return g.op("Div", g.op("Mul", x, target), magnitude)


def _expand(spec: Gemma3nSpec, g: GraphBuilder, w: Weights, embeds: str, recipe: WeightRecipe) -> str:
    """The S streams [T, S, H] of the scaled embedding: itself, then its S - 1 projections (one stacked weight),
    each rescaled to its RMS."""
    h, s = spec.hidden_size, spec.altup_num_inputs
    stacked = np.concatenate([w(f"altup_projections.{k}.weight") for k in range(s - 1)])
    projected = g.reshape(g.linear(embeds, ALTUP_PROJECTIONS, stacked, recipe.format_for(OTHER)), [0, s - 1, h])
    target = g.unsqueeze(g.op("Sqrt", _mean_square(g, embeds)), 1)
    return g.op("Concat", g.unsqueeze(embeds, 1), _rescaled(g, projected, target), axis=1)


def _collapse(spec: Gemma3nSpec, g: GraphBuilder, w: Weights, streams: str, recipe: WeightRecipe) -> str:
    """The streams averaged into one [T, H]: stream 0, and streams 1.. through their unembed projections rescaled to
    stream 0's RMS."""
    active = _stream(g, streams, 0)
    target = g.op("Sqrt", _mean_square(g, active))
    parts = [active]
    for k in range(1, spec.altup_num_inputs):
        name = unembed_name(k)
        parts.append(_rescaled(g, g.linear(_stream(g, streams, k), name, w(f"{name}.weight"), recipe.format_for(OTHER)),
                               target))
    stacked = g.op("Concat", *(g.unsqueeze(p, 0) for p in parts), axis=0)
    return g.op("ReduceMean", stacked, g.const([0], np.int64), keepdims=0)


def _matrix(g: GraphBuilder, w: Weights, name: str) -> str:
    """A small [out, in] checkpoint weight as a float32 [in, out] MatMul operand."""
    return g.weight(name, np.ascontiguousarray(w(name + ".weight").T))


def _router(spec: Gemma3nSpec, i: int, g: GraphBuilder, w: Weights, x: str) -> str:
    """Layer i's AltUp modalities [T, S]: tanh(router(router_norm(x) / H))."""
    pre = f"layers.{i}.altup."
    normed = g.rms_norm(x, g.weight(pre + "router_norm", w(pre + "router_norm.weight")), spec.rms_norm_eps)
    scaled = g.op("Mul", normed, g.const(1.0 / spec.hidden_size))
    return g.op("Tanh", g.op("MatMul", scaled, _matrix(g, w, pre + "modality_router")))


def _predict(spec: Gemma3nSpec, i: int, g: GraphBuilder, w: Weights, streams: str) -> str:
    """AltUp's prediction for layer i: stream a plus sum_b c[a, b] * stream b, c [T, S, S] from the router of the
    active stream (prediction_coefs' output a * S + b is c[a, b])."""
    s = spec.altup_num_inputs
    modalities = _router(spec, i, g, w, _stream(g, streams, 0))
    coefs = g.op("MatMul", modalities, _matrix(g, w, f"layers.{i}.altup.prediction_coefs"))
    mixed = g.op("MatMul", g.reshape(coefs, [0, s, s]), streams)
    return g.op("Add", mixed, streams)


def _mlp(spec: Gemma3nSpec, i: int, g: GraphBuilder, w: Weights, x: str, recipe: WeightRecipe) -> str:
    """down(gelu(gate) * up), gate and up one stacked weight, each with its LoRA slot's update if it has one; on a
    sparse layer the gate (its update included, as PEFT's gate_proj gives it) is first cut at mean + z * std of its
    own row."""
    h, pre, m = spec.hidden_size, f"layers.{i}.mlp.", spec.mlp_size(i)
    gate, up = g.slotted_linear(x, f"layers.{i}.{GATE_UP_NAME}",
                                np.concatenate([w(pre + "gate_proj.weight"), w(pre + "up_proj.weight")]),
                                recipe.format_for(GATE_UP), h, [(pre + "gate_proj", m), (pre + "up_proj", m)])
    z = spec.sparsity_cutoff(i)
    if z is not None:
        mean = g.op("ReduceMean", gate, g.const([-1], np.int64), keepdims=1)
        std = g.op("Sqrt", _mean_square(g, g.op("Sub", gate, mean)))
        gate = g.op("Relu", g.op("Sub", gate, g.op("Add", mean, g.op("Mul", std, g.const(z)))))
    hidden = g.op("Mul", g.gelu_tanh(gate), up)
    down = f"layers.{i}.{DOWN_PROJ_NAME}"
    return g.slotted_linear(hidden, down, w(pre + "down_proj.weight"), recipe.format_for(DOWN_PROJ), m, [(down, h)])[0]


def _layer_output(spec: Gemma3nSpec, i: int, g: GraphBuilder, w: Weights, recipe: WeightRecipe) -> str:
    """Layer i after attention, on its predictions [T, S, H]: LAuReL, o_proj and the MLP on the active stream, then
    AltUp's correction of every stream and the layer's PLE contribution to streams 1..; the corrected streams."""
    h, s, p, eps = spec.hidden_size, spec.altup_num_inputs, spec.hidden_size_per_layer_input, spec.rms_norm_eps
    pre = f"layers.{i}."

    def norm(x: str, name: str) -> str:
        return g.rms_norm(x, g.weight(pre + name, w(pre + name + ".weight")), eps)

    def linear(x: str, name: str) -> str:
        return g.linear(x, pre + name, w(pre + name + ".weight"), recipe.format_for(ROLE_OF.get(name, OTHER)))

    def slotted(x: str, name: str, in_width: int, out_width: int) -> str:
        """The linear, plus its LoRA slot's update if it has one (its name is also the slot's tensor)."""
        return g.slotted_linear(x, pre + name, w(pre + name + ".weight"), recipe.format_for(ROLE_OF.get(name, OTHER)),
                                in_width, [(pre + name, out_width)])[0]

    predictions = g.input(PREDICTIONS, ["T", s, h])
    attn_width = spec.num_attention_heads * spec.head_dims[i]
    attn = g.input(ATTENTION, ["T", attn_width])
    ple_rows = g.input(PLE_ROWS_INPUT, ["T", p])
    context = g.input(PLE_CONTEXT, ["T", p])

    active = _stream(g, predictions, 0)
    x = norm(active, "input_layernorm")  # as the previous graph normed it for attention
    laurel = g.op("Add", x, norm(linear(linear(x, LAUREL_LEFT_NAME), LAUREL_RIGHT_NAME),
                                 "laurel.post_laurel_norm"))
    attn = norm(slotted(attn, O_PROJ_NAME, attn_width, h), "post_attention_layernorm")
    attn_laurel = g.op("Div", g.op("Add", g.op("Add", active, attn), laurel), g.const(math.sqrt(2.0)))
    mlp = _mlp(spec, i, g, w, norm(attn_laurel, "pre_feedforward_layernorm"), recipe)
    output = g.op("Add", attn_laurel, norm(mlp, "post_feedforward_layernorm"))

    modalities = _router(spec, i, g, w, output)
    coefs = g.op("Add", g.op("MatMul", modalities, _matrix(g, w, pre + "altup.correction_coefs")), g.const(1.0))
    innovation = g.op("Sub", output, active)
    corrected = g.op("Add", g.op("Mul", g.unsqueeze(innovation, 1), g.unsqueeze(coefs, -1)), predictions)

    first = _stream(g, corrected, 0)
    if spec.altup_correct_scale:
        first = g.op("Mul", first, g.weight(pre + "altup.correct_output_scale", w(pre + "altup.correct_output_scale")))
    per_layer = g.op("Mul", g.op("Add", context, ple_rows), g.const(2.0 ** -0.5))
    gate = slotted(first, PLE_GATE_NAME, h, p)
    gated = g.op("Mul", g.gelu_tanh(gate), per_layer)
    ple = norm(slotted(gated, PLE_PROJECTION_NAME, p, h), "post_per_layer_input_norm")
    streams_past_first = g.const(np.array([0.0] + [1.0] * (s - 1), np.float32).reshape(1, s, 1))
    return g.op("Add", corrected, g.op("Mul", g.unsqueeze(ple, 1), streams_past_first))
