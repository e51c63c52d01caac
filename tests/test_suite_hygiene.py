"""The test suite itself leaves the user's files alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tests_never_write_into_the_users_cache(tmp_path):
    """A test that exports, loads and verifies, run by pytest with a fresh HOME and no cache variables set: nothing
    may appear under that HOME's ~/.cache (verified.json used to collect hundreds of pytest temp paths there)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_RUNTIME_CACHE", "XDG_CACHE_HOME")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_cli.py::test_run_seed_makes_sampling_reproducible"],
                            cwd=ROOT, env={**env, "HOME": str(home)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (home / ".cache" / "edge-runtime").exists()
