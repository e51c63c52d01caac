"""tests/conftest.py's `artifacts` fixture for the tests the ARM64 check runs in the emulated root (installed there
as the tests' conftest.py). The root has what a kiosk installs, no exporter (onnx) and no transformers, so
tools/arm64/check exports tests/conftest.py's tiny random checkpoints on the host into ARTIFACTS beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="session")
def artifacts() -> dict[str, Path]:
    if not ARTIFACTS.is_dir():
        pytest.fail(f"no test artifacts in {ARTIFACTS}: tools/arm64/check exports them (not in --smoke)")
    return {path.name: path for path in sorted(ARTIFACTS.iterdir())}
