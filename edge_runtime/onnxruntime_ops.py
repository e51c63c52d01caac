"""edge-runtime's own onnxruntime operators (edge_runtime/kernels/onnxruntime_ops.c): their names, which export writes
into the graphs, and the built library, which the runtime registers into the sessions of an artifact that uses them.

The library ships built beside the attention kernel (tools/build_kernels.py) for x86-64-v3, x86-64-v4 (with and
without AVX-512 VNNI) and aarch64 (with and without the dot product instructions), links against nothing, and
carries the SHA-256 of the source it was built from; a build from another source is not used. An artifact that
needs it on a machine without a build gets one line saying so, and how to export without it.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import onnxruntime as ort

from edge_runtime.attention_kernel import KERNELS, builds_for_this_machine
from edge_runtime.errors import EdgeRuntimeError

DOMAIN = "edge_runtime"
OPSET = 1
LORA_SLOT = "LoraSlot"  # y + (x @ a.T) @ b with half-precision a [r, in] and b [r, out] (lora_slots.py)
LORA_SLOT_INT8 = "LoraSlotInt8"  # y + ((x @ a.T) * scale) @ b with int8 a [r, in] and b [r, out], float32 scale [r]
MATMUL_INT4 = "MatMulInt4"  # x @ W.T for int4 W in its own layout (weight_formats.Int4)
MATMUL_INT8 = "MatMulInt8"  # x @ W.T for int8 W in its own layout (weight_formats.Int8)
# no baseline x86_64 build: the operators convert half precision in hardware (F16C)
BUILDS = ("x86_64-v4-vnni", "x86_64-v4", "x86_64-v3", "aarch64-dotprod", "aarch64")
SOURCE = KERNELS / "onnxruntime_ops.c"


def build_path(name: str) -> Path:
    return KERNELS / f"onnxruntime-ops-{name}.so"


@cache
def library() -> Path | None:
    """The best build this machine can run, or None."""
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest().encode()
    for name in builds_for_this_machine(BUILDS):
        path = build_path(name)
        if path.is_file() and source in path.read_bytes():
            return path
    return None


def register(options: ort.SessionOptions, artifact: Path, needs: str, way_out: str) -> None:
    """Make the operators known to sessions opened with `options`, for `artifact`'s graphs that use them (for
    `needs`, "int4 weights are", say; `way_out` says how to export without them)."""
    path = library()
    if path is None:
        raise EdgeRuntimeError(f"{artifact}: its {needs} computed by edge-runtime's onnxruntime operators, which "
                               f"have no build for this CPU (they need x86-64-v3 or aarch64); {way_out}")
    options.register_custom_ops_library(str(path))
