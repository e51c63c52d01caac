"""The Per-Layer Embedding store: a memory-mapped [vocab, layers * width] table read one row per token.

The PLE table is half of E2B's parameters but a token touches only its own row (35 x 256 values), so it
stays on flash and out of every ONNX graph: the OS pages in the rows of the tokens being processed and can
drop them again under memory pressure. Rows are returned already multiplied by sqrt(width), the scale
transformers' `Gemma4TextScaledWordEmbedding` applies, and laid out [layers, tokens, width] so that layer
i receives a contiguous slice.

Formats: fp32; bf16, stored as the upper 16 bits of fp32 (lossless for bf16 checkpoints, which is how Gemma
ships, at the size of fp16); fp16 (lossless for bf16 values in its normal range); int8 (symmetric, one fp16
scale per 64 values) and int4 (Q4_0-style, one fp16 scale per 32 values). Integer rows keep their codes
and scales side by side, so one token is still one contiguous read: [codes | scales] per row.

tq4, tq3, tq2: TurboQuant (edge_runtime.quant.turboquant, mode "mse"): every layer's `layer_width` slice of a
row is one vector, stored as its packed 4/3/2-bit Lloyd-Max codes after a fixed random rotation and its fp16
norm, a row being [all slices' codes | all slices' norms]. At equal bits the rotation makes the error that of
the codebook (D_mse: about 0.0095, 0.035, 0.117 of the slice's squared norm) whatever the values' spread,
with one norm per 256 values instead of a scale per 32. Decoding a batch of tokens is a centroid lookup and
one [tokens * layers, width] @ rotation matmul. Export and runtime rebuild the rotation from its seed (QR of
a seeded Gaussian), so it is not stored; a different LAPACK may round it differently in the last bits, which
moves decoded values by float32 rounding only.
The encoding lives here, next to the decoding, so export and runtime cannot disagree about it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_runtime.artifact import TensorRef
from edge_runtime.errors import ArtifactError, EdgeRuntimeError
from edge_runtime.mapping import map_rows
from edge_runtime.quant.integer import (
    block_count,
    dequantize_int4_blocks,
    dequantize_int8_rows,
    quantize_int4_blocks,
    quantize_int8_rows,
)
from edge_runtime.quant.packing import packed_bytes
from edge_runtime.quant.turboquant import TurboQuantizer

_FLOAT = {"fp32": np.dtype("<f4"), "bf16": np.dtype("<u2"), "fp16": np.dtype("<f2")}
_BLOCK = {"int8": 64, "int4": 32}
_TURBO = {"tq4": 4, "tq3": 3, "tq2": 2}
PLE_FORMATS = (*_FLOAT, *_BLOCK, *_TURBO)
# The format that holds a checkpoint's table exactly, by its safetensors dtype: what `--ple auto` exports to.
LOSSLESS_FORMATS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_SCALE = np.dtype("<f2")
TURBO_SEED = 0


@lru_cache(maxsize=8)
def _turbo(fmt: str, layer_width: int) -> TurboQuantizer:
    return TurboQuantizer(layer_width, _TURBO[fmt], "mse", TURBO_SEED)


def _turbo_layout(fmt: str, width: int, layer_width: int | None) -> tuple[int, int]:
    """(slices per row, code bytes per slice) of a TurboQuant row of `width` values."""
    if layer_width is None:
        raise ValueError(f"PLE format {fmt} codes each layer's slice of a row: pass layer_width")
    slices = width // layer_width
    if not slices or slices * layer_width != width:
        raise ValueError(f"PLE format {fmt}: a row of {width} values is not whole slices of {layer_width}")
    return slices, packed_bytes(layer_width, _TURBO[fmt])


def storage_dtype(fmt: str) -> np.dtype:
    return _FLOAT.get(fmt, np.dtype(np.uint8))


def _layout(fmt: str, width: int) -> tuple[int, int]:
    """(code bytes, scale count) of one row of `width` values in an integer format."""
    blocks = block_count(width, _BLOCK[fmt])
    return (width if fmt == "int8" else blocks * _BLOCK[fmt] // 2), blocks


def stored_width(fmt: str, width: int, layer_width: int | None = None) -> int:
    """Elements of storage_dtype(fmt) per row of `width` values (`layer_width`: the slice TurboQuant codes)."""
    if fmt in _FLOAT:
        return width
    if fmt in _TURBO:
        slices, code_bytes = _turbo_layout(fmt, width, layer_width)
        return slices * (code_bytes + _SCALE.itemsize)
    codes, scales = _layout(fmt, width)
    return codes + scales * _SCALE.itemsize


def encode_rows(rows: np.ndarray, fmt: str, layer_width: int | None = None) -> np.ndarray:
    """float32 rows [R, width] -> stored rows [R, stored_width]; bf16 rounds to nearest even.

    Values beyond fp16's range become inf here; export checks for that and names the fix.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if fmt in _TURBO:
        slices, _ = _turbo_layout(fmt, rows.shape[1], layer_width)
        encoded = _turbo(fmt, layer_width).encode(rows.reshape(-1, layer_width))
        with np.errstate(over="ignore"):
            norms = encoded["norm"].astype(_SCALE).reshape(len(rows), slices)
        return np.concatenate([encoded["codes"].reshape(len(rows), -1), norms.view(np.uint8)], axis=1)
    if fmt == "bf16":
        bits = rows.view(np.uint32)
        return ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    if fmt in _FLOAT:
        with np.errstate(over="ignore"):
            return rows.astype(_FLOAT[fmt])
    r, width = rows.shape
    block = _BLOCK[fmt]
    _, blocks = _layout(fmt, width)
    with np.errstate(over="ignore"):
        if fmt == "int8":
            padded = np.pad(rows, ((0, 0), (0, blocks * block - width)))
            codes, scales = quantize_int8_rows(padded.reshape(r * blocks, block), _SCALE)
            codes = codes.reshape(r, -1)[:, :width].view(np.uint8)
        else:
            codes, scales = quantize_int4_blocks(rows, block, _SCALE)
            codes = codes.reshape(r, -1)
    return np.concatenate([codes, scales.reshape(r, blocks).view(np.uint8)], axis=1)


