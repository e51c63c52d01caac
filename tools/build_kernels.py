"""Build the attention kernel (edge_runtime/kernels/attention.c) for every machine the runtime ships it for.

    python tools/build_kernels.py            # rebuild edge_runtime/kernels/attention-*.so
    python tools/build_kernels.py --check    # exit 1 if a built file is missing or stale (was built from other source)

The wheel is pure Python and goes to Pis and phones that have no compiler, so the built objects are part of the
package, one per machine: x86_64 (baseline SSE2), x86_64-v3 (AVX2, FMA, F16C), x86_64-v4 (AVX-512 F/BW/CD/DQ/VL;
each x86 build picked at run time when the CPU has what it needs: attention_kernel.X86_BUILDS) and aarch64 (Armv8-A
NEON: every Pi from the 3 on, every 64-bit phone). Each is built from the same source,
links against nothing (not even libc: it loads under glibc, musl and Android's bionic alike), and carries the
SHA-256 of the source it was built from, which the loader checks. Needs gcc and Debian's gcc-aarch64-linux-gnu
(`apt-get install gcc-aarch64-linux-gnu`; binutils' objdump checks that each object still prefetches); the build is
reproducible (no build id, fixed paths).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "edge_runtime" / "kernels"
SOURCE = KERNELS / "attention.c"
TARGETS = {  # file suffix -> (compiler, machine flags)
    "x86_64": ("gcc", ["-march=x86-64", "-mtune=generic"]),
    "x86_64-v3": ("gcc", ["-march=x86-64-v3", "-mtune=generic"]),
    "x86_64-v4": ("gcc", ["-march=x86-64-v4", "-mtune=generic"]),
    "aarch64": ("aarch64-linux-gnu-gcc", ["-march=armv8-a", "-mtune=generic"]),
}
PREFETCH = ("prefetcht1", "prfm\tpldl2keep")  # how x86 and aarch64 disassemble `__builtin_prefetch(p, 0, 2)`
FLAGS = [
    "-std=c11", "-O3", "-shared", "-fPIC", "-nostdlib", "-fno-stack-protector", "-fvisibility=hidden",
    # fast math for vectorized, reassociated sums; but masked scores are -inf, so infinities stay honoured
    "-ffast-math", "-fno-finite-math-only",
    "-fno-tree-loop-distribute-patterns",  # no loop turned into a memset/memcpy call
    # -Wno-psabi: 8-float vectors pass between static inline functions only, so no calling convention is crossed
    "-Wall", "-Wextra", "-Werror", "-Wno-psabi", "-s", "-Wl,--build-id=none", "-Wl,-z,noexecstack", f"-ffile-prefix-map={ROOT}=.",
]


def source_sha256() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def built(suffix: str) -> Path:
    return KERNELS / f"attention-{suffix}.so"


def build(suffix: str) -> Path:
    compiler, machine = TARGETS[suffix]
    if shutil.which(compiler) is None:
        raise SystemExit(f"error: {compiler} is not installed; apt-get install {'gcc' if compiler == 'gcc' else 'gcc-aarch64-linux-gnu'}")
    out = built(suffix)
    tmp = out.with_name(out.name + ".partial")
    subprocess.run([compiler, *FLAGS, *machine, f'-DSOURCE_SHA256="{source_sha256()}"', str(SOURCE), "-o", str(tmp)],
                   check=True, cwd=ROOT)
    nm = compiler.replace("gcc", "nm")
    undefined = subprocess.run([nm, "-D", "--undefined-only", str(tmp)], capture_output=True, text=True,
                               check=True).stdout.split()
    if undefined:
        tmp.unlink()
        raise SystemExit(f"error: {out.name} needs {undefined}; the kernel must link against nothing")
    objdump = compiler.replace("gcc", "objdump")
    code = subprocess.run([objdump, "-d", str(tmp)], capture_output=True, text=True, check=True).stdout
    if not any(f"\t{mnemonic}" in code for mnemonic in PREFETCH):
        tmp.unlink()
        raise SystemExit(f"error: {out.name} has no prefetch instruction; the compiler dropped the kernel's "
                         "prefetches (see `ask` in attention.c), which cost it a third of its speed from DRAM")
    tmp.replace(out)
    return out


def stale() -> list[str]:
    """Built files missing, or built from another source than attention.c's."""
    marker = source_sha256().encode()
    return [built(s).name for s in TARGETS if not built(s).is_file() or marker not in built(s).read_bytes()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale or missing builds instead of building")
    args = parser.parse_args()
    if args.check:
        missing = stale()
        for name in missing:
            print(f"{name}: missing or not built from the current attention.c; run python tools/build_kernels.py")
        return 1 if missing else 0
    for suffix in TARGETS:
        out = build(suffix)
        print(f"built {out.relative_to(ROOT)} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
