"""The contract between a family's graphs and the engine that runs them, written into every artifact's manifest.

A decoder step is a chain of ONNX graphs (segments) cut where attention is: the runtime computes attention itself,
because it reads the KV cache in a format chosen at run time. What each graph takes and returns, which tensors are
carried from one graph to later ones and on which axis their tokens lie, and which cache layer each attention reads,
with its scaling, softcap and window, are declared by the family (families/<name>/plan.py) and executed by the engine
(engine.py), which knows no family. The manifest holds the contract, so an artifact says how it is to be run.

The values of a step, by name:
- the runtime's, computed before the first graph (RUNTIME_TENSORS): the tokens' scaled embedding rows, their PLE
  rows, the RoPE tables of each layer type (`rope_cos:sliding_attention`, ...), and `rows`, the token rows to carry
  on with;
- graph outputs, kept under the names the contract gives them: carried tensors (declared with their dims, a family
  may carry several, of any rank) and the logits;
- each attention's result, computed from the query its segment returns (ATTENTION_TENSORS gives the layouts the
  runtime's attention takes and returns).
A feed gives a graph input a value, or one layer's slice of it along its leading axis (`layer`).
Exactly one segment takes `rows`: it returns its outputs at those rows only, and the engine cuts every value computed
before it to the same rows along its token axis (the dim named T). When only the next token's logits are wanted,
the layers after it (KV-shared ones, whose keys and values come from earlier layers) and the head then run on the
last position alone; an attention after it may therefore not write keys and values of its own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from edge_runtime.errors import ArtifactError
from edge_runtime.model_spec import LAYER_TYPES

TOKENS = "T"
TOKEN_EMBEDDINGS = "token_embeddings"
PLE_ROWS = "ple_rows"
ROPE_COS = "rope_cos"
ROPE_SIN = "rope_sin"
ROWS = "rows"
RUNTIME_TENSORS: dict[str, tuple[str, ...]] = {
    TOKEN_EMBEDDINGS: (TOKENS, "hidden"),  # scaled by sqrt(hidden) (embedding.py)
    PLE_ROWS: ("layers", TOKENS, "ple_width"),  # scaled by sqrt(ple_width) (ple_store.py)
    ROPE_COS: (TOKENS, "head_dim / 2"),  # rotate-half tables of one layer type (rope.py)
    ROPE_SIN: (TOKENS, "head_dim / 2"),
    ROWS: ("R",),  # int64 indices into T
}
ATTENTION_TENSORS: dict[str, tuple[str, ...]] = {
    "query": (TOKENS, "kv_heads", "groups", "head_dim"),
    "key": (TOKENS, "kv_heads", "head_dim"),
    "value": (TOKENS, "kv_heads", "head_dim"),
    "result": (TOKENS, "heads * head_dim"),
}
SEGMENT_GRAPH = re.compile(r"segment_(\d{2,})\.onnx")


def segment_graph(index: int) -> str:
    """The file of the graph between attention index-1 and attention index."""
    return f"segment_{index:02d}.onnx"


def rope_table(kind: str, layer_type: str) -> str:
    """The value name of a layer type's RoPE table (kind: ROPE_COS or ROPE_SIN)."""
    return f"{kind}:{layer_type}"


@dataclass(frozen=True)
class Feed:
    """Graph input `input` takes value `value`, or its slice [layer] along the leading (layer) axis."""

    input: str
    value: str
    layer: int | None = None


@dataclass(frozen=True)
class Attention:
    """The attention a segment computes the inputs of: its query (graph output `query`) attends over cache layer
    `kv_layer`'s keys and values (`kv_layer` == `layer` unless KV-shared), seen through `layer_type`'s window; the
    result is kept as value `result`. `key` and `value` name the graph outputs of the layer's own new keys and
    values, which the cache stores as layer `layer`, or are None where the layer reads another's. Logits are
    `query · key * scaling`, capped to `softcap * tanh(logits / softcap)` where one is given."""

    layer: int
    kv_layer: int
    layer_type: str
    window: int | None
    scaling: float
    softcap: float | None
    query: str
    key: str | None
    value: str | None
    result: str


@dataclass(frozen=True)
class Segment:
    """One graph: its file, its feeds, the outputs kept as values (graph output -> value name), the attention whose
    inputs it computes (None for the last, which returns the logits), and whether it takes `rows`."""

    graph: str
    feeds: tuple[Feed, ...]
    outputs: dict[str, str]
    attention: Attention | None
    takes_rows: bool


