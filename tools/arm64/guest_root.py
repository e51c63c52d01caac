"""The emulated aarch64 machine: can this host run one, the cached Debian root, the kiosk's wheels, running in it.

The root is Debian bookworm for arm64 (Python 3.11, as on Raspberry Pi OS Bookworm), built once by debootstrap
from the host's own Debian mirror and cached outside the repository (ROOT_CACHE, or $EDGE_RUNTIME_ARM64_CACHE),
so a clean clone on this machine reuses it. Programs in it run through qemu-user's binfmt_misc handler (flag F: a
plain chroot works with no qemu binary inside). Each command runs in its own mount namespace with a
fresh /proc (onnxruntime 1.32 opens external weights through /proc/self/fd) and no /sys: without /sys,
onnxruntime's cpuinfo library fails to start (with /sys it parses the host's x86 /proc/cpuinfo and segfaults) and
onnxruntime falls back to the auxiliary vector (getauxval), which qemu fills from the emulated CPU model, so every
kernel choice is the emulated CPU's own. /proc/cpuinfo in the guest is still the host's: `profiles detect` is
checked with fake device roots (devices.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT_CACHE = Path(os.environ.get("EDGE_RUNTIME_ARM64_CACHE", "/var/cache/edge-runtime-arm64"))
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOST_PACKAGES = ("qemu-user-static", "binfmt-support", "debootstrap")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
KIOSK = "/opt/edge-runtime"  # where the README's kiosk section installs: wheels/ and venv/
# README "Offline kiosk": the platforms `pip download` is given for a Pi (64-bit Raspberry Pi OS, Python 3.11).
PIP_DOWNLOAD_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
# What the tests run in the guest need beyond the kiosk: pytest, and onnx for the operators' test graphs
# (tests/test_onnxruntime_ops.py); installed into the same venv, after the kiosk's install.
TEST_PACKAGES = ("pytest", "onnx")


class CannotRun(Exception):
    """This machine cannot run the check (one line saying why); not a failure of what is checked."""


def log(message: str) -> None:
    print(f"[arm64] {message}", file=sys.stderr, flush=True)


def _run(argv: list[str]) -> None:
    """Run a host command quietly; on failure, raise with the end of what it printed."""
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")


def ensure_host() -> None:
    """Root, binfmt_misc, qemu-user-static and debootstrap (installed with apt-get when missing), aarch64 enabled."""
    if os.geteuid() != 0:
        raise CannotRun("not root: building the aarch64 root (debootstrap, chroot) and binfmt_misc need root")
    if "binfmt_misc" not in Path("/proc/filesystems").read_text():
        raise CannotRun("this kernel has no binfmt_misc support: aarch64 programs cannot run under qemu-user here")
    missing = [tool for tool in ("qemu-aarch64-static", "debootstrap", "update-binfmts") if not shutil.which(tool)]
    if missing:
        if not shutil.which("apt-get"):
            raise CannotRun(f"{', '.join(missing)} missing and no apt-get to install {' '.join(HOST_PACKAGES)}")
        log(f"installing {' '.join(HOST_PACKAGES)} (apt-get)")
        install = ["apt-get", "install", "-y", "-q", *HOST_PACKAGES]
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if subprocess.run(install, **quiet).returncode and (
                subprocess.run(["apt-get", "update", "-q"], **quiet).returncode
                or subprocess.run(install, **quiet).returncode):
            raise CannotRun(f"could not install {' '.join(HOST_PACKAGES)} with apt-get")
    mount = ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)]
    if not (BINFMT / "register").exists() and subprocess.run(mount).returncode:
        raise CannotRun(f"cannot mount binfmt_misc on {BINFMT}")
    handler = BINFMT / "qemu-aarch64"
    if not handler.exists() or "enabled" not in handler.read_text():
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not handler.exists() or "enabled" not in handler.read_text():
        raise CannotRun("binfmt_misc has no enabled qemu-aarch64 handler (update-binfmts --enable qemu-aarch64 failed)")
    if not re.search(r"^flags:.*F", handler.read_text(), re.MULTILINE):
        raise CannotRun("the qemu-aarch64 binfmt handler lacks flag F, so it cannot run inside a chroot")


def host_mirror(apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror of the host's apt sources (deb822 or one-line), the one that serves bookworm."""
    texts = [p.read_text(errors="replace") for p in
             [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))] if p.is_file()]
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():
            found = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if found and found.group(2) == SUITE:
                return found.group(1)
    return DEFAULT_MIRROR


