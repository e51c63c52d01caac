"""Models by name, as Ollama and mlx-lm users expect: `-m NAME` from the models directory, the bundled model
when no model is given, `edge-runtime list` / `list_models()`, and `load()` with a name or nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edge_runtime
from edge_runtime.errors import ArtifactError
from edge_runtime.model_store import list_models, resolve_model
from edge_runtime.profiles import load_profile

# A device far too small for any model: its budget is below the runtime's own overhead.
TINY_DEVICE = """name = "tiny-device"
title = "A device with 64 MB"
[memory]
total_mb = 64
app_share = 0.5
peak_gb_s = 3.2
[cpu]
arch = "aarch64"
cores = 1
threads = 1
features = ["neon"]
clock_ghz = 1.0
int8_macs_per_cycle = 4
[storage]
read_mb_s = 10
[defaults]
weights = "int4"
block_size = 128
ple = "int4"
kv = "tq3.5"
context = 256
"""


@pytest.fixture
def store(artifacts, bundled, tmp_path, monkeypatch) -> dict[str, Path]:
    """A models directory holding `tiny` (a copy of an artifact) beside the bundled model's cache; the process
    and the environment for subprocesses both point at them."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(artifacts["shared-gqa"], models / "tiny")
    monkeypatch.setenv("EDGE_RUNTIME_CACHE", bundled[1]["EDGE_RUNTIME_CACHE"])
    monkeypatch.setenv("EDGE_RUNTIME_MODELS", str(models))
    monkeypatch.chdir(tmp_path)
    return {"models": models, "tiny": models / "tiny", "bundled": bundled[0]}


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ), input=stdin)


def unknown(name: str, store: dict[str, Path]) -> str:
    return (f"{name}: no such artifact directory, and no model of that name in {store['models']} (known: tiny, "
            f"gemma4-tiny); put one there with `edge-runtime export CHECKPOINT_OR_REPO_ID --name NAME`, or see "
            "`edge-runtime list`")


def test_references_resolve_to_paths_names_and_the_bundled_model(store):
    assert resolve_model(None) == store["bundled"]
    assert resolve_model("gemma4-tiny") == store["bundled"]
    assert resolve_model("tiny") == store["tiny"]
    assert resolve_model(str(store["tiny"])) == store["tiny"]
    assert resolve_model("./missing") == Path("./missing")  # a path, reported by whoever opens it
    assert resolve_model(Path("tiny")) == Path("tiny")  # a Path is never a name
    with pytest.raises(ArtifactError) as caught:
        resolve_model("nope")
    assert str(caught.value) == unknown("nope", store)
    Path("tiny").mkdir()  # a path wins over a name
    assert resolve_model("tiny") == Path("tiny")


def test_load_takes_a_name_or_nothing(store, artifacts):
    default = edge_runtime.load()
    assert default.path == store["bundled"]
    named = edge_runtime.load("tiny")
    assert named.path == store["tiny"]
    direct = edge_runtime.load(artifacts["shared-gqa"])
    assert named.generate("the sea", max_new_tokens=6, temperature=0) == direct.generate("the sea", max_new_tokens=6,
                                                                                          temperature=0)
    with pytest.raises(ArtifactError) as caught:
        edge_runtime.load("nope")
    assert str(caught.value) == unknown("nope", store)


