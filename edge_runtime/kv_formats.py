"""KV cache formats: how keys and values are stored, chosen at load time rather than at export.

Every format is a pair of vector codecs (edge_runtime.quant), one for keys and one for values, built per
cache layer and KV head. Keys only ever meet queries in inner products, values only in weighted sums, so
each side may use a different codec; attention reads both straight from their codes.

Non-integer TurboQuant widths follow the paper: the channels are split into an outlier half at the higher
width and the rest at the lower one (3.5 = 4 + 3 bits, 2.5 = 3 + 2 bits), each half with its own rotation
and norm. The outlier half is the channels with the largest mean square in the first tokens written to
that layer and head (the prompt's first prefill chunk): Gemma's q/k norms give keys fixed per-channel
scales, so the first tokens show them. TurboQuant's rotation is a randomized Hadamard transform where the
width is a power of two from HADAMARD_MIN_WIDTH (turboquant.hadamard_signs), a Haar matrix elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model_spec import ModelSpec
from edge_runtime.quant.codec import VectorCodec
from edge_runtime.quant.float_codecs import Float16Codec, Float32Codec, Int8Codec
from edge_runtime.quant.turboquant import ChannelSplit, QJLQuantizer, TurboQuantizer, is_power_of_two

SEED = 0
# Narrowest TurboQuant part rotated by a randomized Hadamard transform. Below it a dense rotation is small (64 wide:
# 16 KiB, a few microseconds a call), and a narrow Hadamard rotation strays further from the Haar law the codebook
# assumes (basis vectors, 4 bits, eight seeds: up to 1.07x the Lloyd-Max distortion at 128 wide, 1.8x at 32).
HADAMARD_MIN_WIDTH = 128
# Exact recent tokens kept by compressed formats unless told otherwise: 32 tokens cost E2B 1.2 MB; the bundled
# model's tq3.5 perplexity change (512-token context, token by token) went from +1.32% to +0.01% with them.
DEFAULT_RECENT = 32
# Rings (sliding windows, exact recent tokens) hold this many slots beyond what attention reads, so that the cache
# can be cut back by up to that many tokens (KVCache.truncate): a chat turn re-renders the transcript, and the
# tokens of the last reply often differ at their end (trimmed whitespace, a stop string, re-tokenization).
ROLLBACK_TOKENS = 64


def ring_slots(tokens: int) -> int:
    """Slots of a ring read back over its last `tokens` tokens (a sliding window, the exact recent ring): those and
    ROLLBACK_TOKENS more; none for none."""
    return tokens + ROLLBACK_TOKENS if tokens else 0


@dataclass(frozen=True)
class CodecSpec:
    """One side (keys or values) of a KV format."""

    kind: str
    bits: float = 0.0
    mode: str = "mse"
    unbiased: bool = False

    @property
    def packed(self) -> bool:
        """Codes looked up in a table before their multiply-adds (TurboQuant, QJL), which costs attention more time
        a value than the float kinds' conversion (cost_model.PACKED_VALUES_PER_CYCLE)."""
        return self.kind in ("tq", "qjl")

    def build(self, dim: int, sample: np.ndarray) -> VectorCodec:
        """A codec for `dim`-wide vectors; `sample` [n, dim] (the first vectors stored) picks outlier channels."""
        if self.kind == "fp32":
            return Float32Codec(dim)
        if self.kind == "fp16":
            return Float16Codec(dim)
        if self.kind == "int8":
            return Int8Codec(dim)
        if self.kind == "qjl":
            return QJLQuantizer(dim, int(self.bits) * dim, SEED)
        if self.bits == int(self.bits):
            return self._turboquant(dim, int(self.bits), SEED)
        energy = np.square(np.asarray(sample, dtype=np.float32)).mean(axis=0)
        outliers = np.sort(np.argsort(-energy, kind="stable")[: dim // 2])
        high, low = int(np.ceil(self.bits)), int(np.floor(self.bits))
        return ChannelSplit(outliers, self._turboquant(dim // 2, high, SEED),
                            self._turboquant(dim - dim // 2, low, SEED + 1))

    def _turboquant(self, dim: int, bits: int, seed: int) -> TurboQuantizer:
        """Rotated by a randomized Hadamard transform where the width allows and a dense matrix would cost (E2B/E4B's
        head widths and their halves), which decode attention applies without reading a matrix; by a Haar rotation
        elsewhere."""
        rotation = "hadamard" if is_power_of_two(dim) and dim >= HADAMARD_MIN_WIDTH else "haar"
        return TurboQuantizer(dim, bits, self.mode, seed, self.unbiased, rotation)


class AttentionReads(NamedTuple):
    """What one decode step's attention reads: bytes, and the key and value elements behind them (`packed` of them
    are packed codes, the rest floats)."""

    bytes: int
    values: int
    packed: int


@dataclass(frozen=True)
class KVFormat:
    name: str
    keys: CodecSpec
    values: CodecSpec
    summary: str
    default_recent: int = DEFAULT_RECENT

    @property
    def exact(self) -> bool:
        """Stores vectors as they are, so recent tokens need no exact copy."""
        return self.keys.kind == self.values.kind == "fp32"

    def bytes_per_token(self, dim: int) -> int:
        """Stored bytes of one token's key and value for one KV head of width `dim`, norms included."""
        sample = np.ones((1, dim), dtype=np.float32)
        return self.keys.build(dim, sample).bytes_per_vector + self.values.build(dim, sample).bytes_per_vector

    def ring(self, layer_format: KVFormat, recent: int) -> int:
        """The exact recent tokens a layer in `layer_format` keeps beside its codes when this is the full layers'
        format and `recent` were asked for: none where its format is exact, nor where it is a sliding format of its
        own that keeps none by default (fp16, int8: near-exact, so a ring beside them would be read for nothing),
        else `recent`."""
        if layer_format.exact or (layer_format != self and not layer_format.default_recent):
            return 0
        return recent

    def _layer(self, spec: ModelSpec, layer: int, context: int, recent: int, sliding: KVFormat | None,
               allocated: bool) -> tuple[KVFormat, int, int, int]:
        """Cache layer `layer` at `context` tokens: its format, its slots (a full layer's grow with the context; a
        sliding ring holds its window + ROLLBACK_TOKENS once `allocated`, as many of them as the context fills when
        read), its exact recent ring's slots and its head dim."""
        window = spec.window(spec.layer_types[layer])
        fmt = self if window is None else sliding or self
        slots = context if window is None else ring_slots(window) if allocated else min(context, ring_slots(window))
        return fmt, slots, ring_slots(self.ring(fmt, recent)), spec.head_dims[layer]

    @staticmethod
    def _bytes(spec: ModelSpec, fmt: KVFormat, slots: int, ring: int, dim: int) -> int:
        """Bytes of `slots` coded tokens and `ring` exact float32 ones (keys and values) of every KV head."""
        return spec.num_key_value_heads * (fmt.bytes_per_token(dim) * slots + 8 * dim * ring)

    def cache_bytes(self, spec: ModelSpec, context: int, recent: int = 0, sliding: KVFormat | None = None) -> int:
        """Bytes a full cache holds at `context` tokens: full layers grow with it, sliding rings (in `sliding`'s
        format, default this one) stop at their window, each cache layer's exact recent ring adds its `ring`
        float32 tokens; rings carry ROLLBACK_TOKENS slots more."""
        return sum(self._bytes(spec, *self._layer(spec, i, context, recent, sliding, allocated=True))
                   for i in spec.cache_layers())

    def attention_reads(self, spec: ModelSpec, context: int, recent: int = 0,
                        sliding: KVFormat | None = None) -> AttentionReads:
        """What one decode step's attention reads with `context` tokens cached, as KVCache.bytes_read counts it:
        every layer reads its source layer's used slots (a sliding ring at most its window + ROLLBACK_TOKENS) in that
        layer type's format, plus its exact recent ring (`ring`). Values are the keys' and values' elements read,
        whatever their encoding: attention's arithmetic grows with them (packed codes' faster), its memory traffic
        with the bytes."""
        read = values = packed = 0
        for source in spec.kv_sources:
            fmt, slots, ring, dim = self._layer(spec, source, context, recent, sliding, allocated=False)
            read += self._bytes(spec, fmt, slots, ring, dim)
            values += spec.num_key_value_heads * 2 * dim * (slots + ring)
            packed += spec.num_key_value_heads * dim * slots * (fmt.keys.packed + fmt.values.packed)
        return AttentionReads(read, values, packed)


def _tq(bits: float, keys: str) -> tuple[CodecSpec, CodecSpec]:
    """TurboQuant keys in `keys` style ("unbiased", "mse" or "prod"); values unbiased, or plain with plain keys."""
    values = CodecSpec("tq", bits, "mse", keys != "mse")
    return CodecSpec("tq", bits, "prod" if keys == "prod" else "mse", keys == "unbiased"), values


_TQ_BITS = (4, 3.5, 3, 2.5)
_FORMATS = [
    KVFormat("fp32", CodecSpec("fp32"), CodecSpec("fp32"), "exact (the parity reference)", 0),
    KVFormat("fp16", CodecSpec("fp16"), CodecSpec("fp16"), "half precision", 0),
    KVFormat("int8", CodecSpec("int8"), CodecSpec("int8"), "int8 per vector, float32 scale", 0),
    *(KVFormat(f"tq{b:g}", *_tq(b, "unbiased"), f"TurboQuant {b:g} bits, norm-corrected (unbiased) keys and values")
      for b in _TQ_BITS),
    *(KVFormat(f"tq{b:g}-mse", *_tq(b, "mse"), f"TurboQuant {b:g} bits, the paper's MSE codes") for b in _TQ_BITS),
    *(KVFormat(f"tq{b:g}-prod", *_tq(b, "prod"), f"TurboQuant {b:g} bits, the paper's inner-product keys (MSE + "
               "QJL residual)") for b in _TQ_BITS),
    KVFormat("qjl", CodecSpec("qjl", 2), CodecSpec("tq", 4, "mse", True),
             "QJL sign-bit keys (2 x head_dim bits), TurboQuant 4-bit values"),
]
KV_FORMATS: dict[str, KVFormat] = {f.name: f for f in _FORMATS}
DEFAULT_KV_FORMAT = "fp16"


def default_sliding_format(kv: str) -> str:
    """The sliding layers' format when none is asked for: fp16, or fp32 beside fp32 full layers (so that `kv="fp32"`
    is exact throughout).

    A ring holds at most a window of tokens (E2B: 6 MB in fp16, 12 MB in fp32), but every sliding layer reads its
    whole ring at every step (E2B: 28 of 35 layers, a ring 1.2 MB in fp32), from memory, since the layers' weights
    between two reads flush the caches. Read in place by the attention kernel, which widens fp16 as it goes, half
    the bytes made E2B int4 b128 at 2k 5-7% faster a step (3 processes, each alternating fp32 and fp16 rings:
    56.1 -> 53.2, 54.2 -> 50.6, 55.3 -> 51.0 ms). fp32 had been the default when numpy read the rings (BLAS took
    fp32 as it was and widened fp16 first).
    """
    return "fp32" if kv == "fp32" else "fp16"


def kv_format(name: str) -> KVFormat:
    try:
        return KV_FORMATS[name]
    except KeyError:
        raise EdgeRuntimeError(f"kv={name!r}: not a KV cache format; choose one of {', '.join(KV_FORMATS)}") from None