def ensure_root(cache: Path = ROOT_CACHE) -> Path:
    """The cached arm64 bookworm root, built with debootstrap when absent (~4 min, ~300 MB)."""
    root = cache / f"{SUITE}-arm64"
    if (root / ".complete").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{root.name}.partial-{os.getpid()}"
    mirror = host_mirror()
    log(f"building the arm64 {SUITE} root in {root} from {mirror} (debootstrap, once; ~4 min)")
    try:
        _run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv", SUITE,
              str(partial), mirror])
    except RuntimeError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / ".complete").write_text(f"{SUITE} arm64 from {mirror}\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def gather_wheels(repo: Path, root: Path) -> Path:
    """The kiosk's wheels, gathered on this host exactly as the README's "Offline kiosk" section says."""
    wheels = root / KIOSK.lstrip("/") / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for old in wheels.glob("edge_runtime-*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", str(repo), "-w", str(wheels)])
    (own,) = wheels.glob("edge_runtime-*.whl")
    platforms = [arg for p in PIP_DOWNLOAD_PLATFORMS for arg in ("--platform", p)]
    _run([*pip, "download", f"{own}[server]", "-d", str(wheels), "--only-binary=:all:", "--python-version", "3.11",
          *platforms])
    tests = root / KIOSK.lstrip("/") / "test-wheels"
    _run([*pip, "download", *TEST_PACKAGES, "-d", str(tests), "--only-binary=:all:", "--python-version", "3.11",
          *platforms])
    return wheels


def _wheels_key(wheels: Path) -> str:
    """What the venv was installed from (the kiosk's wheels and the tests'): wheel names, and the project wheel's
    member CRCs (its build is not byte-reproducible, its contents are)."""
    digest = hashlib.sha256()
    for wheel in sorted([*wheels.glob("*.whl"), *(wheels.parent / "test-wheels").glob("*.whl")]):
        digest.update(wheel.name.encode())
        if wheel.name.startswith("edge_runtime-"):
            with zipfile.ZipFile(wheel) as z:
                digest.update(repr(sorted((i.filename, i.CRC) for i in z.infolist())).encode())
    return digest.hexdigest()


def install_kiosk(root: Path, wheels: Path) -> None:
    """python3 -m venv + pip install --no-index --find-links, inside the root, as the README's kiosk does; kept
    while the wheels are the same."""
    venv, stamp = root / KIOSK.lstrip("/") / "venv", root / KIOSK.lstrip("/") / "venv.wheels"
    key = _wheels_key(wheels)
    if stamp.is_file() and stamp.read_text() == key and (venv / "bin" / "edge-runtime").exists():
        return
    log("installing the wheels into the root's venv (python3 -m venv; pip install --no-index --find-links)")
    shutil.rmtree(venv, ignore_errors=True)
    guest(root, "cortex-a72", ["python3", "-m", "venv", f"{KIOSK}/venv"], check=True)
    guest(root, "cortex-a72", [f"{KIOSK}/venv/bin/pip", "install", "-q", "--no-index", "--find-links",
                               f"{KIOSK}/wheels", "edge-runtime[server]"], check=True)
    guest(root, "cortex-a72", [f"{KIOSK}/venv/bin/pip", "install", "-q", "--no-index", "--find-links",
                               f"{KIOSK}/test-wheels", "--find-links", f"{KIOSK}/wheels", *TEST_PACKAGES], check=True)
    stamp.write_text(key)


def guest_argv(root: Path, qemu_cpu: str, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """A command line that runs `argv` in the root on the emulated CPU, with a clean environment."""
    variables = {"PATH": f"{KIOSK}/venv/bin:/usr/bin:/bin", "HOME": "/root", "QEMU_CPU": qemu_cpu,
                 "EDGE_RUNTIME_CACHE": "/tmp/edge-runtime-cache", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    # A private mount namespace (unshare execs chroot: the command keeps the caller's process, so SIGTERM reaches
    # it) whose /proc disappears with it; no PID namespace, where the command would be an init that ignores SIGTERM.
    return ["unshare", "--mount", f"--mount-proc={root}/proc",
            "chroot", str(root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in variables.items()), *argv]


def guest(root: Path, qemu_cpu: str, argv: list[str], check: bool = False, env: dict[str, str] | None = None,
          **kwargs) -> subprocess.CompletedProcess:
    """Run `argv` in the root (with these extra environment variables); with check=True a failure raises with the
    end of its stderr."""
    if not check:
        return subprocess.run(guest_argv(root, qemu_cpu, argv, env), **kwargs)
    done = subprocess.run(guest_argv(root, qemu_cpu, argv, env), capture_output=True, text=True, **kwargs)
    if done.returncode:
        tail = "\n".join(line for line in done.stderr.splitlines() if "cpuinfo" not in line)[-2000:]
        raise RuntimeError(f"{' '.join(argv)} failed on {qemu_cpu} (exit {done.returncode}):\n{tail}")
    return done