def test_commands_take_a_name_or_default_to_the_bundled_model(store, artifacts):
    run = cli("run", "-m", "tiny", "the sea", "-n", "6", "--temperature", "0", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["model"] == str(store["tiny"])
    expected = edge_runtime.load(artifacts["shared-gqa"]).generate("the sea", max_new_tokens=6, temperature=0)
    assert result["text"] == expected
    chat = cli("chat", "-m", "tiny", "-n", "4", stdin="hi\n/quit\n")
    assert chat.returncode == 0, chat.stderr
    assert json.loads(cli("info", "tiny", "--json").stdout)["artifact"] == str(store["tiny"])
    assert json.loads(cli("info", "--json").stdout)["artifact"] == str(store["bundled"])
    assert cli("verify").stdout == f"{store['bundled']}: every file matches its SHA-256 in the manifest\n"
    assert json.loads(cli("verify", "tiny", "--json").stdout) == {"artifact": str(store["tiny"]), "ok": True,
                                                                 "damaged": {}, "error": None}
    assert json.loads(cli("plan", "--json", "--profile", "pi4-4gb").stdout)["source"] == str(store["bundled"])
    assert json.loads(cli("plan", "-m", "tiny", "--json").stdout)["source"] == str(store["tiny"])
    bench = cli("bench", "-m", "tiny", "-p", "8", "-n", "0", "-r", "1", "--probe-mb", "1", "--json")
    assert json.loads(bench.stdout)["model"] == str(store["tiny"]), bench.stderr
    text = store["models"].parent / "text.txt"
    text.write_text("the sea and the river " * 8)
    perplexity = cli("perplexity", "-m", "tiny", "--text-file", str(text), "--json")
    assert json.loads(perplexity.stdout)["model"] == str(store["tiny"]), perplexity.stderr
    unit = cli("service", "-m", "tiny", "--profile", "pi4-4gb", "--user", "kiosk")
    assert unit.returncode == 0, unit.stderr
    assert f" serve -m {store['tiny']} " in unit.stdout


@pytest.mark.parametrize("command", [("run", "hi"), ("chat",), ("bench",), ("perplexity", "--text-file", "t.txt"),
                                     ("plan",), ("serve",), ("service", "--profile", "pi4-4gb")])
def test_an_unknown_name_is_one_line_listing_the_known_ones(store, command):
    Path("t.txt").write_text("text")
    result = cli(*command, "-m", "nope")
    assert result.returncode == 1
    assert result.stderr == f"error: {unknown('nope', store)}\n"


def test_list_shows_artifacts_skips_the_rest_and_names_the_damage(store):
    models = store["models"]
    (models / "notes").mkdir()  # not an artifact: skipped
    (models / ".big.partial-123").mkdir()  # an export in progress: skipped
    (models / ".big.partial-123" / "manifest.json").write_text("{}")
    (models / "readme.txt").write_text("not a directory")
    shutil.copytree(store["tiny"], models / "garbled")
    (models / "garbled" / "manifest.json").write_bytes(b"\xff\xfe not json")
    shutil.copytree(store["tiny"], models / "cut")
    (models / "cut" / "ple.bin").unlink()
    pi4 = load_profile("pi4-4gb")

    listed = list_models(pi4)
    assert [(m.name, m.bundled) for m in listed] == [("cut", False), ("garbled", False), ("tiny", False),
                                                     ("gemma4-tiny", True)]
    assert listed[0].damage == (f"{models / 'cut' / 'ple.bin'}: listed in the manifest but missing; the artifact is "
                                "incomplete")
    assert listed[1].damage.startswith(f"{models / 'garbled' / 'manifest.json'}: not valid JSON (")
    tiny = listed[2]
    assert tiny.size_bytes == sum(p.stat().st_size for p in store["tiny"].iterdir())
    assert tiny.plan.fits and tiny.plan.context == 256 and tiny.plan.profile == pi4

    table = cli("list", "--profile", "pi4-4gb")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["name", "weights", "PLE", "context", "size", "fits", "pi4-4gb", "path"]
    assert lines[1] == f"cut          damaged: {listed[0].damage}"
    assert lines[2].startswith(f"garbled      damaged: {models / 'garbled' / 'manifest.json'}: not valid JSON (")
    size = f"{tiny.size_bytes / 2**20:.1f} MiB"
    assert lines[3].split() == ["tiny", "fp32", "fp32", "256", *size.split(), "yes", "(context", "256)",
                                str(store["tiny"])]
    assert lines[4].split()[:4] == ["gemma4-tiny", "fp32", "fp32", "512"]
    assert lines[4].endswith(f"{store['bundled']} (bundled)") and len(lines) == 5

    device = store["models"].parent / "tiny-device.toml"
    device.write_text(TINY_DEVICE)
    data = json.loads(cli("list", "--json", "--profile", str(device)).stdout)
    assert [m["name"] for m in data] == ["cut", "garbled", "tiny", "gemma4-tiny"]
    assert data[0] == {"name": "cut", "path": str(models / "cut"), "bundled": False,
                       "size_bytes": sum(p.stat().st_size for p in (models / "cut").iterdir()),
                       "damaged": listed[0].damage}
    fit = data[2].pop("fit")
    assert data[2] == {"name": "tiny", "path": str(store["tiny"]), "bundled": False, "size_bytes": tiny.size_bytes,
                       "weights": "fp32", "block_size": None, "ple": "fp32", "context_length": 256}
    assert fit["profile"] == "tiny-device" and fit["fits"] is False and fit["context"] == 256
    assert fit["peak_bytes"] > fit["budget_bytes"] == 32 << 20
    over = f"{(fit['peak_bytes'] - fit['budget_bytes']) / 2**20:.1f} MiB"
    assert f"no: {over} over at context 256" in cli("list", "--profile", str(device)).stdout


def test_list_reads_no_file_beyond_manifests_and_sizes(store, monkeypatch):
    """Listing must stay fast with gigabyte artifacts: no SHA-256 of anything."""
    import edge_runtime.artifact

    def refuse(path, chunk=0):
        raise AssertionError(f"list hashed {path}")

    monkeypatch.setattr(edge_runtime.artifact, "sha256_file", refuse)
    assert [m.name for m in list_models(load_profile("pi4-4gb"))] == ["tiny", "gemma4-tiny"]


def test_an_empty_list_says_how_to_get_a_model(tmp_path):
    env = {**os.environ, "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")}
    env.pop("EDGE_RUNTIME_MODELS", None)
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "list"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"no models in {tmp_path / 'cache' / 'models'} yet: `edge-runtime export "
                             "CHECKPOINT_OR_REPO_ID --name NAME` puts one there (e.g. google/gemma-4-E2B-it); "
                             "`edge-runtime run` exports the bundled model on first use\n")
    json_result = subprocess.run([sys.executable, "-m", "edge_runtime", "list", "--json"], capture_output=True,
                                 text=True, env=env)
    assert json_result.stdout == "[]\n"
    assert not (tmp_path / "cache").exists()  # listing created nothing


def test_export_by_name_then_run_by_name(checkpoints, tmp_path):
    env = {**os.environ, "EDGE_RUNTIME_CACHE": str(tmp_path / "cache"), "EDGE_RUNTIME_MODELS": str(tmp_path / "m")}
    exported = subprocess.run([sys.executable, "-m", "edge_runtime", "export", str(checkpoints["shared-gqa"]),
                               "--name", "gqa"], capture_output=True, text=True, env=env)
    assert exported.returncode == 0, exported.stderr
    assert exported.stderr == f"wrote {tmp_path / 'm' / 'gqa'}; use it with -m gqa\n"
    run = subprocess.run([sys.executable, "-m", "edge_runtime", "run", "-m", "gqa", "the sea", "-n", "4", "--json"],
                         capture_output=True, text=True, env=env)
    assert json.loads(run.stdout)["model"] == str(tmp_path / "m" / "gqa"), run.stderr
