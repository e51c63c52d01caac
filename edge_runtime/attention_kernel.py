"""The compiled attention kernel (edge_runtime/kernels/attention.c), loaded with ctypes, and the Python half of it.

For a decode step's few query rows numpy pays a call and a temporary per operation (widening codes a tile at a
time ran at 1-2.6 ns a value on one core, and at short contexts the calls cost more than the arithmetic); the
kernel walks a head's blocks once and reads every format's codes in place (see attention.c). It ships built for
x86_64 (baseline, x86-64-v3, x86-64-v4 and x86-64-v4 with VNNI) and aarch64 (Armv8-A, and Armv8.2 with the dot
products) inside the package (tools/build_kernels.py): the two dot-product builds score integer keys with
vpdpbusd / sdot (edge_runtime.quant.integer_scores), the others with the same integers by slower instructions. It
links against nothing, and is picked by this machine's architecture and CPU features; where none fits (or the file is stale), `load`
returns None and attention runs in numpy. A numba JIT of the same kernel was tried first: it needed 140 MB of
resident memory for LLVM (60 MB of it anonymous) and compiled for a minute on a Pi 4's first run.

ctypes releases the GIL for the call, so threads run shares of a long block at once; `Merge` joins their partial
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

from edge_runtime.cpu_features import cpu_flags
from edge_runtime.quant.code_parts import PACKED, CodePart

KERNELS = Path(__file__).parent / "kernels"


class _Part(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("stride", ctypes.c_int64), ("scale", ctypes.c_void_p),
                ("lookup", ctypes.c_void_p), ("transform", ctypes.c_void_p), ("channels", ctypes.c_void_p),
                ("hadamard", ctypes.c_void_p), ("n_channels", ctypes.c_int64), ("coef", ctypes.c_float),
                ("kind", ctypes.c_int32), ("bits", ctypes.c_int32), ("width", ctypes.c_int32),
                ("rounds", ctypes.c_int32), ("levels", ctypes.c_void_p), ("step", ctypes.c_float)]


class _Exact(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("positions", ctypes.c_void_p),
                ("lower", ctypes.c_void_p), ("upper", ctypes.c_void_p), ("n", ctypes.c_int64)]


class _Call(ctypes.Structure):
    _fields_ = [("key_parts", ctypes.POINTER(_Part)), ("value_parts", ctypes.POINTER(_Part)),
                ("exact", ctypes.POINTER(_Exact)), ("coded_positions", ctypes.c_void_p),
                ("coded_lower", ctypes.c_void_p), ("coded_upper", ctypes.c_void_p), ("coded_n", ctypes.c_int64),
                ("query", ctypes.c_void_p), ("dim", ctypes.c_int64), ("rows", ctypes.c_int64),
                ("groups", ctypes.c_int64), ("tokens", ctypes.c_int64), ("n_key_parts", ctypes.c_int32),
                ("n_value_parts", ctypes.c_int32), ("n_exact", ctypes.c_int32), ("finish", ctypes.c_int32),
                ("out", ctypes.c_void_p), ("scratch", ctypes.c_void_p)]


# The builds of the compiled kernels, best first, and the CPU features each needs (tools/build_kernels.py's -march
# levels: x86-64-v4 is v3 plus AVX-512 F, BW, CD, DQ and VL; x86 features as /proc/cpuinfo names them, Arm's by their
# HWCAP bit). Each kernel ships the builds it gains from: ATTENTION_BUILDS, onnxruntime_ops.BUILDS.
_V3 = frozenset({"avx2", "fma", "f16c", "bmi2"})
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
X86_BUILDS = (("x86_64-v4-vnni", _V4 | {"avx512_vnni"}), ("x86_64-v4", _V4), ("x86_64-v3", _V3),
              ("x86_64", frozenset()))
ARM_BUILDS = (("aarch64-dotprod", frozenset({"asimddp"})), ("aarch64", frozenset()))
ATTENTION_BUILDS = ("x86_64-v4-vnni", "x86_64-v4", "x86_64-v3", "x86_64", "aarch64-dotprod", "aarch64")
_AT_HWCAP, _HWCAP_ASIMDDP = 16, 1 << 20  # getauxval(AT_HWCAP)'s dot product bit (Linux, arch/arm64's hwcap.h)


def arm_features() -> frozenset[str]:
    """This Arm CPU's features the builds need, from the kernel's auxiliary vector (/proc/self/auxv): what the
    kernel tells programs, on Linux and Android alike, and what qemu's user mode emulates for the CPU it is given
    (its /proc/cpuinfo is the host's)."""
    try:
        raw = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return cpu_flags()
    pairs = np.frombuffer(raw[:len(raw) // 16 * 16], dtype=np.uint64).reshape(-1, 2)
    hwcap = next((int(value) for key, value in pairs if key == _AT_HWCAP), 0)
    return frozenset({"asimddp"} if hwcap & _HWCAP_ASIMDDP else ())


def builds_for_this_machine(builds: tuple[str, ...]) -> list[str]:
    """Those of `builds` this machine can run, best first."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        table, have = ARM_BUILDS, arm_features()
    elif machine in ("x86_64", "amd64"):
        table, have = X86_BUILDS, cpu_flags()
    else:
        return []
    return [name for name, needs in table if name in builds and needs <= have]


class Kernel:
    """The loaded library, its limits, and a scratch buffer per thread."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._attend = library.edge_runtime_attend_head
        self._attend.argtypes = [ctypes.POINTER(_Call)]
        self._attend.restype = ctypes.c_int
        self.merge = library.edge_runtime_attention_merge
        self.merge.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.merge.restype = None
        self.scratch_floats = ctypes.c_int64.in_dll(library, "edge_runtime_attention_scratch_floats").value
        self.max_width = ctypes.c_int64.in_dll(library, "edge_runtime_attention_max_width").value
        self.max_rows = ctypes.c_int64.in_dll(library, "edge_runtime_attention_max_rows").value
        self._local = threading.local()

    def scratch(self) -> np.ndarray:
        buffer = getattr(self._local, "scratch", None)
        if buffer is None:
            buffer = self._local.scratch = np.empty(self.scratch_floats, np.float32)
            self._local.address = _pointer(buffer)
        return buffer

    def scratch_address(self) -> int:
        """The address of this thread's scratch (a call handed to a pool thread runs on that thread's)."""
        address = getattr(self._local, "address", None)
        if address is None:
            self.scratch()
            address = self._local.address
        return address

    def fits(self, rows: int, widths: list[int]) -> bool:
        return rows <= self.max_rows and all(w <= self.max_width for w in widths)

    def attend(self, call: _Call) -> None:
        if self._attend(ctypes.byref(call)) != 0:
            raise ValueError("attention kernel refused its arguments (a limit the caller should have checked)")


@cache
def load() -> Kernel | None:
    """The kernel built for this machine, or None (numpy runs attention then)."""
    for name in builds_for_this_machine(ATTENTION_BUILDS):
        kernel = load_build(name)
        if kernel is not None:
            return kernel
    return None


def load_build(name: str) -> Kernel | None:
    """One build (`attention-NAME.so`), or None if it is missing or was built from another source than the one
    beside it (not to be trusted). The tests load each build this machine can run through it, not only the best."""
    path = KERNELS / f"attention-{name}.so"
    if not path.is_file():
        return None
    library = ctypes.CDLL(str(path))
    source = hashlib.sha256((KERNELS / "attention.c").read_bytes()).hexdigest()
    if (ctypes.c_char * 65).in_dll(library, "edge_runtime_attention_source").value.decode() != source:
        return None
    return Kernel(library, name)


def _pointer(a: np.ndarray) -> int:
    """The address of a's first byte (a C-contiguous array); ctypes' own route for a writable buffer is 3x faster
    than numpy's, and a decode step takes ~500 of them."""
    if a.flags.writeable and a.size:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    return a.__array_interface__["data"][0]


def _contiguous(a: np.ndarray, dtype: type) -> np.ndarray:
    return a if a.dtype == dtype and a.flags.c_contiguous else np.ascontiguousarray(a, dtype)


def _part(part: CodePart, dim: int) -> _Part:
    """The kernel's view of a part. Its codes are read in place for as long as the call lives (HeadCall keeps calls
    across steps), so they must already be uint8 rows laid out one after another: a copy made here would be freed
    under the kernel's pointer."""
    codes = part.codes
    if codes.dtype != np.uint8 or not codes.flags.c_contiguous:
        raise ValueError(f"KV codes must be C-contiguous uint8 to be read in place, got {codes.dtype} "
                         f"with strides {codes.strides} (a codec's code_parts should give its stored arrays' views)")
    n_channels = dim if part.channels is None else len(part.channels)
    if part.hadamard is not None:  # the kernel's butterflies would run past the part's rows otherwise
        width = part.hadamard.shape[1]
        if width != part.width or n_channels != width or width & (width - 1):
            raise ValueError(f"a Hadamard-rotated part must be a power of two wide over as many channels, a sign "
                             f"row per round: width {part.width}, {n_channels} channels, signs {part.hadamard.shape}")
    levels = part.levels
    if levels is not None and (part.kind != PACKED or levels.dtype != np.int8 or levels.shape != (1 << part.bits,)
                               or not levels.flags.c_contiguous):
        raise ValueError(f"integer levels belong to a packed part, int8 [2**bits]: kind {part.kind}, bits "
                         f"{part.bits}, levels {levels.dtype} {levels.shape}")
    return _Part(_pointer(codes), codes.strides[0] if len(codes) else 0,
                 None if part.scale is None else _pointer(part.scale),
                 None if part.lookup is None else _pointer(part.lookup),
                 None if part.transform is None else _pointer(part.transform),
                 None if part.channels is None else _pointer(part.channels),
                 None if part.hadamard is None else _pointer(part.hadamard), n_channels, part.coef, part.kind,
                 part.bits, part.width, 0 if part.hadamard is None else len(part.hadamard),
                 None if levels is None else _pointer(levels), part.step)


class HeadCall:
    """One head's kernel call with its structures built: the ~14 addresses and three structure arrays cost a call
    ~20 us of Python, several times the kernel's own time at a short context, so a decode step builds them once and
    runs the call again while the arrays' addresses hold (attention.DecodeAttention), changing only the sizes.

    `coded` is (positions, lower, upper) of the rows the parts hold (no rows when the parts are empty); `exact` a
    list of (keys, values, positions, lower, upper) float32 blocks; `out` the result's buffer, [R, dim] float32 with
    `finish` (the caller knows no other share of the head is to be merged), else [R * (2 + dim)] for a Partial;
    `scratch` the kernel's working memory (Kernel.scratch_floats float32), by default the building thread's: a call
    run again later, perhaps from another thread, brings its own.
    """

    def __init__(self, kernel: Kernel, q: np.ndarray, key_parts: list[CodePart], value_parts: list[CodePart],
                 coded: tuple[np.ndarray, np.ndarray | None, np.ndarray | None], exact: list[tuple], groups: int,
                 finish: bool, out: np.ndarray, scratch: np.ndarray | None = None) -> None:
        rows, dim = q.shape
        q = _contiguous(q, np.float32)
        keep = [(_contiguous(k, np.float32), _contiguous(v, np.float32), _contiguous(pos, np.int64),
                 _contiguous(lo, np.int64), _contiguous(hi, np.int64)) for k, v, pos, lo, hi in exact]
        coded = tuple(None if a is None else _contiguous(a, np.int64) for a in coded)
        scratch = kernel.scratch() if scratch is None else scratch
        n_key, n_value, n_exact = len(key_parts), len(value_parts), len(exact)
        self.kernel = kernel
        self.call = _Call(
            key_parts=(_Part * max(1, n_key))(*(_part(p, dim) for p in key_parts)),
            value_parts=(_Part * max(1, n_value))(*(_part(p, dim) for p in value_parts)),
            exact=(_Exact * max(1, n_exact))(*(_Exact(*(_pointer(a) for a in block), len(block[2]))
                                              for block in keep)),
            coded_positions=_pointer(coded[0]), coded_lower=None if coded[1] is None else _pointer(coded[1]),
            coded_upper=None if coded[2] is None else _pointer(coded[2]), coded_n=len(coded[0]) if key_parts else 0,
            query=_pointer(q), dim=dim, rows=rows, groups=groups, tokens=-(-rows // groups), n_key_parts=n_key,
            n_value_parts=n_value, n_exact=n_exact, finish=finish, out=_pointer(out),
            scratch=_pointer(scratch))
        # The structures hold bare addresses: the arrays behind them live as long as the call does.
        self._arrays = (q, keep, coded, key_parts, value_parts, out, scratch)
        self.exact = self.call.exact

    def __call__(self) -> None:
        self.kernel.attend(self.call)

    def on_this_thread(self) -> None:
        """Run on the calling thread's scratch rather than the one the call was built with (a pool's thread)."""
        self.call.scratch = self.kernel.scratch_address()
        self.kernel.attend(self.call)


class Merge:
    """A split head's shares joined into its output by the kernel (edge_runtime_attention_merge), the arguments laid
    out once: `shares` the shares' `out` buffers (HeadCall without `finish`, [rows * (2 + dim)] each), `into` the
    head's output [rows, dim] float32."""

    def __init__(self, kernel: Kernel, shares: list[np.ndarray], into: np.ndarray) -> None:
        rows, dim = into.shape
        pointers = (ctypes.c_void_p * len(shares))(*(_pointer(share) for share in shares))
        self._merge = kernel.merge
        self._args = (ctypes.addressof(pointers), len(shares), rows, dim, _pointer(into))
        self._arrays = (pointers, shares, into)  # what the addresses point into lives as long as the call

    def __call__(self) -> None:
        self._merge(*self._args)


def attend_head_parts(kernel: Kernel, q: np.ndarray, key_parts: list[CodePart], value_parts: list[CodePart],
                      coded: tuple[np.ndarray, np.ndarray | None, np.ndarray | None], exact: list[tuple],
                      groups: int, finish: bool) -> np.ndarray:
    """One head's attention over these blocks (HeadCall's arguments) for query rows q [R, dim] (row r is token
    r // groups): the output [R, dim] with `finish`, else the share's partial softmax for Merge."""
    rows, dim = q.shape
    out = np.empty(rows * dim if finish else rows * (2 + dim), np.float32)
    HeadCall(kernel, q, key_parts, value_parts, coded, exact, groups, finish, out)()
    return out.reshape(rows, dim) if finish else out
