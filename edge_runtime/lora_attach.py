"""What the runtime feeds an artifact's LoRA slots (edge_runtime/lora_slots.py): an adapter's matrices, or zeros.

An adapter (read by edge_runtime/lora_adapter.py, as export reads it to merge) is checked against the slots before
anything is swapped: its rank must fit theirs, every module it changes must have a slot, and it must be plain LoRA.
DoRA rescales each merged row by the norm of W + s B A, which is no (x @ A) @ B, and modules_to_save replaces whole
tensors the graphs hold as weights; both are refused with the way out (merge at export). Each slot's A is lora_A
(transposed for float32 slots), its B the scaled lora_B transposed, at the module's own rank, in the slots' dtype
(a value float16 cannot hold is refused, naming the tensor; int8 slots take each rank row quantized on its own,
and the product of its two scales). A slot without an update gets empty arrays (rank 0, one
per shape, shared): onnxruntime's MatMul over an empty inner dimension gives zeros, and LoraSlot leaves y as it is,
so the projection is unchanged and nothing is read (measured equal to the slot-less export:
tests/test_lora_slots.py). Rank-16 zeros instead cost E2B int4 96.6 MB of float32 per token and ~7% of a decode step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.families import family_named
from edge_runtime.lora_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter
from edge_runtime.lora_slots import LoraSlots, a_shape, module_of, slot_inputs, slot_scale
from edge_runtime.model_spec import ModelSpec
from edge_runtime.quant.integer import quantize_int8_rows

MERGE_INSTEAD = "merge it at export instead (edge-runtime export --adapter)"

Feeds = dict[str, np.ndarray]


def empty_feeds(slots: LoraSlots) -> Feeds:
    """Every slot's inputs as empty arrays: no update."""
    zeros: dict[tuple[int, int], np.ndarray] = {}

    def zero(shape: tuple[int, int]) -> np.ndarray:
        return zeros.setdefault(shape, np.zeros(shape, dtype=slots.dtype))

    feeds = {}
    for tensor, (k, n) in slots.tensors.items():
        a, b = slot_inputs(tensor)
        feeds[a], feeds[b] = zero(a_shape(slots.dtype, k, 0)), zero((0, n))
        if slots.dtype == "int8":
            feeds[slot_scale(tensor)] = np.zeros(0, np.float32)
    return feeds


def checked_adapter(path: Path, slots: LoraSlots | None, spec: ModelSpec, artifact: Path) -> Adapter:
    """The PEFT adapter at `path`, opened (its tensors unread) and checked against the slots, refusing in one line
    what they cannot take."""
    path = Path(path)
    if slots is None:
        raise EdgeRuntimeError(f"--adapter {path}: {artifact} has no LoRA slots to attach an adapter to; export it "
                               f"with --lora-slots RANK, or {MERGE_INSTEAD}")
    family = family_named(spec.family, str(artifact))
    adapter = Adapter(path, family.checkpoint_tensors(spec), family.embedding)
    if adapter.config.get("use_dora"):
        raise EdgeRuntimeError(f"{path / ADAPTER_CONFIG}: use_dora: a DoRA adapter cannot be attached at load (its "
                               f"magnitude rescales the merged weights); {MERGE_INSTEAD}")
    if adapter.replaced:
        key = adapter.replaced[min(adapter.replaced)]
        raise EdgeRuntimeError(f"{path / ADAPTER_WEIGHTS}: {key}: modules_to_save cannot be attached at load (it "
                               f"replaces a whole tensor); {MERGE_INSTEAD}")
    for name in sorted(adapter.lora):
        tensor, key = name.removesuffix(".weight"), adapter.lora[name].a
        if tensor not in slots.tensors:
            raise EdgeRuntimeError(f"{path / ADAPTER_WEIGHTS}: {key}: {module_of(tensor)} has no LoRA slot in "
                                   f"{artifact} (slots: {','.join(slots.modules)}); export with it in --lora-slots, "
                                   f"or {MERGE_INSTEAD}")
        rank = adapter.file.entries[key].shape[0]
        if rank > slots.rank:
            raise EdgeRuntimeError(f"{path / ADAPTER_WEIGHTS}: {key}: rank {rank} is more than the slots' "
                                   f"{slots.rank} in {artifact}; export with --lora-slots {rank} or more, or "
                                   f"{MERGE_INSTEAD}")
    return adapter


def fed_bytes(adapter: Adapter, slots: LoraSlots) -> int:
    """Bytes the adapter's slot inputs hold once fed (A and B in the slots' dtype per module it changes): what an
    attached adapter keeps resident, known from the file's header alone (the memory planner's item)."""
    total = 0
    for name, module in adapter.lora.items():
        k, n = slots.tensors[name.removesuffix(".weight")]
        rank = adapter.file.entries[module.a].shape[0]
        total += np.dtype(slots.dtype).itemsize * rank * (k + n) + (4 * rank if slots.dtype == "int8" else 0)
    return total


def _in_dtype(values: np.ndarray, dtype: str, key: str, path: Path) -> np.ndarray:
    """values as a contiguous array of the slots' dtype; float16 must hold every value (65504 at most)."""
    with np.errstate(over="ignore"):
        converted = np.ascontiguousarray(values, dtype=dtype)
    if not np.isfinite(converted).all() and np.isfinite(values).all():
        raise EdgeRuntimeError(f"{path / ADAPTER_WEIGHTS}: {key}: {np.abs(values).max():g} (with the adapter's "
                               f"scaling) is beyond the range of these LoRA slots' float16 (65504); export with "
                               f"--lora-slot-precision fp32, or {MERGE_INSTEAD}")
    return converted


def adapter_feeds(path: Path, slots: LoraSlots | None, spec: ModelSpec, artifact: Path) -> Feeds:
    """Every slot's inputs for the PEFT adapter at `path` (checked_adapter's refusals first)."""
    adapter = checked_adapter(path, slots, spec, artifact)
    feeds = empty_feeds(slots)
    for name in sorted(adapter.lora):
        update, module = adapter.update(name), adapter.lora[name]
        tensor = name.removesuffix(".weight")
        a, b = slot_inputs(tensor)
        scaled_b = (np.float32(update.scaling) * update.b).T
        if slots.dtype == "int8":
            (feeds[a], a_scale), (feeds[b], b_scale) = quantize_int8_rows(update.a), quantize_int8_rows(scaled_b)
            feeds[slot_scale(tensor)] = a_scale * b_scale
            continue
        a_values = update.a.T if slots.dtype == "float32" else update.a
        feeds[a] = _in_dtype(a_values, slots.dtype, module.a, path)
        feeds[b] = _in_dtype(scaled_b, slots.dtype, module.b, path)
    return feeds