@dataclass(frozen=True)
class GraphContract:
    """A family's step plan: its carried tensors (value name -> dims, tokens on the dim named T), its segments in
    the order they run, and the value the last one returns as logits [R, vocab]."""

    carried: dict[str, tuple[str, ...]]
    segments: tuple[Segment, ...]
    logits: str

    def token_axes(self) -> dict[str, int]:
        """Every value that holds tokens and is not the logits, with the axis they lie on: what `rows` cuts."""
        axes = {name: dims.index(TOKENS) for name, dims in RUNTIME_TENSORS.items() if TOKENS in dims}
        for kind in (ROPE_COS, ROPE_SIN):
            axes.update({rope_table(kind, t): axes[kind] for t in LAYER_TYPES})
        axes.update({name: dims.index(TOKENS) for name, dims in self.carried.items()})
        result_axis = ATTENTION_TENSORS["result"].index(TOKENS)
        axes.update({s.attention.result: result_axis for s in self.segments if s.attention})
        return axes

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime_tensors": {name: list(dims) for name, dims in RUNTIME_TENSORS.items()},
            "attention_tensors": {name: list(dims) for name, dims in ATTENTION_TENSORS.items()},
            "carried": {name: list(dims) for name, dims in self.carried.items()},
            "segments": [{"graph": s.graph,
                          "feeds": [{"input": f.input, "value": f.value, "layer": f.layer} for f in s.feeds],
                          "outputs": s.outputs, "takes_rows": s.takes_rows,
                          "attention": None if s.attention is None else asdict(s.attention)} for s in self.segments],
            "logits": self.logits,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> GraphContract:
        """The manifest's `graphs`, checked (`check`); KeyError/TypeError/ValueError on a malformed one."""
        for key, ours in (("runtime_tensors", RUNTIME_TENSORS), ("attention_tensors", ATTENTION_TENSORS)):
            theirs = {name: tuple(dims) for name, dims in data[key].items()}
            if theirs != ours:
                raise ArtifactError(f"{where}: graphs.{key} are not the ones this runtime hands to the graphs and "
                                    f"takes from them ({theirs} vs {ours}); re-export with this version of edge-runtime")
        contract = cls(
            carried={name: tuple(dims) for name, dims in data["carried"].items()},
            segments=tuple(Segment(graph=s["graph"], feeds=tuple(Feed(**f) for f in s["feeds"]),
                                   outputs=dict(s["outputs"]), takes_rows=bool(s["takes_rows"]),
                                   attention=None if s["attention"] is None else Attention(**s["attention"]))
                           for s in data["segments"]),
            logits=data["logits"],
        )
        contract.check(where)
        return contract

    def check(self, where: str) -> None:
        """Refuse a plan the engine could not run as written: every fed value computed before it is fed, one segment
        taking rows, keys written only where every token is still there, attention this runtime implements."""
        available = {name for name in RUNTIME_TENSORS if name not in (ROPE_COS, ROPE_SIN)}
        available |= {rope_table(kind, t) for kind in (ROPE_COS, ROPE_SIN) for t in LAYER_TYPES}
        writers: dict[int, str] = {}  # cache layer -> its layer type
        rows_taken = False

        def refuse(k: int, what: str) -> ArtifactError:
            graph = self.segments[k].graph if k < len(self.segments) else "-"
            return ArtifactError(f"{where}: graphs.segments[{k}] ({graph}) {what}; re-export with this version of "
                                 "edge-runtime")

        if not self.segments:
            raise refuse(0, "is missing: the contract has no graphs")
        for k, segment in enumerate(self.segments):
            for feed in segment.feeds:
                if feed.value not in available:
                    raise refuse(k, f"feeds input {feed.input!r} from {feed.value!r}, which no earlier graph returns "
                                    "and the runtime does not compute")
            if segment.takes_rows and rows_taken:
                raise refuse(k, "takes rows, as an earlier graph did")
            rows_taken |= segment.takes_rows
            for output, value in segment.outputs.items():
                if value not in self.carried and value != self.logits:
                    raise refuse(k, f"keeps output {output!r} as {value!r}, neither a carried tensor nor the logits")
            available |= set(segment.outputs.values())
            attention = segment.attention
            last = k == len(self.segments) - 1
            if last != (attention is None):
                raise refuse(k, "has no attention, but is not the last graph" if attention is None
                             else "is the last graph, but computes the inputs of an attention")
            if attention is None:
                continue
            if attention.softcap is not None:
                raise refuse(k, f"caps layer {attention.layer}'s attention logits at {attention.softcap}, which this "
                                "runtime's attention does not implement; upgrade edge-runtime")
            if (attention.key is None) != (attention.value is None):
                raise refuse(k, f"returns layer {attention.layer}'s new keys or values, not both")
            if attention.key is not None:
                if rows_taken:
                    raise refuse(k, f"writes layer {attention.layer}'s keys and values after rows were taken, when "
                                    "only some tokens are left")
                writers[attention.layer] = attention.layer_type
            if writers.get(attention.kv_layer) != attention.layer_type:
                raise refuse(k, f"reads the keys and values of layer {attention.kv_layer}, which no {attention.layer_type} "
                                "layer before it writes")
            available.add(attention.result)
        if not rows_taken:
            raise refuse(len(self.segments) - 1, "is the last graph, and no graph takes rows")
        if self.logits not in self.segments[-1].outputs.values():
            raise refuse(len(self.segments) - 1, f"does not return the logits value {self.logits!r}")
        for name, dims in self.carried.items():
            if TOKENS not in dims:
                raise ArtifactError(f"{where}: graphs.carried.{name} has dims {list(dims)}, none of them {TOKENS} "
                                    "(tokens); re-export with this version of edge-runtime")
