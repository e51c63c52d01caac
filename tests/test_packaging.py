"""What the wheel installs: everything inside the project's own namespace, nothing generic at the top of
site-packages (a top-level `export` would shadow, or be shadowed by, any user module of that name)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import build_kernels

from edge_runtime.version import __version__

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_AS = {"edge_runtime": "edge_runtime", "export": "edge_runtime/export",
                "device_profiles": "edge_runtime/device_profiles"}


def test_the_wheel_installs_only_the_edge_runtime_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob(f"edge_runtime-{__version__}-*.whl")  # the version the build read
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"edge_runtime"}
    for folder, installed in INSTALLED_AS.items():
        sources = {p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.py")
                   if "__pycache__" not in p.parts}
        assert sources, folder
        missing = {s for s in sources if f"{installed}/{s}" not in names}
        assert not missing, f"{folder}: not in the wheel: {sorted(missing)}"
    assert "edge_runtime/device_profiles/pi5-8gb.toml" in names
    assert "edge_runtime/bundled/gemma4-tiny/model.safetensors" in names
    # the compiled kernels, one build per machine, and the sources whose SHA-256 the loaders check them by
    kernels = {f"edge_runtime/kernels/{kernel.built(machine).name}" for kernel in build_kernels.KERNEL_SOURCES
               for machine in kernel.machines}
    sources = {f"edge_runtime/kernels/{kernel.source}" for kernel in build_kernels.KERNEL_SOURCES}
    assert kernels | sources <= names, sorted((kernels | sources) - names)