def decode_rows(raw: np.ndarray, fmt: str, width: int, layer_width: int | None = None) -> np.ndarray:
    """Stored rows -> float32 [R, width]."""
    if fmt in _TURBO:
        slices, code_bytes = _turbo_layout(fmt, width, layer_width)
        r = raw.shape[0]
        codes = raw[:, : slices * code_bytes].reshape(r * slices, code_bytes)
        norms = np.ascontiguousarray(raw[:, slices * code_bytes:]).view(_SCALE).reshape(-1).astype(np.float32)
        return _turbo(fmt, layer_width).decode({"codes": codes, "norm": norms}).reshape(r, width)
    if fmt == "bf16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if fmt in _FLOAT:
        return raw.astype(np.float32)
    r = raw.shape[0]
    block = _BLOCK[fmt]
    code_bytes, blocks = _layout(fmt, width)
    scales = np.ascontiguousarray(raw[:, code_bytes:]).view(_SCALE).reshape(r, blocks)
    if fmt == "int8":
        codes = np.pad(raw[:, :code_bytes].view(np.int8), ((0, 0), (0, blocks * block - width)))
        return dequantize_int8_rows(codes.reshape(r, blocks, block), scales).reshape(r, -1)[:, :width]
    packed = raw[:, :code_bytes].reshape(r, blocks, block // 2)
    return dequantize_int4_blocks(packed, scales, width)


class PleStore:
    """Read-only view of `ple.bin`; only rows that are asked for are ever read from disk."""

    def __init__(self, artifact: Path, ref: TensorRef, fmt: str, num_layers: int, width: int, scale: float,
                 fill_row: int | None = None) -> None:
        path = Path(artifact) / ref.file
        if fmt not in PLE_FORMATS:
            raise ArtifactError(f"{path}: PLE format {fmt!r} is not supported by this runtime ({sorted(PLE_FORMATS)})")
        vocab, stored = ref.shape
        expected = stored_width(fmt, num_layers * width, width)
        if stored != expected:
            raise ArtifactError(f"{path}: row width {stored} is not {num_layers} layers x {width} values in {fmt} "
                                f"({expected}); the manifest is inconsistent, re-export")
        if ref.dtype != storage_dtype(fmt).name:
            raise ArtifactError(f"{path}: the manifest stores PLE format {fmt} as {ref.dtype}, not "
                                f"{storage_dtype(fmt).name}; the manifest is inconsistent, re-export")
        self.format = fmt
        self.table = map_rows(path, storage_dtype(fmt), ref.offset, (vocab, stored))
        self.num_layers = num_layers
        self.width = width
        self.scale = np.float32(scale)
        self.fill_row = fill_row

    @property
    def vocab_size(self) -> int:
        return self.table.shape[0]

    def rows(self, token_ids: np.ndarray) -> np.ndarray:
        """[layers, tokens, width] float32 for these tokens (fancy indexing reads just their rows).

        Ids outside the table read row `fill_row` where the store has one (Gemma 3n's vision and audio ids, past its
        PLE vocabulary, take row 0 as transformers gives them), and are refused otherwise."""
        ids = np.asarray(token_ids, dtype=np.int64)
        if self.fill_row is not None:
            ids = np.where((ids >= 0) & (ids < self.vocab_size), ids, self.fill_row)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise EdgeRuntimeError(f"token id out of range for the PLE table (vocab {self.vocab_size})")
        raw = decode_rows(self.table[ids], self.format, self.num_layers * self.width, self.width) * self.scale
        return np.ascontiguousarray(raw.reshape(len(ids), self.num_layers, self.width).transpose(1, 0, 2))
