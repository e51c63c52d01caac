"""Integer weight codes: int8 per output channel, int8 and int4 in blocks, in the layouts their kernels read.

int8 is symmetric per row (output channel): code = round(w / s), s = max|w| / 127, codes in [-127, 127], laid out
for edge-runtime's MatMulInt8 in tiles of rows (int8_tiles).
int8 in blocks is the same per block of `block` values along a row (llama.cpp's Q8_0 grid), stored offset by 128
([N, blocks, block] uint8: MatMulNBits' 8-bit layout with its default zero point 128).
int4 follows llama.cpp's Q4_0: per block of `block` values along a row, the value of largest magnitude m
gets code 0 and s = m / -8, so the 16 levels reach both ends; codes are stored offset by 8 (0..15), two per
byte, the even element in the low nibble ([N, blocks, block/2]), then laid out for edge-runtime's MatMulInt4 in
tiles of rows (int4_tiles). Rows whose length is not a multiple of the block are zero-padded.
"""

from __future__ import annotations

import numpy as np

INT4_ZERO = 8


def quantize_int8_rows(w: np.ndarray,
                       scale_dtype: np.dtype = np.dtype(np.float32)) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (int8 codes [N, K], scales [N] of `scale_dtype`), codes chosen on the stored scale."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    codes = np.clip(np.rint(w / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return codes, scale


def offset_binary(codes: np.ndarray) -> np.ndarray:
    """int8 codes as uint8 code + 128, for kernels that take unsigned codes with zero point 128."""
    return np.ascontiguousarray(codes, dtype=np.int8).view(np.uint8) ^ np.uint8(0x80)


def dequantize_int8_rows(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]


