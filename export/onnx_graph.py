"""Graph-building helpers shared by every model family: ops, norms, linears and external weights.

Graphs are assembled node by node with `onnx.helper` rather than traced from torch, so export needs no
torch and each graph contains exactly the ops chosen here. Large weights never enter the protobuf: they are
appended to the artifact's weights file at 64 KiB-aligned offsets (onnxruntime maps aligned external data
instead of copying it) and referenced from the graph, so a graph file stays a few kilobytes and export holds
one tensor in memory at a time. A linear is a weight and the format that encodes it (edge_runtime/weight_formats.py),
which writes its parts and emits its kernel here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.artifact import EXTERNAL_DATA_ALIGNMENT, TensorRef
from edge_runtime.lora_slots import SlotRequest, a_shape, module_of, slot_inputs, slot_scale
from edge_runtime.onnxruntime_ops import DOMAIN as OPS_DOMAIN
from edge_runtime.onnxruntime_ops import LORA_SLOT, LORA_SLOT_INT8
from edge_runtime.onnxruntime_ops import OPSET as OPS_OPSET
from edge_runtime.weight_formats import LinearWeight, WeightFormat

OPSET = 21
MS_DOMAIN = "com.microsoft"
IR_VERSION = 10
INLINE_LIMIT = 16 << 10
_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.uint8): TensorProto.UINT8,
               np.dtype(np.int8): TensorProto.INT8}


class WeightsWriter:
    """Appends tensors to one binary file at aligned offsets and remembers where each one went."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = self.path.open("wb")
        self._offset = 0

    def __enter__(self) -> WeightsWriter:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()

    def add(self, chunks: Iterable[np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> TensorRef:
        pad = -self._offset % EXTERNAL_DATA_ALIGNMENT
        self._file.write(b"\0" * pad)
        start = self._offset + pad
        written = 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk, dtype=dtype)
            self._file.write(memoryview(data).cast("B"))
            written += data.nbytes
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if written != expected:
            raise ValueError(f"wrote {written} bytes for a tensor of shape {shape}, expected {expected}")
        self._offset = start + written
        return TensorRef(self.path.name, start, tuple(shape), np.dtype(dtype).name)


class GraphBuilder:
    """Accumulates one ONNX graph; every helper returns the name of the value it produced."""

    def __init__(self, name: str, weights: WeightsWriter, slots: SlotRequest | None = None) -> None:
        self.name = name
        self.weights = weights
        self.slots = slots  # --lora-slots and their precision, or None
        self.slotted: dict[str, tuple[int, int]] = {}  # each LoRA slot made: tensor name -> (in, out)
        self.linears: dict[str, WeightFormat] = {}  # each linear's name and the format it was written in
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weight_bytes = 0
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def input(self, name: str, shape: list[int | str], dtype: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, value: str, name: str, shape: list[int | str], dtype: int = TensorProto.FLOAT) -> None:
        self.op("Identity", value, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def weight(self, name: str, array: np.ndarray, dtype: np.dtype = np.dtype(np.float32)) -> str:
        """An initializer kept at full precision (norms, scalars): inline when small, else in the weights file."""
        array = np.asarray(array, dtype=dtype)
        if array.nbytes <= INLINE_LIMIT:
            self.initializers.append(numpy_helper.from_array(array, name))
            self.weight_bytes += array.nbytes
            return name
        return self.external(name, self.weights.add([array], array.shape, array.dtype))

    def external(self, name: str, ref: TensorRef) -> str:
        """Reference a tensor already in the weights file (e.g. the embedding shared with the LM head)."""
        tensor = TensorProto(name=name, data_type=_NP_TO_ONNX[np.dtype(ref.dtype)], dims=list(ref.shape))
        tensor.data_location = TensorProto.EXTERNAL
        size = int(np.prod(ref.shape, dtype=np.int64)) * np.dtype(ref.dtype).itemsize
        self.weight_bytes += size
        for key, value in (("location", ref.file), ("offset", str(ref.offset)), ("length", str(size))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def const(self, value, dtype=np.float32) -> str:
        name = self._fresh("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, n_out: int = 1, domain: str = "",
           **attrs) -> str:
        outs = [out or self._fresh(op_type.lower())] if n_out == 1 else [self._fresh(op_type.lower())
                                                                          for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, name: str, w: np.ndarray | LinearWeight, fmt: WeightFormat | None = None,
               slots: Sequence[str] = ()) -> str:
        """x @ W.T: a checkpoint weight W [out, in] is written here in `fmt`; a LinearWeight is already written (the
        head shares the embedding's) in its own. `name` names the initializers ("name.<part>") and the record of
        which format it took; the format emits its kernel's nodes (edge_runtime/weight_formats.py), with `slots`'
        LoRA inputs where it adds them itself (WeightFormat.fuses_slots)."""
        if not isinstance(w, LinearWeight):
            if fmt is None:
                raise TypeError(f"linear {name}: a checkpoint weight needs the format to write it in")
            try:
                w = fmt.write(self.weights, w)
            except ValueError as exc:
                raise ValueError(f"{name} has {exc}") from None
        refs = {key: self.external(f"{name}.{key}", ref) for key, ref in w.refs.items()}
        self.linears[name] = w.format
        return w.format.emit(self, x, name, refs, w.n, w.k, slots)

    def slotted_linear(self, x: str, name: str, w: np.ndarray, fmt: WeightFormat, in_width: int,
                       parts: Sequence[tuple[str, int]]) -> list[str]:
        """x @ W.T cut into `parts` ((tensor, width): column ranges of W's rows, in order; q, k and v of a fused
        projection, say), each plus its LoRA slot's update where its module has one (edge_runtime/lora_slots.py).
        int8 slots on a format that fuses them are inputs of the product's own node (an empty one then costs
        nothing); other slots are nodes after it: float32 two MatMuls and an Add, reading (in + out) * r * 4 bytes at
        rank r; float16 one LoraSlot node, half of that; int8 one LoraSlotInt8 node, a quarter."""
        slotted = [i for i, (tensor, _) in enumerate(parts)
                   if self.slots is not None and module_of(tensor) in self.slots.modules]
        if slotted and self.slots.dtype == "int8" and fmt.fuses_slots:
            starts = np.cumsum([0] + [width for _, width in parts])
            inputs = [self.const([starts[i] for i in slotted], np.int64)]
            for i in slotted:
                inputs += self._slot_inputs(*parts[i], in_width)
            return self._split(self.linear(x, name, w, fmt, inputs), parts)
        outputs = self._split(self.linear(x, name, w, fmt), parts)
        for i in slotted:
            outputs[i] = self._lora(x, outputs[i], *parts[i], in_width)
        return outputs

    def _split(self, y: str, parts: Sequence[tuple[str, int]]) -> list[str]:
        if len(parts) == 1:
            return [y]
        widths = [width for _, width in parts]
        return self.op("Split", y, self.const(widths, np.int64), axis=-1, n_out=len(parts))

    def _slot_inputs(self, tensor: str, out_width: int, in_width: int) -> list[str]:
        """The graph inputs of `tensor`'s slot, declared: A and B, and int8's scale. Their rank is symbolic: each
        slot takes its adapter's own, 0 without one."""
        a, b = slot_inputs(tensor)
        rank, dtype = f"{tensor}.rank", self.slots.dtype
        onnx_dtype = _NP_TO_ONNX[np.dtype(dtype)]
        self.input(a, list(a_shape(dtype, in_width, rank)), onnx_dtype)
        self.input(b, [rank, out_width], onnx_dtype)
        self.slotted[tensor] = (in_width, out_width)
        return [a, b] + ([self.input(slot_scale(tensor), [rank])] if dtype == "int8" else [])

    def _lora(self, x: str, y: str, tensor: str, out_width: int, in_width: int) -> str:
        """y + (x @ A) @ B through nodes of its own."""
        inputs = self._slot_inputs(tensor, out_width, in_width)
        if self.slots.dtype == "float32":
            return self.op("Add", y, self.op("MatMul", self.op("MatMul", x, inputs[0]), inputs[1]))
        return self.own(LORA_SLOT if self.slots.dtype == "float16" else LORA_SLOT_INT8, x, y, *inputs)

    def own(self, op_type: str, *inputs: str) -> str:
        """One node of edge-runtime's own operators (edge_runtime/onnxruntime_ops.py)."""
        return self.op(op_type, *inputs, domain=OPS_DOMAIN)

    def contrib(self, op_type: str, *inputs: str, **attrs) -> str:
        """One node of onnxruntime's com.microsoft contrib ops (CPU kernels, with ARM64 paths)."""
        return self.op(op_type, *inputs, domain=MS_DOMAIN, **attrs)

    def cast(self, x: str, dtype: np.dtype) -> str:
        return self.op("Cast", x, to=_NP_TO_ONNX[np.dtype(dtype)])

    def rms_norm(self, x: str, weight: str | None, eps: float, width: int | None = None) -> str:
        """Gemma's RMSNorm over the last axis: x * (mean(x^2) + eps)^-0.5 * w, the weight used as is (not 1 + w).

        One onnxruntime SimplifiedLayerNormalization node (a contrib op of the ONNX domain, CPU and ARM64)
        instead of six elementwise nodes: at batch 1 a node costs a few microseconds whatever its size, and
        E2B runs 300 norms per token. A norm without weight (Gemma's v norm) gets ones of `width`.
        """
        if weight is None:
            weight = self.const(np.ones(width, dtype=np.float32))
        return self.op("SimplifiedLayerNormalization", x, weight, axis=-1, epsilon=eps)

    def skip_rms_norm(self, x: str, skip: str, weight: str, eps: float) -> tuple[str, str]:
        """(RMSNorm(x + skip) * weight, x + skip) as one com.microsoft SkipSimplifiedLayerNormalization node: the
        residual add and the norm after it, which Gemma's layers do twice each."""
        normed, _, _, total = self.op("SkipSimplifiedLayerNormalization", x, skip, weight, domain=MS_DOMAIN,
                                      epsilon=eps, n_out=4)
        return normed, total

    def gelu_tanh(self, x: str) -> str:
        return self.op("Gelu", x, approximate="tanh")

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.op("Reshape", x, self.const(shape, np.int64))

    def unsqueeze(self, x: str, axis: int) -> str:
        return self.op("Unsqueeze", x, self.const([axis], np.int64))

    def save(self, path: Path) -> int:
        """Write the graph; returns the weight bytes it reads per call (what a decode step streams)."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        domains = [helper.make_opsetid(MS_DOMAIN, 1)]
        if any(node.domain == OPS_DOMAIN for node in self.nodes):
            domains.append(helper.make_opsetid(OPS_DOMAIN, OPS_OPSET))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), *domains],
                                  producer_name="edge-runtime", ir_version=IR_VERSION)
        Path(path).write_bytes(model.SerializeToString())
        return self.weight_bytes
