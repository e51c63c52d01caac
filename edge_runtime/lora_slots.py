"""LoRA slots: graph inputs through which an adapter is attached at load instead of merged at export.

An artifact exported with `--lora-slots RANK[:MODULES]` has, for each slotted projection of each layer, two float32
graph inputs, `lora.<tensor>.a` [in, r] and `lora.<tensor>.b` [r, out], and adds `(x @ a) @ b` to the projection's
output. The runtime feeds them on every run: an adapter's lora_A transposed and its scaled lora_B transposed, or
empty arrays (r = 0) when none is attached or the adapter leaves that projection alone (edge_runtime/lora_attach.py).
Switching adapters then costs no re-export and no reload of the base. r is a symbolic dimension of each slot's own,
so each module takes its adapter's rank (rank_pattern) with no zero padding, and no adapter costs the step no
arithmetic and no memory traffic, only the nodes (measured in tools/lora_slot_cost.py); RANK is the most an adapter
may have. The manifest's `lora_slots` records RANK, the modules, and each slotted tensor's [in, out], so the runtime
needs no knowledge of which layers have which projections (a KV-shared layer has no k or v to slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Module name (as PEFT's target_modules names it) -> its tensor path within a layer.
MODULES: dict[str, str] = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}
SYNTAX = "RANK[:MODULES]"
MAX_RANK = 256


@dataclass(frozen=True)
class LoraSlots:
    """The slots an artifact has: their rank, the modules given them, and each slotted tensor's (in, out) by its
    name relative to the text model ("layers.3.self_attn.q_proj"), as the graphs were built."""

    rank: int
    modules: tuple[str, ...]
    tensors: dict[str, tuple[int, int]]

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "modules": list(self.modules),
                "tensors": {name: list(shape) for name, shape in self.tensors.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSlots:
        return cls(int(data["rank"]), tuple(data["modules"]),
                   {name: (int(shape[0]), int(shape[1])) for name, shape in data["tensors"].items()})


def slot_inputs(tensor: str) -> tuple[str, str]:
    """The graph inputs of tensor's slot: its A [in, rank] and its B [rank, out]."""
    return f"lora.{tensor}.a", f"lora.{tensor}.b"


def module_of(tensor: str) -> str:
    """"layers.3.self_attn.q_proj" -> "q_proj"."""
    return tensor.rsplit(".", 1)[-1]


def parse_slots(text: str) -> tuple[int, tuple[str, ...]]:
    """`--lora-slots` as (rank, modules): "16" slots every projection, "16:q_proj,v_proj" those two."""
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
