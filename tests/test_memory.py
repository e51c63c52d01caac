"""Where the long-lived buffers live and what freed memory does (edge_runtime.memory): resident bytes measured in
fresh processes, whose heaps start from a known state."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edge_runtime import huge_pages
from edge_runtime.memory import zeros_in_own_mapping

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or huge_pages.glibc_version() is None,
                                reason="glibc's heap behaviour on Linux")

# A fresh process: glibc's mmap threshold is raised by freeing a 30 MiB block (as onnxruntime's first prefill scratch
# does), 64 MiB of 8 MiB buffers are made and written, a small block is taken above them (so they are not at the
# heap's top, which glibc trims by itself), the buffers are freed; it prints the resident MiB that freeing returned.
_HELD_AFTER_FREE = """
import numpy as np
from edge_runtime.memory import current_rss_bytes, give_back_freed_heap, zeros_in_own_mapping
big = np.ones(30 << 20, np.uint8)
del big
buffers = [{make}((8 << 20,), np.uint8) for _ in range(8)]
for buffer in buffers:
    buffer[:] = 1
above = np.ones(1 << 17, np.uint8)
before = current_rss_bytes()
del buffers, buffer
{after_free}
print((before - current_rss_bytes()) / 2**20)
"""


def _returned_mib(make: str, after_free: str = "") -> float:
    script = _HELD_AFTER_FREE.format(make=make, after_free=after_free)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def test_an_array_in_its_own_mapping_is_zeroed_writable_and_shaped():
    for shape, dtype in (((4, 3), np.float16), ((1024, 64), np.float32), ((300, 257), np.uint8)):
        array = zeros_in_own_mapping(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and not array.any()
        array[-1, -1] = 7
        assert array[-1, -1] == 7 and array.sum() == 7


@glibc_only
def test_freed_buffers_in_their_own_mappings_go_back_to_the_os_where_heap_ones_stay():
    assert _returned_mib("np.zeros") < 8  # the heap keeps them: what the KV stores did before
    assert _returned_mib("zeros_in_own_mapping") > 60


@glibc_only
def test_giving_back_the_freed_heap_returns_its_pages():
    assert _returned_mib("np.zeros", "give_back_freed_heap()") > 60


@pytest.mark.skipif(huge_pages.thp_mode() not in ("always", "madvise"), reason="the kernel offers no huge pages")
def test_an_own_mapping_asks_for_huge_pages_where_malloc_was_told_to(monkeypatch):
    def eligible(array: np.ndarray) -> bool:
        address = array.ctypes.data
        inside = False
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if not fields[0].endswith(":"):
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    inside = low <= address < high
                elif inside and fields[0] == "THPeligible:":
                    return fields[1] == "1"
        raise AssertionError("the array's mapping is not in smaps")

    monkeypatch.setenv("GLIBC_TUNABLES", huge_pages.SETTING)
    assert eligible(zeros_in_own_mapping((8 << 20,), np.uint8))
    if huge_pages.thp_mode() == "madvise":
        monkeypatch.delenv("GLIBC_TUNABLES")
        assert not eligible(zeros_in_own_mapping((8 << 20,), np.uint8))
