"""`edge-runtime bench` on the bundled model, and the memory readings it reports."""

from __future__ import annotations

import json
import mmap
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from edge_runtime import load, memory
from edge_runtime.artifact import read_manifest
from edge_runtime.bench import format_report
from edge_runtime.errors import ContextLengthError
from edge_runtime.model_spec import FULL

TINY = ("-p", "8", "-n", "4", "-r", "2", "--probe-mb", "64")
KEYS = {"model", "model_bytes", "formats", "threads", "context", "depths", "repetitions", "low_memory", "load_seconds",
        "ttft_test", "ttft_ms", "tests", "peak_rss_bytes", "current_rss_bytes", "ple_resident_bytes", "weights_resident_bytes",
        "bandwidth_gb_s", "probe_bytes", "bytes_per_token", "read_per_token", "kv_cache_bytes", "adapter", "huge_pages",
        "depth_filled"}


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def bench_json(bundled):
    path, env = bundled
    result = cli("bench", *TINY, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return path, json.loads(result.stdout)


def test_bench_json_has_every_figure_for_the_default_model(bench_json):
    path, data = bench_json
    assert set(data) == KEYS
    assert data["model"] == str(path)
    # weights.bin may have no mapped pages left: onnxruntime repacks and unmaps its weights, embedding rows are pread
    assert data["low_memory"] is False and data["adapter"] is None and data["depth_filled"] is False
    for key in KEYS - {"model", "formats", "tests", "ttft_test", "depths", "read_per_token", "weights_resident_bytes",
                       "low_memory", "adapter", "huge_pages", "depth_filled"}:
        assert data[key] > 0, key
    manifest = read_manifest(path)
    assert data["bytes_per_token"] == manifest.bytes_per_token and data["read_per_token"] == manifest.read_per_token
    assert data["model_bytes"] == sum(f["size"] for f in manifest.files.values())
    assert data["formats"] == {**manifest.formats, "kv": "fp16", "kv_recent": 0, "kv_sliding": "fp16"}
    assert data["probe_bytes"] == 64 << 20 and data["context"] == 8 and data["ttft_test"] == "pp8"
    assert data["peak_rss_bytes"] >= data["current_rss_bytes"]
    assert 0 < data["ple_resident_bytes"] <= (path / "ple.bin").stat().st_size
    assert 0 <= data["weights_resident_bytes"] <= (path / "weights.bin").stat().st_size
    pp, tg = data["tests"]
    assert data["depths"] == [0] and pp["depth"] == tg["depth"] == 0
    assert (pp["test"], pp["n_prompt"], pp["n_gen"]) == ("pp8", 8, 0)
    assert (tg["test"], tg["n_prompt"], tg["n_gen"], tg["share_of_depth_0"]) == ("tg4", 0, 4, 1.0)
    for test in (pp, tg):
        assert len(test["samples"]) == 2 and min(test["samples"]) > 0
        assert test["tokens_per_second"] == pytest.approx(statistics.median(test["samples"]))
        assert test["stdev"] == pytest.approx(statistics.stdev(test["samples"]))
    assert "ceiling_tokens_per_second" not in pp
    assert tg["kv_bytes_per_token"] > 0
    ceiling = data["bandwidth_gb_s"] * 1e9 / data["bytes_per_token"]
    assert tg["ceiling_tokens_per_second"] == pytest.approx(ceiling)
    assert tg["fraction_of_ceiling"] == pytest.approx(tg["tokens_per_second"] / ceiling)


def test_bench_table_names_the_tests_and_the_ceiling(bundled):
    path, _ = bundled
    result = cli("bench", "-m", str(path), "-p", "8", "-n", "4", "-r", "1", "-d", "3", "--probe-mb", "16")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # progress goes to stderr only when it is a terminal
    lines = result.stdout.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["model", "size", "weights", "ple", "kv",
                                                                    "threads", "test", "t/s"]
    assert any("| pp8 @ d3 " in line and " fp32 " in line for line in lines)
    assert any("| tg4 @ d3 " in line for line in lines)
    assert any(line.startswith("tg4 @ d3: ") and "of the ceiling" in line for line in lines)
    assert any(line.startswith("read bandwidth ") and "GB/s" in line for line in lines)


@pytest.mark.parametrize("args,message", [
    (("-p", "abc"), "error: -p/--n-prompt 'abc': expected a comma-separated list of positive token counts"),
    (("-p", "0,8"), "error: -p/--n-prompt '0,8': expected a comma-separated list of positive token counts"),
    (("-p", "0", "-n", "0"), "error: no tests: give prompt sizes (-p) or generation lengths (-n)"),
    (("-n", "4,-1"), "error: -n/--n-gen '4,-1': expected a comma-separated list of positive token counts"),
    (("-r", "0"), "error: repetitions=0: must be at least 1"),
    (("--kv", "fp8"), "error: kv='fp8': not a KV cache format; choose one of fp32, fp16, int8, tq4"),
    (("--kv-recent", "-2"), "error: kv_recent=-2: must be at least 0"),
    (("--fill",), "error: --fill fills the depth by repeating one prefilled chunk: give -d/--depth above 0"),
    (("-d", "0,0", "--fill"), "error: -d/--depth '0,0': expected a comma-separated list of different token counts of 0"),
    (("-d", "-5"), "error: -d/--depth '-5': expected a comma-separated list of different token counts of 0 or more"),
    (("-d", "2k"), "error: -d/--depth '2k': expected a comma-separated list of different token counts of 0 or more"),
])
def test_bad_options_fail_before_the_model_is_opened(args, message):
    result = cli("bench", "-m", "/nonexistent/model", *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)


@pytest.mark.parametrize("args,message", [
    (("-p", "600"), "error: the tests need 600 tokens of context (depth 0 + the longest test) but the model holds 512"),
    (("-p", "8", "-n", "4", "--context", "6"), "error: context=6: must be between the 8 tokens the tests need and"),
])
def test_tests_that_do_not_fit_the_context_are_refused(bundled, args, message):
    result = cli("bench", "-m", str(bundled[0]), *args)
    assert result.returncode == 1 and result.stderr.startswith(message)


def test_mapped_resident_bytes_counts_only_touched_pages_of_that_file(tmp_path):
    # The page cache may hold a freshly written file in large folios (up to 2 MiB) that a fault maps whole,
    # so one touched byte stands for at most a folio: the file is made much larger than that.
    size = 32 << 20
    mapped, other = tmp_path / "mapped.bin", tmp_path / "other.bin"
    mapped.write_bytes(b"\1" * size)
    other.write_bytes(b"\1" * size)
    with open(mapped, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        assert view[0] == 1
        touched_one = memory.mapped_resident_bytes(mapped)
        assert 0 < touched_one <= 2 << 20
        assert sum(view[i] for i in range(0, size, mmap.PAGESIZE)) == size // mmap.PAGESIZE
        assert memory.mapped_resident_bytes(mapped) == size
        assert memory.mapped_resident_bytes(other) == 0


def test_rss_readings_follow_an_allocation():
    before = memory.current_rss_bytes()
    block = np.ones(64 << 20, dtype=np.uint8)
    assert memory.current_rss_bytes() - before >= 60 << 20
    current = memory.current_rss_bytes()
    assert memory.peak_rss_bytes() >= current >= block.nbytes


def test_readings_are_none_without_proc(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_SMAPS", tmp_path / "missing")
    monkeypatch.setattr(memory, "_STATM", tmp_path / "missing")
    assert memory.mapped_resident_bytes(tmp_path) is None
    assert memory.current_rss_bytes() is None


def test_bench_reports_the_kv_format_it_ran(bundled):
    path, _ = bundled
    figures = {}
    for kv in ("fp16", "tq3.5"):
        result = cli("bench", "-m", str(path), "-p", "8", "-n", "2", "-r", "1", "-d", "40", "--probe-mb", "16",
                     "--kv", kv, "--kv-recent", "0", "--kv-sliding", kv, "--json")
        assert result.returncode == 0, result.stderr
        figures[kv] = json.loads(result.stdout)
        assert figures[kv]["formats"]["kv"] == kv
    fp16, tq = (figures[kv]["tests"][1]["kv_bytes_per_token"] for kv in ("fp16", "tq3.5"))
    assert 0 < tq < fp16 / 2
    assert 0 < figures["tq3.5"]["kv_cache_bytes"] < figures["fp16"]["kv_cache_bytes"]


def test_p0_skips_prompt_tests_so_depth_is_prefilled_once(bundled):
    path, _ = bundled
    result = cli("bench", "-m", str(path), "-p", "0", "-n", "3", "-r", "1", "-d", "20", "--probe-mb", "16", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [t["test"] for t in data["tests"]] == ["tg3 @ d20"]
    assert data["ttft_test"] is None and data["ttft_ms"] is None and data["context"] == 24


def test_each_test_runs_at_each_depth_its_repetitions_taking_turns(bundled):
    """`-d 0,20,40`: a test per size and depth, their runs alternating depth by depth (so the share of depth 0's
    speed compares runs made side by side), the share reported against the same size at depth 0."""
    from edge_runtime.bench import BenchConfig, run_bench

    path, _ = bundled
    turns = []
    config = BenchConfig(n_prompt=(8,), n_gen=(3,), repetitions=2, depths=(0, 20, 40), probe_mb=16, fill=True)
    data = run_bench(path, config, lambda name, done, total: turns.append((name, done)))
    runs = [turn for turn in turns if turn[0].startswith(("pp", "tg"))]
    assert runs == [(f"{kind} @ d{d}" if d else kind, r) for kind in ("pp8", "tg3") for r in (0, 1) for d in (0, 20, 40)]
    assert [(t["test"], t["depth"]) for t in data["tests"]] == [
        ("pp8", 0), ("pp8 @ d20", 20), ("pp8 @ d40", 40), ("tg3", 0), ("tg3 @ d20", 20), ("tg3 @ d40", 40)]
    assert data["depths"] == [0, 20, 40] and data["context"] == 48 and data["ttft_test"] == "pp8"
    tg = data["tests"][3:]
    assert all(len(t["samples"]) == 2 for t in data["tests"])
    assert 0 < tg[0]["kv_bytes_per_token"] < tg[1]["kv_bytes_per_token"] < tg[2]["kv_bytes_per_token"]
    for test in tg:
        assert test["share_of_depth_0"] == pytest.approx(test["tokens_per_second"] / tg[0]["tokens_per_second"])
    report = format_report(data).splitlines()
    assert "depths 20, 40: one prefilled chunk's keys and values repeated (--fill), not prefilled" in report
    share = f"{tg[2]['share_of_depth_0']:.0%} of depth 0's speed"
    assert any(line.startswith("tg3 @ d40: ") and line.endswith(share) for line in report)
    alone = run_bench(path, BenchConfig(n_prompt=(), n_gen=(2,), repetitions=1, depths=(20,), probe_mb=16))
    assert [(t["test"], t["share_of_depth_0"]) for t in alone["tests"]] == [("tg2 @ d20", None)]


def test_fill_writes_the_depth_a_prefill_would_leave(bundled):
    """--fill's cache holds what a prefill of the same depth holds: the same positions, in the same format, read the
    same bytes a step; and the steps after it run as they do after a prefill."""
    path, _ = bundled
    runs = {}
    for fill in ((), ("--fill",)):
        result = cli("bench", "-m", str(path), "-p", "16", "-n", "3", "-r", "1", "-d", "300", "--probe-mb", "16",
                     "--kv", "tq3.5", *fill, "--json")
        assert result.returncode == 0, result.stderr
        runs[bool(fill)] = json.loads(result.stdout)
    prefilled, filled = runs[False], runs[True]
    assert (prefilled["depth_filled"], filled["depth_filled"]) == (False, True)
    assert [t["test"] for t in filled["tests"]] == ["pp16 @ d300", "tg3 @ d300"]
    assert filled["tests"][1]["kv_bytes_per_token"] == prefilled["tests"][1]["kv_bytes_per_token"] > 0
    assert filled["kv_cache_bytes"] == prefilled["kv_cache_bytes"]
    assert all(t["tokens_per_second"] > 0 for t in filled["tests"])
    note = "depth 300: one prefilled chunk's keys and values repeated (--fill), not prefilled"
    assert note in format_report(filled).splitlines() and note not in format_report(prefilled)


def test_fill_cache_holds_what_a_prefill_of_that_depth_holds(artifacts):
    """Several KV heads and layers that share another's cache (shared-gqa), chunks of 32: every layer that stores
    its own is filled to the positions and bytes a prefill leaves, each chunk after the first holding the first
    chunk's codes, and decoding goes on from there."""
    filled = load(artifacts["shared-gqa"], context_length=200, prefill_chunk=32)
    prefilled = load(artifacts["shared-gqa"], context_length=200, prefill_chunk=32)
    filled.feed([5, 6, 7])
    filled.fill_cache(100, np.random.default_rng(0))
    prefilled.feed(np.random.default_rng(0).integers(4, prefilled.spec.input_vocab_size, 100))
    assert filled.context_used == prefilled.context_used == len(filled.engine.tokens) == 100
    assert filled.kv_cache_bytes == prefilled.kv_cache_bytes
    assert filled.kv_read_bytes == prefilled.kv_read_bytes
    spec, stores = filled.spec, filled.engine.cache.stores
    assert set(stores) == {layer for layer in range(spec.num_hidden_layers) if not spec.is_kv_shared(layer)}
    full = [layer for layer in stores if spec.layer_types[layer] == FULL]
    assert full
    for layer in full:
        for store in (*stores[layer].keys, *stores[layer].values):
            for codes in store.view(100).values():
                assert np.array_equal(codes[32:64], codes[:32]) and np.array_equal(codes[96:100], codes[:4])
                assert not np.array_equal(codes[:32], codes[1:33])
    assert np.isfinite(filled.feed([7])).all()
    assert filled.context_used == 101
    with pytest.raises(ContextLengthError, match="201 tokens but the context holds 200"):
        filled.fill_cache(201, np.random.default_rng(0))