def block_count(k: int, block: int) -> int:
    """Blocks of `block` values covering a row of `k` (the last one zero-padded)."""
    return -(-k // block)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """[N, K] float -> [N, blocks, block] float32, the last block zero-padded."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    nb = block_count(k, block)
    if nb * block != k:
        w = np.pad(w, ((0, 0), (0, nb * block - k)))
    return w.reshape(n, nb, block)


def quantize_int8_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (uint8 codes + 128 [N, blocks, block], float32 scales [N, blocks])."""
    blocks = _blocks(w, block)
    scale = np.abs(blocks).max(axis=2) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int8)
    return offset_binary(codes), scale


def dequantize_int8_blocks(codes: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    """Inverse of quantize_int8_blocks for any leading shape: [..., blocks, block] -> [..., k] float32."""
    values = (codes.astype(np.int16) - 128).astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]
    return values.reshape(*codes.shape[:-2], -1)[..., :k]


def quantize_int4_blocks(w: np.ndarray, block: int,
                         scale_dtype: np.dtype = np.dtype(np.float32)) -> tuple[np.ndarray, np.ndarray]:
    """[N, K] float -> (uint8 packed codes [N, blocks, block/2], scales [N, blocks] of `scale_dtype`).

    Codes are computed against the scale as stored (e.g. after rounding to fp16), so decoding sees exactly
    the grid the codes were chosen on.
    """
    blocks = _blocks(w, block)
    idx = np.abs(blocks).argmax(axis=2)[..., None]
    extreme = np.take_along_axis(blocks, idx, axis=2)[..., 0]
    scale = (extreme / -8.0).astype(scale_dtype)
    safe = np.where(scale != 0, scale.astype(np.float32), 1.0)
    q = np.clip(np.rint(blocks / safe[..., None]) + INT4_ZERO, 0, 15).astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale


def dequantize_int4_blocks(packed: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    """Inverse of quantize_int4_blocks for any leading shape: [..., blocks, block/2] -> [..., k] float32."""
    low = (packed & 0x0F).astype(np.int8) - INT4_ZERO
    high = (packed >> 4).astype(np.int8) - INT4_ZERO
    q = np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    values = q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]
    return values.reshape(*packed.shape[:-2], -1)[..., :k]


WEIGHT_TILE = 16  # rows of W a tile of MatMulInt4's and MatMulInt8's layouts holds (onnxruntime_ops.c's TILE)
# MatMulInt8 reads a row as one block of x, of a multiple of this many values (onnxruntime_ops.c); rows are padded
INT8_ROW_MULTIPLE = 16


def int4_tiles(packed: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_int4_blocks' codes [N, blocks, block/2] and scales [N, blocks] in edge-runtime's MatMulInt4 layout
    (edge_runtime/kernels/onnxruntime_ops.c): codes [tiles, k/8, 64], byte i of a row's 4 in each 64 holding its
    values 8c + i (low nibble) and 8c + 4 + i (high), and float16 scales [tiles, blocks, 16]. Rows are padded to
    whole tiles with zeros (code 8, scale 0)."""
    n, blocks, half = packed.shape
    q = np.empty((n, blocks * half * 2), dtype=np.uint8)
    q[:, 0::2], q[:, 1::2] = (packed & 0x0F).reshape(n, -1), (packed >> 4).reshape(n, -1)
    pad = -n % WEIGHT_TILE
    q = np.pad(q, ((0, pad), (0, 0)), constant_values=INT4_ZERO)
    scale = np.pad(np.asarray(scale, dtype=np.float16), ((0, pad), (0, 0)))
    tiles, k = (n + pad) // WEIGHT_TILE, q.shape[1]
    u = q.reshape(tiles, WEIGHT_TILE, k // 8, 2, 4)
    codes = (u[:, :, :, 0, :] | (u[:, :, :, 1, :] << 4)).transpose(0, 2, 1, 3).reshape(tiles, k // 8, 4 * WEIGHT_TILE)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scale.reshape(tiles, WEIGHT_TILE, blocks).transpose(0, 2, 1))


def int4_tile_rows(codes: np.ndarray, scales: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row `members[i]` of tile i, for tiles (codes [r, k/8, 64], scales [r, blocks, 16]) as int4_tiles lays them
    out, back in quantize_int4_blocks' layout: ([r, blocks, block/2], float32 [r, blocks])."""
    r, chunks, _ = codes.shape
    every = np.arange(r)
    b = codes.reshape(r, chunks, WEIGHT_TILE, 4)[every, :, members, :]
    q = np.concatenate([b & 0x0F, b >> 4], axis=-1).reshape(r, chunks * 8)
    blocks = scales.shape[1]
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(r, blocks, -1)
    return packed, scales[every, :, members].astype(np.float32)


def int8_tiles(codes: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """quantize_int8_rows' codes [N, K] and scales [N] in edge-runtime's MatMulInt8 layout
    (edge_runtime/kernels/onnxruntime_ops.c): codes [tiles, K'/4, 64], each 64 bytes 4 consecutive values of each of
    a tile's 16 rows, K' being K padded with zeros to a multiple of INT8_ROW_MULTIPLE, and float32 scales
    [tiles, 1, 16]. Rows are padded to whole tiles with zeros (code 0, scale 0)."""
    n, k = codes.shape
    q = np.pad(codes, ((0, -n % WEIGHT_TILE), (0, -k % INT8_ROW_MULTIPLE)))
    scale = np.pad(np.asarray(scale, dtype=np.float32), (0, -n % WEIGHT_TILE))
    tiles, k = q.shape[0] // WEIGHT_TILE, q.shape[1]
    tiled = q.reshape(tiles, WEIGHT_TILE, k // 4, 4).transpose(0, 2, 1, 3).reshape(tiles, k // 4, 4 * WEIGHT_TILE)
    return np.ascontiguousarray(tiled), np.ascontiguousarray(scale.reshape(tiles, 1, WEIGHT_TILE))


def int8_tile_rows(codes: np.ndarray, scales: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row `members[i]` of tile i, for tiles (codes [r, K'/4, 64], scales [r, 1, 16]) as int8_tiles lays them out,
    back in quantize_int8_rows' layout: (int8 [r, K'], float32 [r])."""
    r, chunks, _ = codes.shape
    every = np.arange(r)
    rows = codes.reshape(r, chunks, WEIGHT_TILE, 4)[every, :, members, :].reshape(r, chunks * 4)
    return rows, scales[every, 0, members]
