"""What a model family gives the rest of edge-runtime: everything about its architecture, in one place.

The exporter, the engine, the planner and the checkpoint reader are written once for every family and ask the
family for what differs: how a config becomes a spec, which tensors the checkpoint holds, how the graphs are built
and run (its GraphContract), and the shapes the planner counts. A family lives in families/<name>/, its runtime half
importing nothing heavier than numpy; its graph builders (`graphs`) need onnx and are imported by export alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from edge_runtime.errors import UnsupportedConfigError
from edge_runtime.families.contract import GraphContract
from edge_runtime.model_spec import ModelSpec

# The tied embedding's name in every artifact, whatever the family: the LM head's linear in the graphs and in the
# manifest's weight_formats, and the lookup rows' tensor in the manifest's tensors.
HEAD = "embed_tokens"


@dataclass(frozen=True)
class Linear:
    """One linear weight of a graph, [n out, k in], stacked ones as one, as the graph holds it: `name` is its tensor
    group (its initializers are `name.<part>`, and the manifest records its format by it), `role` says which format
    a weight recipe gives it (edge_runtime/weight_recipe.py)."""

    name: str
    role: str
    n: int
    k: int


@dataclass(frozen=True)
class GraphPart:
    """Part of an ONNX graph as the planner counts it: its linear weights, its float32 vector values, and whether a
    prefill runs it at every position of a chunk or, past the segment that takes rows, at the chunk's last only."""

    linears: tuple[Linear, ...]
    vector_values: int
    every_position: bool


@dataclass(frozen=True)
class CheckpointLayout:
    """Where a checkpoint keeps the text decoder: the prefix of its tensors' names, and the architecture (of the
    config's `architectures`) that says so."""

    prefix: str
    architecture: str


def text_config(config: dict[str, Any], where: str, architectures: dict[str, str]) -> tuple[dict[str, Any], str]:
    """The text model's config and the checkpoint's architecture, one of `architectures` (architecture -> prefix of
    its text weights): a `...ForConditionalGeneration` wrapper keeps it under `text_config`, a `...ForCausalLM` is it.
    Any other architecture is refused in one line naming `where`."""
    listed = config.get("architectures") or []
    known = [a for a in listed if a in architectures]
    if not known:
        raise UnsupportedConfigError(
            f"{where}: architectures={listed!r} is not supported; expected one of {sorted(architectures)}"
        )
    if known[0].endswith("ForConditionalGeneration"):
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise UnsupportedConfigError(f"{where}: {known[0]} config has no text_config object")
        return text, known[0]
    return config, known[0]


@dataclass(frozen=True)
class Family:
    """A model family, as the registry (families/__init__.py) holds it.

    `spec_type` names the family (its `family`, written into manifests); `model_types` are the config.json values of
    `model_type` it reads; `title` is how people name it ("Gemma 4"). `read_config(config, where)` resolves a
    config.json into a spec, refusing what the family does not implement with a one-line error naming `where`;
    `checkpoint_layout` says where its tensors are; `checkpoint_tensors(spec)` names and shapes every tensor the
    export reads, `embedding` and `ple_table` being the two the exporter writes itself (embedding rows and the tied
    head, the PLE store). `contract(spec)` is the step plan the engine executes; `graph_parts(spec)` the planner's
    shapes, per segment in the contract's order; `activation_width(spec)` the float32 values a prompt token carries
    through the widest layer (the planner's prefill scratch). `graphs` is the module of the graph builders.
    """

    spec_type: type[ModelSpec]
    title: str
    model_types: tuple[str, ...]
    read_config: Callable[[dict[str, Any], str], ModelSpec]
    checkpoint_layout: Callable[[dict[str, Any], str], CheckpointLayout]
    checkpoint_tensors: Callable[[Any], dict[str, tuple[int, ...]]]
    embedding: str
    ple_table: str
    contract: Callable[[Any], GraphContract]
    graph_parts: Callable[[Any], list[tuple[GraphPart, ...]]]
    activation_width: Callable[[Any], int]
    graphs: str

    @property
    def name(self) -> str:
        return self.spec_type.family

    def graph_builders(self) -> ModuleType:
        """The family's graph builders: `build_segment(spec, index, weights, head, recipe, new_graph, path) -> bytes
        read`, each linear written in the format `recipe` gives its role and named as `graph_parts` names it.
        Imported on demand because they need onnx, which only export installs."""
        return importlib.import_module(self.graphs)
