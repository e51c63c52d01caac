"""tools/kv_step_compare.py: KV formats of one artifact alternated in one process, each round's step and attention
time per format, and who was fastest."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "kv_step_compare.py"


def test_the_formats_take_turns_and_every_round_has_one_fastest(artifacts):
    out = subprocess.run([sys.executable, str(TOOL), "-m", str(artifacts["shared-gqa"]), "--depth", "200", "--kv",
                          "fp16", "tq3.5", "--rounds", "2", "--steps", "2", "-t", "1"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    rounds = re.findall(r"^round (\d) (\S+) +step +([\d.]+) ms  attention +([\d.]+) ms/step$", out, re.MULTILINE)
    assert [(r, kv) for r, kv, _, _ in rounds] == [("0", "fp16"), ("0", "tq3.5"), ("1", "fp16"), ("1", "tq3.5")]
    assert all(float(step) > float(attention) > 0 for _, _, step, attention in rounds)
    wins = re.findall(r"^(\S+) +median step [\d.]+ ms, attention [\d.]+ ms/step \(range [\d.-]+\), fastest attention "
                      r"in (\d) of 2 rounds$", out, re.MULTILINE)
    assert [kv for kv, _ in wins] == ["fp16", "tq3.5"] and sum(int(n) for _, n in wins) == 2
    assert "depth 200; attention kernel " in out
