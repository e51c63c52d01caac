"""The compiled attention kernel (edge_runtime/kernels/attention.c), loaded with ctypes, and the Python half of it.

For a decode step's few query rows numpy pays a call and a temporary per operation (widening codes a tile at a
time ran at 1-2.6 ns a value on one core, and at short contexts the calls cost more than the arithmetic); the
kernel walks a head's blocks once and reads every format's codes in place (see attention.c). It ships built for
x86_64 (baseline and x86-64-v3) and aarch64 inside the package (tools/build_kernels.py), links against nothing,
and is picked by this machine's architecture and CPU features; where none fits (or the file is stale), `load`
returns None and attention runs in numpy. A numba JIT of the same kernel was tried first: it needed 140 MB of
resident memory for LLVM (60 MB of it anonymous) and compiled for a minute on a Pi 4's first run.

ctypes releases the GIL for the call, so threads run shares of a long block at once; `merge` joins their partial
softmaxes with the usual log-sum-exp rescaling, as flash-decoding does.
"""

from __future__ import annotations

import ctypes
import hashlib
import platform
import threading
from functools import cache
from pathlib import Path

import numpy as np

from edge_runtime.quant.code_parts import CodePart

KERNELS = Path(__file__).parent / "kernels"
ROW_BLOCK = 8  # query rows the kernel holds in one vector (attention.c)


class _Part(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("stride", ctypes.c_int64), ("scale", ctypes.c_void_p),
                ("lookup", ctypes.c_void_p), ("coef", ctypes.c_float), ("kind", ctypes.c_int32),
                ("bits", ctypes.c_int32), ("width", ctypes.c_int32)]


class _Exact(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("positions", ctypes.c_void_p),
                ("n", ctypes.c_int64)]


