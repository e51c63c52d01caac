"""tools/grammar_bench.py runs on a model with Gemma 4's markers and reports what it promises (figures themselves are
never asserted: they come from the tool, with the CPU)."""

from __future__ import annotations

import json

import grammar_bench


def test_the_bench_reports_cost_and_validity(gemma4_artifact, capsys):
    assert grammar_bench.main([str(gemma4_artifact), "--replies", "2", "--max-tokens", "24", "--timing-tokens", "8",
                               "--timing-runs", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cpu"] and result["n_vocab"] == 512 and not result["skipped"]
    assert set(result["timing"]) == {"none", "json_schema", "tools"}
    assert result["timing"]["none"]["mask_ms_per_token"] == 0.0
    assert result["timing"]["tools"]["mask_ms_per_token"] > 0
    for kind in ("json_schema", "tools"):
        for mode in ("unconstrained", "constrained"):
            row = result["validity"][kind][mode]
            assert row["replies"] == 2 and row["validate"] <= row["parse"] <= 2
        constrained = result["validity"][kind]["constrained"]
        assert constrained["parse"] == constrained["validate"] == constrained["ended"]  # unless cut by max tokens
    assert result["auto_free_text_mask_ms_per_token"] > 0


def test_the_table_names_the_cpu(gemma4_artifact, capsys):
    assert grammar_bench.main([str(gemma4_artifact), "--replies", "0", "--timing-tokens", "4",
                               "--timing-runs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "SIMD flags: " in out and "tools " in out
