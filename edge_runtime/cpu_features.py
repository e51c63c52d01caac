"""Which CPUs have the int8 dot products MLAS's 8-bit MatMulNBits kernels need (weight_formats.Int8Block), for this
machine (its /proc/cpuinfo) and for a device profile (its `features`), one fact for both."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from functools import cache
from pathlib import Path

# Per architecture, the feature as profiles name it and as /proc/cpuinfo does: Arm's dotprod (Pi 5, phones; the Pi 4's
# Cortex-A72 lacks it, and i8mm cores have it too), x86's AVX2.
_INT8_DOT_PRODUCT = {"aarch64": ("dotprod", "asimddp"), "x86_64": ("avx2", "avx2")}
_ARCH = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64"}


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature names (`avx2`, `asimddp`, ...) from /proc/cpuinfo's `flags` (x86) or `Features` (Arm)
    line; empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def int8_dot_product(arch: str, features: Iterable[str]) -> bool:
    """Whether a CPU of `arch` with `features` (a profile's names or /proc/cpuinfo's) has the kernels."""
    names = _INT8_DOT_PRODUCT.get(_ARCH.get(arch.lower(), arch))
    return names is not None and not set(names).isdisjoint(features)


def has_int8_dot_product() -> bool:
    """Whether this machine has them."""
    return int8_dot_product(platform.machine(), cpu_flags())
