"""Build the compiled kernels (edge_runtime/kernels/*.c) for every machine the runtime ships them for.

    python tools/build_kernels.py            # rebuild edge_runtime/kernels/{attention,onnxruntime-ops}-*.so
    python tools/build_kernels.py --check    # exit 1 if a built file is missing or stale (was built from other source)

The wheel is pure Python and goes to Pis and phones that have no compiler, so the built objects are part of the
package, one per machine: x86_64 (baseline SSE2), x86_64-v3 (AVX2, FMA, F16C), x86_64-v4 (AVX-512 F/BW/CD/DQ/VL),
x86_64-v4-vnni (and AVX-512 VNNI), aarch64 (Armv8-A NEON: every Pi from the 3 on, every 64-bit phone) and
aarch64-dotprod (Armv8.2-A's dot products: Pi 5, phones), each picked at run time when the CPU has what it needs
(attention_kernel.X86_BUILDS, ARM_BUILDS); each kernel ships the builds it gains from (attention_kernel.
ATTENTION_BUILDS, onnxruntime_ops.BUILDS). Each is built from the same source,
links against nothing (not even libc: it loads under glibc, musl and Android's bionic alike), and carries the
SHA-256 of the source it was built from, which the loader checks. Needs gcc and Debian's gcc-aarch64-linux-gnu
(`apt-get install gcc-aarch64-linux-gnu`; binutils' objdump checks that each object still prefetches); the build is
reproducible (no build id, fixed paths).

Two sources: attention.c (attention over the KV cache's codes, called with ctypes) and onnxruntime_ops.c
(edge-runtime's onnxruntime operators, registered into sessions as a custom-op library; no baseline x86_64 build:
it converts half precision in hardware). The second is compiled against onnxruntime's C API header, which the Python
wheel does not ship: the build takes it from Debian's libonnxruntime-dev (`HEADER_PACKAGE`, checked by SHA-256),
downloaded once into build/.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edge_runtime.attention_kernel import ATTENTION_BUILDS
from edge_runtime.onnxruntime_ops import BUILDS as OPS_BUILDS

KERNELS = ROOT / "edge_runtime" / "kernels"
MACHINES = {  # file suffix -> (compiler, machine flags)
    "x86_64": ("gcc", ["-march=x86-64", "-mtune=generic"]),
    "x86_64-v3": ("gcc", ["-march=x86-64-v3", "-mtune=generic"]),
    "x86_64-v4": ("gcc", ["-march=x86-64-v4", "-mtune=generic"]),
    "x86_64-v4-vnni": ("gcc", ["-march=x86-64-v4", "-mavx512vnni", "-mtune=generic"]),
    "aarch64": ("aarch64-linux-gnu-gcc", ["-march=armv8-a", "-mtune=generic"]),
    "aarch64-dotprod": ("aarch64-linux-gnu-gcc", ["-march=armv8.2-a+dotprod", "-mtune=generic"]),
}
PREFETCH = ("prefetcht1", "prfm\tpldl2keep")  # how x86 and aarch64 disassemble `__builtin_prefetch(p, 0, 2)`
# onnxruntime_c_api.h of onnxruntime 1.21 (API version 21; onnxruntime_ops.c asks for 20, pyproject's oldest)
HEADER_PACKAGE = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
                  "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
HEADERS = ROOT / "build" / "onnxruntime-1.21-include"
FLAGS = [
    "-std=c11", "-O3", "-shared", "-fPIC", "-nostdlib", "-fno-stack-protector", "-fvisibility=hidden",
    # fast math for vectorized, reassociated sums; but masked scores are -inf, so infinities stay honoured
    "-ffast-math", "-fno-finite-math-only",
    "-fno-tree-loop-distribute-patterns",  # no loop turned into a memset/memcpy call
    # -Wno-psabi: 8-float vectors pass between static inline functions only, so no calling convention is crossed
    "-Wall", "-Wextra", "-Werror", "-Wno-psabi", "-s", "-Wl,--build-id=none", "-Wl,-z,noexecstack", f"-ffile-prefix-map={ROOT}=.",
]


@dataclass(frozen=True)
class Kernel:
    """One source and the objects built from it: `stem`-<machine>.so for each of `machines`."""

    source: str
    stem: str
    machines: tuple[str, ...]
    prefetches: bool  # the object must keep its prefetch instructions
    includes: tuple[Path, ...] = ()

    def sha256(self) -> str:
        return hashlib.sha256((KERNELS / self.source).read_bytes()).hexdigest()

    def built(self, machine: str) -> Path:
        return KERNELS / f"{self.stem}-{machine}.so"


ATTENTION = Kernel("attention.c", "attention", ATTENTION_BUILDS, prefetches=True)
ONNXRUNTIME_OPS = Kernel("onnxruntime_ops.c", "onnxruntime-ops", OPS_BUILDS, prefetches=False, includes=(HEADERS,))
KERNEL_SOURCES = (ATTENTION, ONNXRUNTIME_OPS)


def fetch_headers() -> None:
    """onnxruntime's C API header into HEADERS, from HEADER_PACKAGE (a .deb: an ar archive holding data.tar.xz)."""
    if (HEADERS / "onnxruntime_c_api.h").is_file():
        return
    url, sha256 = HEADER_PACKAGE
    with urllib.request.urlopen(url, timeout=120) as response:
        package = response.read()
    if hashlib.sha256(package).hexdigest() != sha256:
        raise SystemExit(f"error: {url} is not the package this build was written against (SHA-256 differs)")
    offset, data = 8, None  # after "!<arch>\n": 60-byte member headers, each member padded to an even length
    while offset < len(package):
        name, size = package[offset:offset + 16].decode().strip(), int(package[offset + 48:offset + 58])
        if name.startswith("data.tar"):
            data = package[offset + 60:offset + 60 + size]
        offset += 60 + size + size % 2
    if data is None:
        raise SystemExit(f"error: {url} holds no data.tar")
    tmp = HEADERS.with_name(HEADERS.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith("/onnxruntime_c_api.h"):
                (tmp / "onnxruntime_c_api.h").write_bytes(archive.extractfile(member).read())
    if not (tmp / "onnxruntime_c_api.h").is_file():
        raise SystemExit(f"error: {url} holds no onnxruntime_c_api.h")
    tmp.replace(HEADERS)


def build(kernel: Kernel, machine: str) -> Path:
    compiler, flags = MACHINES[machine]
    if shutil.which(compiler) is None:
        raise SystemExit(f"error: {compiler} is not installed; apt-get install {'gcc' if compiler == 'gcc' else 'gcc-aarch64-linux-gnu'}")
    out = kernel.built(machine)
    tmp = out.with_name(out.name + ".partial")
    includes = [f"-I{path.relative_to(ROOT)}" for path in kernel.includes]
    subprocess.run([compiler, *FLAGS, *flags, *includes, f'-DSOURCE_SHA256="{kernel.sha256()}"',
                    str(KERNELS / kernel.source), "-o", str(tmp)], check=True, cwd=ROOT)
    nm = compiler.replace("gcc", "nm")
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(tmp)], capture_output=True, text=True,
                               check=True).stdout.split()
    if undefined:
        tmp.unlink()
        raise SystemExit(f"error: {out.name} needs {undefined}; the kernel must link against nothing")
    objdump = compiler.replace("gcc", "objdump")
    code = subprocess.run([objdump, "-d", str(tmp)], capture_output=True, text=True, check=True).stdout
    if kernel.prefetches and not any(f"\t{mnemonic}" in code for mnemonic in PREFETCH):
        tmp.unlink()
        raise SystemExit(f"error: {out.name} has no prefetch instruction; the compiler dropped the kernel's "
                         "prefetches (see `ask` in attention.c), which cost it a third of its speed from DRAM")
    tmp.replace(out)
    return out


def stale() -> list[str]:
    """Built files missing, or built from another source than the one beside them."""
    missing = []
    for kernel in KERNEL_SOURCES:
        marker = kernel.sha256().encode()
        missing += [kernel.built(m).name for m in kernel.machines
                    if not kernel.built(m).is_file() or marker not in kernel.built(m).read_bytes()]
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale or missing builds instead of building")
    args = parser.parse_args()
    if args.check:
        missing = stale()
        for name in missing:
            print(f"{name}: missing or not built from the current source beside it; run python tools/build_kernels.py")
        return 1 if missing else 0
    fetch_headers()
    for kernel in KERNEL_SOURCES:
        for machine in kernel.machines:
            out = build(kernel, machine)
            print(f"built {out.relative_to(ROOT)} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
