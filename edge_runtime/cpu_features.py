"""What this machine's CPU offers the kernels that onnxruntime's MLAS picks by feature, as the kernel reads them:
the `flags` (x86) or `Features` (ARM) line of /proc/cpuinfo."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature names (`avx2`, `asimddp`, ...); empty where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def has_int8_dot_product() -> bool:
    """Whether MLAS has int8 dot-product kernels here for 8-bit MatMulNBits (weight_formats.Int8Block): Arm's
    dotprod (`asimddp`: Pi 5, phones; the Pi 4's Cortex-A72 lacks it) or x86's AVX2."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "asimddp" in cpu_flags()
    if machine in ("x86_64", "amd64"):
        return "avx2" in cpu_flags()
    return False
