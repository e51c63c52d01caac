"""Weight formats: how a linear layer's [out, in] matrix is stored, which onnxruntime kernel computes with it, how the
runtime reads a row of it back, and what it costs in bytes, one class per format, as KVFormat is for the KV cache.

Export encodes each linear (`encode`, `write`) and emits its kernel into the graph (`emit`); the tied embedding is
written once per layout its two readers need (`write_embedding`), and the runtime decodes the token rows it looks up
(`decode_rows`); the planner and the cost model count a linear's bytes on disk and resident (`linear_bytes`) and an
embedding row's (`row_bytes`). Graph emission goes through the builder handed in (export/onnx_graph.py), so this
module needs numpy only and the runtime imports it without onnx.

Each format uses the kernel measured fastest for it at batch 1 (tools/kernel_bench.py): an onnxruntime CPU kernel
with ARM64 paths, or for int8 and int4 edge-runtime's own operators (onnxruntime_ops.py); none keeps a dequantized
copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge_runtime.onnxruntime_ops import MATMUL_INT4, MATMUL_INT8
from edge_runtime.quant.integer import (
    INT8_ROW_MULTIPLE,
    WEIGHT_TILE,
    block_count,
    dequantize_int4_blocks,
    dequantize_int8_blocks,
    dequantize_int8_rows,
    int4_tile_rows,
    int4_tiles,
    int8_tile_rows,
    int8_tiles,
    quantize_int4_blocks,
    quantize_int8_blocks,
    quantize_int8_rows,
)

if TYPE_CHECKING:
    from edge_runtime.artifact import TensorRef

BLOCK_SIZES = (32, 64, 128)
# MatMulNBits' accuracy level 4 quantizes activations to int8 per block and runs integer dot products (MLAS on
# ARM64); level 0 falls back to a float path 4-100x slower.
NBITS_ACCURACY_LEVEL = 4
# fp16: onnxruntime's x86 CPU Gemm has no fp16 kernel, so a float32 copy is made and the fp16 tensor kept: 3.0x the
# file's bytes for a 6144 x 1536 weight. int8-block: MatMulNBits (accuracy level 4) packs codes, scales and block
# sums, and the mapped scales stay resident: codes + 3 x scales, within 0.1 MiB for blocks 32, 64 and 128. int4's
# MatMulInt4 and int8's MatMulInt8 read the file's bytes as they are: resident = on disk.
FP16_RESIDENT_FACTOR = 3
NBITS_SCALE_COPIES = 3
Layout = tuple[tuple[int, ...], np.dtype]


def whole_records(chunks: Iterable[np.ndarray], rows: int) -> Iterable[np.ndarray]:
    """The row chunks regrouped into whole records of `rows` rows (the last chunk may end in a part of one)."""
    if rows == 1:
        yield from chunks
        return
    held = np.empty((0, 0), np.float32)
    for chunk in chunks:
        held = chunk if not len(held) else np.concatenate([held, chunk])
        whole = len(held) - len(held) % rows
        if whole:
            yield held[:whole]
            held = held[whole:]
    if len(held):
        yield held


@dataclass(frozen=True)
class LinearWeight:
    """A linear's weight [n out, k in] already in the weights file, as `format` lays it out for its kernel: `refs`
    names each part (the format's `encode` keys)."""

    format: WeightFormat
    n: int
    k: int
    refs: Mapping[str, TensorRef]


@dataclass(frozen=True)
class EmbeddingWeights:
    """The tied embedding as written: the LM head's weight, and the row-major tensors token lookup reads (codes, and
    scales where the format has them)."""

    head: LinearWeight
    codes: TensorRef
    scales: TensorRef | None

    @property
    def format(self) -> WeightFormat:
        return self.head.format


@dataclass(frozen=True)
class WeightFormat:
    """One weight format. Subclasses give the encoding, the kernel, the row decode and the byte counts; the embedding
    is written here for formats whose kernel reads the rows lookup reads (one copy serves both). `block_size` is the
    block of formats quantized in blocks, None for the others; formats compare by kind and block."""

    name: ClassVar[str]
    summary: ClassVar[str]
    block_size: int | None = None
    # Whether onnxruntime computes it fast only on CPUs with int8 dot products (cpu_features.has_int8_dot_product).
    needs_int8_dot_product: ClassVar[bool] = False
    # Whether its kernel is one of edge-runtime's own onnxruntime operators (edge_runtime/onnxruntime_ops.py).
    own_operator: ClassVar[bool] = False
    # Embedding rows a stored record holds (formats laid out in tiles of rows read a tile to look one up).
    rows_per_record: ClassVar[int] = 1
    # Whether its kernel adds int8 LoRA slots in its own node (emit's `slots`: export/onnx_graph.slotted_linear).
    fuses_slots: ClassVar[bool] = False

    def encode(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """A checkpoint weight [n, k] in the layout this format's kernel reads, by part name: for the formats whose
        kernel reads the embedding's rows as stored, its codes and scales."""
        codes, scale = self.encode_rows(w)
        return {"codes": codes, "scale": self.kernel_scales(scale)}

    def emit(self, g: Any, x: str, name: str, refs: Mapping[str, str], n: int, k: int,
             slots: Sequence[str] = ()) -> str:
        """Nodes computing x @ W.T into graph builder `g`, from the initializers `refs` (part name -> initializer);
        `slots`: LoRA slot inputs to add in the same node, for formats that fuse them."""
        raise NotImplementedError

    def linear_bytes(self, n: int, k: int) -> tuple[int, int]:
        """(bytes an [n, k] weight takes in the graphs, bytes resident once onnxruntime has loaded it)."""
        raise NotImplementedError

    def encode_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Embedding rows [r, k] as stored for lookup: (codes [r, ...], scales [r, ...] or None)."""
        raise NotImplementedError

    def decode_rows(self, codes: np.ndarray, scales: np.ndarray | None, k: int) -> np.ndarray:
        """Looked-up rows back to float32 [r, k]."""
        raise NotImplementedError

    def row_layout(self, k: int) -> tuple[Layout, Layout | None]:
        """Shape and dtype of one stored record of codes (a row, or a tile of `rows_per_record` rows), and of its
        scales (None: the format has none)."""
        raise NotImplementedError

    def select_rows(self, codes: np.ndarray, scales: np.ndarray | None,
                    members: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Row `members[i]` of record i, as decode_rows takes rows (formats with records of several rows)."""
        return codes, scales

    def kernel_scales(self, scales: np.ndarray) -> np.ndarray:
        """Scales as encode_rows gives them, in the shape the format's kernel reads (a linear's, the head's)."""
        return scales.reshape(-1)

    def row_bytes(self, k: int) -> int:
        """Bytes one token's embedding lookup reads (its record's)."""
        return sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                   for shape, dtype in filter(None, self.row_layout(k)))

    @property
    def label(self) -> str:
        """How people name it: "int4 b32" where the block matters, else the name."""
        return f"{self.name} b{self.block_size}" if self.block_size else self.name

    def write(self, writer: Any, w: np.ndarray) -> LinearWeight:
        """Encode a checkpoint weight [n, k] and append its parts to the weights file (export/onnx_graph.WeightsWriter)."""
        parts = self.encode(w)
        return LinearWeight(self, *w.shape, {key: writer.add([a], a.shape, a.dtype) for key, a in parts.items()})

    def write_embedding(self, writer: Any, chunks: Iterable[np.ndarray], vocab: int, k: int) -> EmbeddingWeights:
        """Stream the embedding's row chunks into the weights file: codes as they come, scales (small) after them.
        The head's kernel reads these rows as they are (its part names are `encode`'s, codes first)."""
        scales: list[np.ndarray] = []
        (code_shape, code_dtype), scale_layout = self.row_layout(k)

        def codes() -> Iterable[np.ndarray]:
            for chunk in whole_records(chunks, self.rows_per_record):
                code, scale = self.encode_rows(chunk)
                if scale is not None:
                    scales.append(scale)
                yield code

        records = -(-vocab // self.rows_per_record)
        codes_ref = writer.add(codes(), (records, *code_shape), code_dtype)
        refs = [codes_ref]
        if scale_layout is not None:
            stored = self.kernel_scales(np.concatenate(scales))
            refs.append(writer.add([stored], stored.shape, stored.dtype))
        parts = self.encode(np.zeros((1, k), np.float32))
        head = LinearWeight(self, vocab, k, dict(zip(parts, refs, strict=True)))
        return EmbeddingWeights(head, codes_ref, refs[1] if len(refs) > 1 else None)


@dataclass(frozen=True)
class Float32(WeightFormat):
    name = "fp32"
    summary = "the reference; parity with transformers within 1e-4 (Gemm)"

    def encode(self, w: np.ndarray) -> dict[str, np.ndarray]:
        return {"weight": np.asarray(w, dtype=np.float32)}

    def emit(self, g: Any, x: str, name: str, refs: Mapping[str, str], n: int, k: int,
             slots: Sequence[str] = ()) -> str:
        return g.op("Gemm", x, refs["weight"], transB=1)

    def linear_bytes(self, n: int, k: int) -> tuple[int, int]:
        return 4 * n * k, 4 * n * k

    def encode_rows(self, rows: np.ndarray) -> tuple[np.ndarray, None]:
        return self.encode(rows)["weight"], None

    def decode_rows(self, codes: np.ndarray, scales: np.ndarray | None, k: int) -> np.ndarray:
        return codes.astype(np.float32)

    def row_layout(self, k: int) -> tuple[Layout, None]:
        return ((k,), np.dtype(np.float32)), None


@dataclass(frozen=True)
class Float16(Float32):
    """Half precision. x86 has no fp16 Gemm, so it folds the casts and computes in fp32; ARM cores with FP16
    instructions compute in half precision (README, ARM64)."""

    name = "fp16"
    summary = "half-precision weights (Cast + fp16 Gemm + Cast)"

    def encode(self, w: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(over="ignore"):
            half = np.asarray(w).astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError(f"values outside the fp16 range (largest magnitude {float(np.abs(w).max()):.3g})")
        return {"weight": half}

    def emit(self, g: Any, x: str, name: str, refs: Mapping[str, str], n: int, k: int,
             slots: Sequence[str] = ()) -> str:
        half = g.cast(x, np.dtype(np.float16))
        return g.cast(g.op("Gemm", half, refs["weight"], transB=1), np.dtype(np.float32))

    def linear_bytes(self, n: int, k: int) -> tuple[int, int]:
        return 2 * n * k, 2 * n * k * FP16_RESIDENT_FACTOR

    def row_layout(self, k: int) -> tuple[Layout, None]:
        return ((k,), np.dtype(np.float16)), None


@dataclass(frozen=True)
class Tiled(WeightFormat):
    """A format computed by one of edge-runtime's own operators (onnxruntime_ops.py), which read a weight's rows in
    tiles of WEIGHT_TILE, codes and scales in place (resident = on disk); the embedding's lookup shares the head's
    tiles, reading a token's row with its tile's others. `operator` names the operator."""

    operator: ClassVar[str]
    rows_per_record: ClassVar[int] = WEIGHT_TILE
    own_operator: ClassVar[bool] = True
    fuses_slots: ClassVar[bool] = True

    def emit(self, g: Any, x: str, name: str, refs: Mapping[str, str], n: int, k: int,
             slots: Sequence[str] = ()) -> str:
        y = g.own(self.operator, x, refs["codes"], refs["scale"], *slots)
        if n % WEIGHT_TILE:  # the tiles' padding rows
            y = g.op("Slice", y, g.const([0], np.int64), g.const([n], np.int64), g.const([-1], np.int64))
        return y

    def linear_bytes(self, n: int, k: int) -> tuple[int, int]:
        size = -(-n // WEIGHT_TILE) * self.row_bytes(k)  # whole tiles, read in place
        return size, size

    def kernel_scales(self, scales: np.ndarray) -> np.ndarray:
        return scales


@dataclass(frozen=True)
class Int8(Tiled):
    """Symmetric per output channel, a float32 scale a row (quant/integer.py), computed by edge-runtime's own
    MatMulInt8 (edge_runtime/kernels/onnxruntime_ops.c) in its layout of 16-row tiles (quant/integer.int8_tiles):
    x quantized to int8 per row, integer dot products, the same arithmetic on every CPU (x86 VNNI or AVX2, Arm's
    dot product or the Pi 4's widening multiplies). A token's embedding row is read with its tile's 15 others (24 KB
    for E2B).

    onnxruntime's DynamicQuantizeMatMul, which computed int8 before, wanted the weight transposed, so the embedding
    kept a second, row-major copy for lookup (400 MB for E2B), and quantized x per tensor: a prompt's logits then
    depended on the rows batched with it (tools/kernel_bench.py compares the two)."""

    name: ClassVar[str] = "int8"
    operator: ClassVar[str] = MATMUL_INT8
    summary: ClassVar[str] = "symmetric per output channel, fp32 scale per row (edge-runtime's own MatMulInt8)"

    def encode_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return int8_tiles(*quantize_int8_rows(rows))

    def select_rows(self, codes: np.ndarray, scales: np.ndarray | None,
                    members: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return int8_tile_rows(codes, scales, members)

    def decode_rows(self, codes: np.ndarray, scales: np.ndarray | None, k: int) -> np.ndarray:
        return dequantize_int8_rows(codes[..., :k], scales)

    def row_layout(self, k: int) -> tuple[Layout, Layout]:
        padded = -(-k // INT8_ROW_MULTIPLE) * INT8_ROW_MULTIPLE
        return ((padded // 4, 4 * WEIGHT_TILE), np.dtype(np.int8)), ((1, WEIGHT_TILE), np.dtype(np.float32))


@dataclass(frozen=True)
class InBlocks(WeightFormat):
    """A format quantized in blocks of `block_size` values along a row."""

    block_size: int | None = 32

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {self.block_size} is not available for {self.name}; choose one of "
                             f"{', '.join(map(str, BLOCK_SIZES))}")


@dataclass(frozen=True)
class Int4(InBlocks, Tiled):
    """llama.cpp's Q4_0 grid per block of `block_size` values along a row, a float16 scale per block
    (quant/integer.py), computed by edge-runtime's own MatMulInt4 (edge_runtime/kernels/onnxruntime_ops.c) in its
    layout of 16-row tiles (quant/integer.int4_tiles), which the embedding's lookup shares: a token's row is read
    with its tile's 15 others (12 KB for E2B, against the 1.1 GB a decode step reads).

    onnxruntime's MatMulNBits, which computed int4 before, packs a second copy of the weight at load, reaches
    0.7-0.85 of the bandwidth at batch 1, and computes a different sum on each Arm core; MatMulInt4 reads the
    file's bytes in place, with the same integer arithmetic on every CPU (tools/kernel_bench.py compares them)."""

    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4
    operator: ClassVar[str] = MATMUL_INT4
    summary: ClassVar[str] = ("Q4_0 grid per block of --block-size, fp16 scale per block (edge-runtime's own "
                              "MatMulInt4)")

    def encode_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        packed, scale = quantize_int4_blocks(rows, self.block_size, np.dtype(np.float16))
        if not np.isfinite(scale).all():
            raise ValueError(f"values outside int4's float16 scales (largest magnitude {float(np.abs(rows).max()):.3g})")
        return int4_tiles(packed, scale)

    def select_rows(self, codes: np.ndarray, scales: np.ndarray | None,
                    members: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return int4_tile_rows(codes, scales, members)

    def decode_rows(self, codes: np.ndarray, scales: np.ndarray | None, k: int) -> np.ndarray:
        return dequantize_int4_blocks(codes, scales, k)

    def row_layout(self, k: int) -> tuple[Layout, Layout]:
        blocks = block_count(k, self.block_size)
        return (((blocks * self.block_size // 8, 4 * WEIGHT_TILE), np.dtype(np.uint8)),
                ((blocks, WEIGHT_TILE), np.dtype(np.float16)))


@dataclass(frozen=True)
class Int8Block(InBlocks):
    """int8 per block of `block_size` values along a row (llama.cpp's Q8_0 grid, an fp32 scale per block), computed by
    com.microsoft.MatMulNBits' 8-bit kernel, whose layout ([n, blocks, block] codes + 128, flat scales) the embedding
    rows share: one copy serves the head and the lookup.

    MLAS runs it with int8 activations per block where the CPU has integer dot products (x86 AVX2 and up, Arm dotprod
    and i8mm: Pi 5, phones). A core without them (the Pi 4's Cortex-A72) has no kernel for it, and onnxruntime then
    widens the whole weight to float32 at every run: there, use int8 (per channel) or int4. One node at E2B's MLP
    shape (K 1536, N 12288, batch 1, 2 threads, AMD EPYC Zen 4 AVX-512 VNNI, onnxruntime 1.32): block 128 158-163 us
    against int8 per channel's DynamicQuantizeMatMul (its kernel until stop 33) 283-298 us; block 64 173-185, block
    32 207-211."""

    name: ClassVar[str] = "int8-block"
    bits: ClassVar[int] = 8
    needs_int8_dot_product: ClassVar[bool] = True
    summary: ClassVar[str] = ("Q8_0 grid per block of --block-size, fp32 scale per block (com.microsoft.MatMulNBits "
                              "8-bit; CPUs with int8 dot products)")

    def emit(self, g: Any, x: str, name: str, refs: Mapping[str, str], n: int, k: int,
             slots: Sequence[str] = ()) -> str:
        return g.contrib("MatMulNBits", x, refs["codes"], refs["scale"], K=k, N=n, bits=self.bits,
                         block_size=self.block_size, accuracy_level=NBITS_ACCURACY_LEVEL)

    def linear_bytes(self, n: int, k: int) -> tuple[int, int]:
        blocks = block_count(k, self.block_size)
        codes, scales = n * blocks * self.block_size * self.bits // 8, 4 * n * blocks
        return codes + scales, codes + NBITS_SCALE_COPIES * scales

    def encode_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return quantize_int8_blocks(rows, self.block_size)

    def decode_rows(self, codes: np.ndarray, scales: np.ndarray | None, k: int) -> np.ndarray:
        return dequantize_int8_blocks(codes, scales, k)

    def row_layout(self, k: int) -> tuple[Layout, Layout]:
        blocks = block_count(k, self.block_size)
        return ((blocks, self.block_size * self.bits // 8), np.dtype(np.uint8)), ((blocks,), np.dtype(np.float32))


_FORMATS: dict[str, type[WeightFormat]] = {f.name: f for f in (Float32, Float16, Int8, Int4, Int8Block)}
WEIGHT_FORMATS = tuple(_FORMATS)


def weight_format(name: str, block_size: int) -> WeightFormat:
    """The format called `name`; `block_size` applies to formats in blocks (int4, int8-block). A ValueError says what
    is wrong with the name or the block."""
    if name not in _FORMATS:
        raise ValueError(f"not available; choose one of {', '.join(WEIGHT_FORMATS)}")
    kind = _FORMATS[name]
    return kind(block_size) if issubclass(kind, InBlocks) else kind()
