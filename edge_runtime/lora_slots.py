"""LoRA slots: graph inputs through which an adapter is attached at load instead of merged at export.

An artifact exported with `--lora-slots RANK[:MODULES]` has, for each slotted projection (of each layer, and the
model's PLE projection), two graph inputs, `lora.<tensor>.a` and `lora.<tensor>.b`, and adds `(x @ A) @ B` to the
projection's output, in one of three precisions (`dtype`):
- float32 (the default for fp32 weights): a is [in, r] (lora_A transposed), b [r, out], through onnxruntime's own
  MatMul and Add, so an attached adapter equals the same adapter merged at export to float32 precision;
- float16 (the default beside fp16 weights): a is [r, in] (lora_A as PEFT stores it), b [r, out], through
  edge-runtime's LoraSlot operator (edge_runtime/onnxruntime_ops.py), which reads half the bytes: a decode step is
  bound by what it reads, and a rank-16 adapter on every projection of E2B was 8% of that in float32;
- int8 (the default beside int8 and int4 weights): a [r, in] and b [r, out] int8, each rank row quantized on its own
  (symmetric, max / 127), and `lora.<tensor>.scale` [r] the product of row j's two scales: a quarter of float32's
  bytes, at 1/254 of a row's largest value, finer than the int4 grid a merge would put it on. Beside int4 and int8
  weights the projection's own MatMulInt4 / MatMulInt8 node adds them (a fused q/k/v's three slots in one node, each
  at its columns), so an empty slot costs nothing; elsewhere a LoraSlotInt8 node after the projection does.
The runtime feeds them on every run: the adapter's lora_A and its scaled lora_B transposed, or empty arrays (r = 0)
when none is attached or the adapter leaves that projection alone (edge_runtime/lora_attach.py).
Switching adapters then costs no re-export and no reload of the base. r is a symbolic dimension of each slot's own,
so each module takes its adapter's rank (rank_pattern) with no zero padding, and no adapter costs the step no
arithmetic and no memory traffic, only the feeds and the slots' own nodes where they have them (measured in
tools/lora_slot_cost.py); RANK is the most an adapter
may have. The manifest's `lora_slots` records RANK, the modules, and each slotted tensor's [in, out], so the runtime
needs no knowledge of which layers have which projections (a KV-shared layer has no k or v to slot), and the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

# The modules slots can take, as PEFT's target_modules names them: the attention and MLP projections, and the PLE
# projections (each layer's input gate and projection, and the model's projection once), so that every linear of an
# all-linear adapter has one.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLE_PROJECTIONS = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")
MODULES = PROJECTIONS + PLE_PROJECTIONS
SYNTAX = "RANK[:MODULES]"
MAX_RANK = 256  # kernels/onnxruntime_ops.c's MAX_RANK
# --lora-slot-precision's names -> the slots' dtype
PRECISIONS: dict[str, str] = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
FLOAT_WEIGHTS = ("fp32", "fp16")


class SlotRequest(NamedTuple):
    """What export is asked to slot: `--lora-slots` parsed, and the precision chosen for the weights."""

    rank: int
    modules: tuple[str, ...]
    dtype: str


@dataclass(frozen=True)
class LoraSlots:
    """The slots an artifact has: their rank, the modules given them, and each slotted tensor's (in, out) by its
    name relative to the text model ("layers.3.self_attn.q_proj"), as the graphs were built."""

    rank: int
    modules: tuple[str, ...]
    tensors: dict[str, tuple[int, int]]
    dtype: str = "float32"  # artifacts made before float16 slots have float32 ones and no "dtype"

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "modules": list(self.modules), "dtype": self.dtype,
                "tensors": {name: list(shape) for name, shape in self.tensors.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSlots:
        return cls(int(data["rank"]), tuple(data["modules"]),
                   {name: (int(shape[0]), int(shape[1])) for name, shape in data["tensors"].items()},
                   str(data.get("dtype", "float32")))


def slot_inputs(tensor: str) -> tuple[str, str]:
    """The graph inputs of tensor's slot: its A and its B."""
    return f"lora.{tensor}.a", f"lora.{tensor}.b"


def slot_scale(tensor: str) -> str:
    """An int8 slot's third input: each rank row's scale."""
    return f"lora.{tensor}.scale"


def a_shape(dtype: str, in_width: int | str, rank: int | str) -> tuple:
    """A slot's A: [in, rank] for float32 (MatMul's right operand), [rank, in] for the others (LoraSlot's)."""
    return (in_width, rank) if dtype == "float32" else (rank, in_width)


def module_of(tensor: str) -> str:
    """"layers.3.self_attn.q_proj" -> "q_proj"."""
    return tensor.rsplit(".", 1)[-1]


def slot_dtype(precision: str | None, weights: tuple[str, ...]) -> str:
    """--lora-slot-precision as the slots' dtype; by default by the slotted linears' weight formats: float32 beside
    fp32 weights only, float16 beside float weights, int8 beside any integer ones. A ValueError names the choices."""
    if precision is None:
        if all(w == "fp32" for w in weights):
            return "float32"
        return "float16" if all(w in FLOAT_WEIGHTS for w in weights) else "int8"
    if precision not in PRECISIONS:
        raise ValueError(f"not available; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def parse_slots(text: str) -> tuple[int, tuple[str, ...]]:
    """`--lora-slots` as (rank, modules): "16" slots every module, "16:q_proj,v_proj" those two."""
    rank_text, _, modules_text = text.partition(":")
    try:
        rank = int(rank_text)
    except ValueError:
        rank = 0
    if not 0 < rank <= MAX_RANK:
        raise ValueError(f"the rank must be a whole number from 1 to {MAX_RANK} ({SYNTAX}, e.g. 16 or 16:q_proj,v_proj)")
    if not modules_text:
        return rank, tuple(MODULES)
    modules = tuple(m.strip() for m in modules_text.split(","))
    unknown = [m for m in modules if m not in MODULES]
    if unknown or not modules:
        raise ValueError(f"unknown module {unknown[0] if unknown else ''!r}; choose among {', '.join(MODULES)}")
    return rank, tuple(m for m in MODULES if m in modules)
