"""tools/step_profile.py: --fill leaves the cache as a prefill of that depth would (positions, sizes), and the
profile's figures come out of a filled cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import step_profile

import edge_runtime

TOOL = Path(__file__).resolve().parents[1] / "tools" / "step_profile.py"


def test_fill_holds_what_a_prefill_of_that_depth_holds(artifacts):
    filled = edge_runtime.load(artifacts["shared-gqa"], context_length=200)
    prefilled = edge_runtime.load(artifacts["shared-gqa"], context_length=200)
    step_profile.fill(filled, 100)
    step_profile.prefill(prefilled, 100)
    assert filled.context_used == prefilled.context_used == 100
    assert filled.kv_cache_bytes == prefilled.kv_cache_bytes
    assert filled.kv_read_bytes == prefilled.kv_read_bytes
    assert np.isfinite(filled.feed([7])).all()
    assert filled.context_used == 101


def test_the_tool_profiles_a_filled_cache(artifacts):
    out = subprocess.run([sys.executable, str(TOOL), "-m", str(artifacts["shared-gqa"]), "-d", "200", "--fill",
                          "--steps", "3", "-t", "1", "--json"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert (result["depth"], result["filled"], result["threads"]) == (200, True, 1)
    assert result["step_ms"] > 0
    assert set(result["split_ms"]) == {"onnxruntime", "attention", "glue"}
