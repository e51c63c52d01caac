"""Weights in huge pages: the command line starts its model-loading commands with glibc's malloc backing large
blocks with transparent huge pages.

A decode step streams every weight once (E2B int4: 1.1 GiB a token). onnxruntime keeps the weights it has
repacked in blocks from malloc, in 4 KiB pages: a token then walks ~280,000 pages, far past what the TLB holds, and
each layer's matrices miss it page after page. With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks the kernel
for transparent huge pages (madvise MADV_HUGEPAGE) on every block of at least a huge page, and the same weights sit
in 2 MiB pages. E2B int4 b128 at depth 16, 2 threads, 10 pairs of fresh processes: 46.8 ms a step without, 39.5
with, faster in every pair; the other formats 2-5% (README, "Huge pages"); peak RSS 1396 and 1402 MiB.

The tunable is read once, when the process starts, so only a process that is started with it has it: the CLI
starts itself again with it (`relaunch`) before it loads a model, where the kernel offers transparent huge pages
and the C library is glibc 2.35 or later. A program using the SDK sets it itself (`GLIBC_TUNABLES=
glibc.malloc.hugetlb=1 python app.py`); `status` says whether this process has it. EDGE_RUNTIME_HUGE_PAGES=0
turns the relaunch off. Other C libraries (musl, Android's bionic) have no such tunable: nothing changes there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "EDGE_RUNTIME_HUGE_PAGES"
# Set in the relaunched process's environment: it never starts again, even where the loader dropped the tunable (a
# setuid or file-capability interpreter, e.g. one allowed to bind port 80, runs in glibc's secure mode, which ignores
# GLIBC_TUNABLES' unsafe settings and may drop the variable).
RELAUNCHED = "EDGE_RUNTIME_HUGE_PAGES_RELAUNCHED"
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
FIRST_GLIBC = (2, 35)  # the first glibc with the tunable (older ones ignore it)


def thp_mode(path: Path = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None where it has none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[") and word.endswith("]")]
    return chosen[0] if chosen else None


def glibc_version() -> tuple[int, ...] | None:
    """This process's glibc as (major, minor), or None under another C library."""
    try:
        name, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").split()
    except (ValueError, OSError, AttributeError):  # not glibc: no such name, or nothing; Windows has no confstr
        return None
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit()) if name == "glibc" else None


def tunable_setting(environ: Mapping[str, str]) -> str | None:
    """GLIBC_TUNABLES' last setting of glibc.malloc.hugetlb ("glibc.malloc.hugetlb=1"; glibc takes the last), or
    None where it sets none."""
    settings = [item for item in environ.get("GLIBC_TUNABLES", "").split(":") if item.split("=", 1)[0] == TUNABLE]
    return settings[-1] if settings else None


def has_tunable(environ: Mapping[str, str]) -> bool:
    """Whether GLIBC_TUNABLES sets glibc.malloc.hugetlb (to any value: 1 asks for transparent huge pages, 2 for
    reserved hugetlbfs pages; either is the user's choice to keep)."""
    return tunable_setting(environ) is not None


def why_not(environ: Mapping[str, str], mode: str | None, glibc: tuple[int, ...] | None) -> str | None:
    """Why a process started with `environ` here gets no huge pages for its weights from a relaunch (None: it
    would get them)."""
    if environ.get(OPT_OUT) == "0":
        return f"{OPT_OUT}=0"
    if mode in (None, "never"):
        return "the kernel offers no transparent huge pages" + (" (mode never)" if mode else "")
    if glibc is None:
        return "the C library is not glibc"
    if glibc < FIRST_GLIBC:
        return f"glibc {'.'.join(map(str, glibc))} has no {TUNABLE} (2.35 and later have)"
    return None


def launch_environment(environ: Mapping[str, str], mode: str | None, glibc: tuple[int, ...] | None
                       ) -> dict[str, str] | None:
    """The environment to start the CLI again with, or None where it should run on as it is: started with the
    tunable already (the relaunched process, or the user's own setting), or no huge pages to be had."""
    if RELAUNCHED in environ or has_tunable(environ) or why_not(environ, mode, glibc):
        return None
    tunables = environ.get("GLIBC_TUNABLES")
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{SETTING}" if tunables else SETTING, RELAUNCHED: "1"}


def relaunch() -> None:
    """Start this command again with the tunable (same interpreter, same arguments), where it would help; return
    only where it would not, or where the start failed (the command then runs on in 4 KiB pages)."""
    environment = launch_environment(os.environ, thp_mode(), glibc_version())
    if environment is None:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    except OSError:
        return


def status() -> str:
    """One line on whether this process's large blocks (onnxruntime's weights) are in huge pages."""
    mode = thp_mode()
    setting = tunable_setting(os.environ)
    if setting is not None:
        reason = why_not({}, mode, glibc_version())
        if setting == f"{TUNABLE}=0":
            reason = f"GLIBC_TUNABLES sets {setting}"
        return f"huge pages: off ({reason})" if reason else f"huge pages: on ({setting}, transparent huge pages {mode})"
    reason = why_not(os.environ, mode, glibc_version())
    return f"huge pages: off ({reason or f'started without GLIBC_TUNABLES={SETTING}'})"
