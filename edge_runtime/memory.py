"""Memory readings of this process, from /proc and `resource`, without psutil; and the few allocation choices that
keep the readings low (buffers in their own mappings, freed heap handed back).

A model here is mostly memory-mapped files (weights.bin, ple.bin), so "how much RAM does it use" has three
answers: the peak and current resident set of the whole process, and the resident pages of one mapped file.
The last one is what tells whether the PLE store stays on flash (only the rows of tokens seen are resident)
and how much of weights.bin onnxruntime actually keeps mapped. Every function returns None where the
platform does not expose the figure (e.g. /proc on macOS), so callers can report "n/a" instead of failing.
"""

from __future__ import annotations

import functools
import mmap
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from edge_runtime import huge_pages

_SMAPS = Path("/proc/self/smaps")
_STATM = Path("/proc/self/statm")


def peak_rss_bytes() -> int | None:
    """Highest resident set size of this process so far (ru_maxrss: KiB on Linux/Android, bytes on macOS).

    Never below `current_rss_bytes()`: Linux computes the high-water mark from approximate per-CPU counters
    while /proc/self/statm sums them exactly, so the mark can trail the current figure by a few hundred KiB.
    """
    try:
        import resource
    except ImportError:  # Windows has no `resource`
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = int(peak) if sys.platform == "darwin" else int(peak) * 1024
    return max(peak, current_rss_bytes() or 0)


def current_rss_bytes() -> int | None:
    """Resident set size now: the second field of /proc/self/statm, in pages."""
    try:
        resident_pages = int(_STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def mapped_resident_bytes(path: str | Path) -> int | None:
    """Resident bytes of every mapping of the file `path` in this process (0 when it is not mapped).

    Sums the `Rss:` lines of /proc/self/smaps under each mapping whose path is the file's resolved path.
    Mappings are matched by path rather than by device and inode because on overlay file systems (containers)
    smaps shows the underlying device, not the one `os.stat` reports.
    """
    target = os.path.realpath(path)
    try:
        text = _SMAPS.read_text()
    except OSError:
        return None
    total = 0
    matching = False
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping header: range perms offset dev inode [path]
            matching = len(fields) == 6 and fields[5] == target
        elif matching and fields[0] == "Rss:":
            total += int(fields[1]) * 1024  # smaps reports kB
    return total


_OWN_MAPPING_BYTES = 64 << 10  # smaller arrays come from the heap: a mapping each would waste most of a page


def zeros_in_own_mapping(shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
    """A zeroed array in an anonymous mapping of its own (from 64 KiB up), for long-lived buffers that are replaced
    whole, such as the KV cache's stores.

    From the heap, such a buffer's pages stay resident after it is freed once glibc has raised its mmap threshold
    (it does so to the largest block freed, up to 32 MiB), and the heap fragments as stores grow: measured on E2B
    int8 with a 32k fp16 cache, a second fill after a reset peaked 0.35 GiB above the first. A mapping of its own
    is returned to the OS when the array is freed, and its pages are faulted in only as slots are written.

    In a process that has malloc back its large blocks with huge pages (edge_runtime.huge_pages), the mapping asks
    for them too, as malloc would have: attention streams the whole store every step.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    private = getattr(mmap, "MAP_PRIVATE", None)
    if nbytes < _OWN_MAPPING_BYTES or private is None:  # Windows' mmap takes no flags
        return np.zeros(shape, dtype)
    mapping = mmap.mmap(-1, nbytes, flags=private | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE") and huge_pages.has_tunable(os.environ):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mapping, dtype=dtype).reshape(shape)


def give_back_freed_heap() -> bool:
    """Return the heap's free pages to the OS (glibc's malloc_trim); whether it could be asked.

    onnxruntime's sessions run without an arena, so a prefill chunk's scratch (hundreds of MB for an int8 model's
    256-token chunk) is malloc'd and freed, and glibc, its mmap threshold raised by the first large free, serves
    it from the heap and keeps the freed pages resident: measured on E2B int8, 0.5 GiB held after a chunk,
    for nothing. Called once a prompt's prefill is done (10-25 ms, against seconds of prefill), never per decode
    step.
    """
    trim = _glibc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _glibc_function(name: str) -> Callable[..., int] | None:
    """glibc's function `name`, or None under another C library (musl, bionic, macOS) or without it."""
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_M_MMAP_THRESHOLD = -3
_LOW_MEMORY_MMAP_THRESHOLD = 64 << 10


def return_freed_memory_to_os() -> bool:
    """Make glibc serve allocations over 64 KiB with their own mappings, so freeing them returns the memory.

    Without it, glibc keeps freed prefill scratch (attention scores, MLP activations) in its heap, and raises
    its mmap threshold to the largest block freed, so later scratch stays there too: measured on E2B int4 after
    a 512-token prefill, 1.60 GB resident instead of 1.47 GB, and 1.65 GB peak instead of 1.53 GB. The price
    is a fresh mapping, page-faulted in, for every large buffer: prefill about 15% slower, decode unchanged.
    Process-wide and glibc only; returns whether it took effect.
    """
    mallopt = _glibc_function("mallopt")
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, _LOW_MEMORY_MMAP_THRESHOLD))