class _Call(ctypes.Structure):
    _fields_ = [("queries", ctypes.POINTER(ctypes.c_void_p)), ("key_parts", ctypes.POINTER(_Part)),
                ("value_parts", ctypes.POINTER(_Part)), ("n_key_parts", ctypes.c_int32),
                ("n_value_parts", ctypes.c_int32), ("n_exact", ctypes.c_int32), ("_pad", ctypes.c_int32),
                ("coded_positions", ctypes.c_void_p), ("coded_n", ctypes.c_int64), ("query", ctypes.c_void_p),
                ("dim", ctypes.c_int64), ("rows", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("tokens", ctypes.c_int64), ("exact", ctypes.POINTER(_Exact)), ("bounds", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("scratch", ctypes.c_void_p)]


def _machine() -> list[str]:
    """The builds this machine can run, best first."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return ["aarch64"]
    if machine in ("x86_64", "amd64"):
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        return (["x86_64-v3"] if {"avx2", "fma", "f16c", "bmi2"} <= flags else []) + ["x86_64"]
    return []


class Kernel:
    """The loaded library, its limits, and a scratch buffer per thread."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._attend = library.edge_runtime_attend_head
        self._attend.argtypes = [ctypes.POINTER(_Call)]
        self._attend.restype = ctypes.c_int
        self.scratch_floats = ctypes.c_int64.in_dll(library, "edge_runtime_attention_scratch_floats").value
        self.max_width = ctypes.c_int64.in_dll(library, "edge_runtime_attention_max_width").value
        self.max_rows = ctypes.c_int64.in_dll(library, "edge_runtime_attention_max_rows").value
        self._local = threading.local()

    def scratch(self) -> np.ndarray:
        buffer = getattr(self._local, "scratch", None)
        if buffer is None:
            buffer = self._local.scratch = np.empty(self.scratch_floats, np.float32)
        return buffer

    def fits(self, rows: int, widths: list[int]) -> bool:
        return rows <= self.max_rows and all(w <= self.max_width for w in widths)

    def attend(self, call: _Call) -> None:
        if self._attend(ctypes.byref(call)) != 0:
            raise ValueError("attention kernel refused its arguments (a limit the caller should have checked)")


@cache
def load() -> Kernel | None:
    """The kernel built for this machine, or None (numpy runs attention then)."""
    source = hashlib.sha256((KERNELS / "attention.c").read_bytes()).hexdigest()
    for name in _machine():
        path = KERNELS / f"attention-{name}.so"
        if not path.is_file():
            continue
        library = ctypes.CDLL(str(path))
        if (ctypes.c_char * 65).in_dll(library, "edge_runtime_attention_source").value.decode() != source:
            continue  # built from another source than the one beside it: not to be trusted
        return Kernel(library, name)
    return None


def _pointer(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _part(part: CodePart) -> _Part:
    codes = part.codes if part.codes.flags.c_contiguous else np.ascontiguousarray(part.codes)
    return _Part(_pointer(codes), codes.strides[0] if len(codes) else 0,
                 None if part.scale is None else _pointer(np.ascontiguousarray(part.scale, np.float32)),
                 None if part.lookup is None else _pointer(part.lookup), part.coef, part.kind, part.bits, part.width)


class Partial:
    """One call's share of a head's softmax: running maximum, sum, and accumulators (per coded part, exact)."""

    def __init__(self, m: np.ndarray, s: np.ndarray, accs: list[np.ndarray], exact: np.ndarray,
                 parts: list[CodePart]) -> None:
        self.m, self.s, self.accs, self.exact, self.parts = m, s, accs, exact, parts

    def output(self, factor: np.ndarray) -> np.ndarray:
        """factor * (the accumulators taken back to the value's domain, summed)."""
        out = self.exact.copy()
        for acc, part in zip(self.accs, self.parts):
            out += acc if part.transform is None else acc @ part.transform.T
        return out * factor[:, None]


def _padded(width: int) -> int:
    return -(-width // 16) * 16


def _transposed(q: np.ndarray) -> np.ndarray:
    """Query rows [R, w] (R a multiple of 8) as the kernel reads them: [R / 8, P(w), 8], zeros past w."""
    rows, width = q.shape
    out = np.zeros((rows // ROW_BLOCK, _padded(width), ROW_BLOCK), np.float32)
    out[:, :width] = q.reshape(rows // ROW_BLOCK, ROW_BLOCK, width).transpose(0, 2, 1)
    return out


def attend_head_parts(kernel: Kernel, q: np.ndarray, key_parts: list[CodePart], value_parts: list[CodePart],
                      coded: tuple[np.ndarray, np.ndarray, np.ndarray], exact: list[tuple], groups: int) -> Partial:
    """One head's partial softmax for query rows q [R, dim] (row r is token r // groups).

    `coded` is (positions, lower, upper) of the rows the parts hold (no rows when the parts are empty); `exact` a
    list of (keys, values, positions, lower, upper) float32 blocks.
    """
    rows, dim = q.shape
    tokens = rows // groups
    padded_rows = -(-rows // ROW_BLOCK) * ROW_BLOCK  # padding rows' results are dropped
    q8 = np.zeros((padded_rows, dim), np.float32)
    q8[:rows] = q
    queries = [_transposed(q8 if p.transform is None else q8 @ p.transform) for p in key_parts]
    bounds = np.stack([np.stack(coded[1:]) if key_parts else np.zeros((2, tokens), np.int64),
                       *(np.stack(block[3:]) for block in exact)]).astype(np.int64)
    widths = [_padded(p.width) for p in value_parts] + [_padded(dim)]
    out = np.empty(padded_rows * (2 + sum(widths)), np.float32)
    keys = [np.ascontiguousarray(block[0], np.float32) for block in exact]
    values = [np.ascontiguousarray(block[1], np.float32) for block in exact]
    positions = [np.ascontiguousarray(block[2], np.int64) for block in exact]
    coded_positions = np.ascontiguousarray(coded[0], np.int64)
    query = _transposed(q8)
    call = _Call(
        queries=(ctypes.c_void_p * max(1, len(queries)))(*(_pointer(x) for x in queries)),
        key_parts=(_Part * max(1, len(key_parts)))(*(_part(p) for p in key_parts)),
        value_parts=(_Part * max(1, len(value_parts)))(*(_part(p) for p in value_parts)),
        n_key_parts=len(key_parts), n_value_parts=len(value_parts), n_exact=len(exact),
        coded_positions=_pointer(coded_positions), coded_n=len(coded_positions) if key_parts else 0,
        query=_pointer(query), dim=dim, rows=padded_rows, groups=groups, tokens=tokens,
        exact=(_Exact * max(1, len(exact)))(*(_Exact(_pointer(k), _pointer(v), _pointer(p), len(p))
                                               for k, v, p in zip(keys, values, positions))),
        bounds=_pointer(bounds), out=_pointer(out), scratch=_pointer(kernel.scratch()))
    kernel.attend(call)
    accs, start = [], 2 * padded_rows
    for width, real in zip(widths, [p.width for p in value_parts] + [dim]):
        accs.append(out[start:start + padded_rows * width].reshape(padded_rows, width)[:rows, :real])
        start += padded_rows * width
    return Partial(out[:rows], out[padded_rows:padded_rows + rows], accs[:-1], accs[-1], value_parts)


def merge(partials: list[Partial]) -> np.ndarray:
    """Join partial softmaxes into the attention output [R, dim] (log-sum-exp rescaling)."""
    if len(partials) == 1:
        (p,) = partials
        return p.output(1 / np.where(p.s > 0, p.s, 1))
    top = np.max([p.m for p in partials], axis=0)
    top = np.where(np.isfinite(top), top, 0.0).astype(np.float32)
    factors = [np.exp(p.m - top) for p in partials]
    total = sum(f * p.s for f, p in zip(factors, partials))
    total = np.where(total > 0, total, 1.0)
    return sum(p.output(f / total) for f, p in zip(factors, partials))
