"""tools/slot_overhead.py runs its chains (slots as nodes, inside the product, none; inputs fed and bound) and prints
a figure for each; the fused and the node chains compute the same output."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import slot_overhead

from edge_runtime.weight_formats import Int4


def test_the_chains_agree_and_the_tool_prints_each_figure():
    rng = np.random.default_rng(1)
    parts = Int4(128).encode(rng.standard_normal((64, 64)).astype(np.float32) * 0.1)
    feeds = {"x": rng.standard_normal((1, 64)).astype(np.float32), "a": rng.integers(-9, 9, (4, 64), dtype=np.int8),
             "b": rng.integers(-9, 9, (4, 64), dtype=np.int8), "s": np.full(4, 1e-3, np.float32)}
    fused, nodes = (slot_overhead._session(parts, 64, 3, kind)[0].run(None, feeds)[0] for kind in ("fused", "nodes"))
    plain = slot_overhead._session(parts, 64, 3, "none")[0].run(None, {"x": feeds["x"]})[0]
    assert np.array_equal(fused, nodes) and not np.allclose(fused, plain)
    out = subprocess.run([sys.executable, str(Path(slot_overhead.__file__)), "--chain", "4", "--width", "64",
                          "--repeats", "1"], capture_output=True, text=True, check=True, timeout=120).stdout
    assert [m[0] for m in re.findall(r"  ((none|nodes|fused), rank \d+) +[\d.]+ ms a run", out)] == [
        "none, rank 0", "nodes, rank 0", "nodes, rank 16", "fused, rank 0", "fused, rank 16"]
    assert re.search(r"13 inputs fed to run [\d.]+ ms, bound once [\d.]+ ms, 4 fed [\d.]+ ms: -?[\d.]+ us a fed input",
                     out), out
