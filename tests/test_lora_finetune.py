"""tools/train_tiny.py --lora-out at a tiny scale: the fine-tune of the bundled model runs end to end, and its held-out
perplexity through edge-runtime (the base exported; merged with --adapter; attached to --lora-slots) is what
transformers + PEFT give, before and after."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_tiny


def test_lora_finetune_measures_both_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the tool's exports go under tmp_path
    out = tmp_path / "lora"
    args = argparse.Namespace(lora_out=out, steps=3, batch_size=2, seq_len=32, lr=2e-3, weight_decay=0.0, seed=0,
                              threads=1, log_every=10, chat_share=0.25, lora_r=4, lora_targets="all-linear",
                              lora_weights="fp32")
    report = train_tiny.lora_finetune(args)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "heldout.txt").read_text() == train_tiny.lora_corpus()[1]
    ppl = report["heldout_ppl"]
    fp32 = ppl["edge_runtime"]["fp32"]
    print(f"transformers + PEFT: {ppl['before']} -> {ppl['after']}; edge-runtime fp32: {fp32}")
    assert ppl["after"] < ppl["before"] - 1  # three steps already move it
    assert fp32["base"] == pytest.approx(ppl["before"], rel=1e-5)
    assert fp32["slots_no_adapter"] == fp32["base"]
    assert fp32["merged"] == pytest.approx(ppl["after"], rel=1e-5)
    assert fp32["attached"] == pytest.approx(fp32["merged"], rel=1e-5)
