"""`edge-runtime profiles`, `plan`, `export --profile` and the memory check of `run`/`chat`, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import edge_runtime
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.profiles import load_profile

E4B_CONFIG = Path(edge_runtime.__file__).parent / "model_configs" / "gemma-4-e4b.json"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ), input=stdin)


def tiny_profile(tmp_path: Path, total_mb: int) -> Path:
    """A custom profile file: the x86_64 box with `total_mb` of memory."""
    text = (Path(load_profile("x86_64-dev").path).read_text()
            .replace('name = "x86_64-dev"', 'name = "tiny-box"').replace("total_mb = 16384", f"total_mb = {total_mb}"))
    path = tmp_path / "tiny-box.toml"
    path.write_text(text)
    return path


def test_profiles_list_show_detect():
    listed = cli("profiles", "list")
    assert listed.returncode == 0 and "pi5-8gb" in listed.stdout and "pi-zero-2w" in listed.stdout
    names = [p["name"] for p in json.loads(cli("profiles", "list", "--json").stdout)]
    assert {"pi4-2gb", "pi4-4gb", "pi4-8gb", "pi5-4gb", "pi5-8gb", "pi5-16gb", "pi-zero-2w", "android-6gb",
            "android-8gb", "android-12gb", "iphone-8gb", "x86_64-dev"} == set(names)
    shown = json.loads(cli("profiles", "show", "pi5-8gb", "--json").stdout)
    assert shown["memory_bytes"] == 8 << 30 and shown["budget_bytes"] == int((8 << 30) * shown["app_share"])
    assert "Raspberry Pi 5" in cli("profiles", "show", "pi5-8gb").stdout
    detected = json.loads(cli("profiles", "detect", "--json").stdout)
    assert detected["profile"]["name"] in names and detected["reasons"]
    unknown = cli("profiles", "show", "pi6")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: unknown profile 'pi6': choose one of")


def test_plan_an_artifact_and_a_checkpoint(artifacts, checkpoints, tmp_path):
    result = cli("plan", "-m", str(artifacts["shared-gqa"]), "--profile", "pi4-2gb", "--context", "128")
    assert result.returncode == 0, result.stderr
    assert "KV cache at context" in result.stdout and "fits" in result.stdout
    data = json.loads(cli("plan", str(checkpoints["shared-gqa"]), "--profile", "pi4-2gb", "--json").stdout)
    assert data["fits"] and data["weights"] == "int4" and data["kv"] == "tq3.5"
    assert data["peak_bytes"] == sum(item["bytes"] for item in data["items"])
    e4b = tmp_path / "e4b"
    e4b.mkdir()
    (e4b / "config.json").write_text(E4B_CONFIG.read_text())
    too_big = cli("plan", str(e4b), "--profile", "pi4-2gb")
    assert too_big.returncode == 2
    assert "does not fit" in too_big.stdout and "Gemma 4 E2B" in too_big.stdout


@pytest.mark.parametrize("args,message", [
    (("plan", "-m", "ART", "--profile", "pi6"), "error: unknown profile 'pi6'"),
    (("plan", "-m", "ART", "--context", "999999"), "error: context 999999 is larger than the model's 256"),
    (("plan", "CKPT", "-m", "ART"), "error: give either an artifact (-m MODEL) or a checkpoint directory, not both"),
    (("export", "CKPT", "-o", "OUT", "--profile", "pi6"), "error: unknown profile 'pi6'"),
])
def test_bad_plan_and_export_input_is_one_line(artifacts, checkpoints, tmp_path, args, message):
    subs = {"ART": str(artifacts["shared-gqa"]), "CKPT": str(checkpoints["shared-gqa"]), "OUT": str(tmp_path / "o")}
    result = cli(*[subs.get(a, a) for a in args])
    assert result.returncode == 1 and result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_export_takes_the_profiles_formats(checkpoints, tmp_path):
    out = tmp_path / "pi"
    result = cli("export", str(checkpoints["shared-gqa"]), "-o", str(out), "--profile", "pi4-2gb")
    assert result.returncode == 0, result.stderr
    formats = json.loads((out / "manifest.json").read_text())["formats"]
    assert formats == {"weights": "int4", "block_size": 128, "ple": "int4"}
    explicit = tmp_path / "pi8"
    cli("export", str(checkpoints["shared-gqa"]), "-o", str(explicit), "--profile", "pi4-2gb", "--weights", "int8")
    assert json.loads((explicit / "manifest.json").read_text())["formats"]["weights"] == "int8"
    default_named = tmp_path / "pi32"
    cli("export", str(checkpoints["shared-gqa"]), "-o", str(default_named), "--profile", "pi4-2gb", "--weights", "fp32",
        "--block-size", "32")
    formats = json.loads((default_named / "manifest.json").read_text())["formats"]
    assert (formats["weights"], formats["block_size"], formats["ple"]) == ("fp32", 32, "int4")


def test_run_and_chat_refuse_what_does_not_fit(artifacts, tmp_path):
    profile = tiny_profile(tmp_path, 64)
    for command in (("run", "hi"), ("chat",)):
        result = cli(*command, "-m", str(artifacts["shared-gqa"]), "--profile", str(profile), stdin="hi\n")
        assert result.returncode == 1
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1
        assert line.startswith("error: Gemma 4 (7 layers, hidden 96) at context 256 (") and "but tiny-box allows" in line
    with pytest.raises(EdgeRuntimeError, match="but tiny-box allows"):
        edge_runtime.load(artifacts["shared-gqa"], profile=load_profile(profile))


def test_profile_sets_threads_kv_and_context(artifacts, tmp_path):
    profile = load_profile(tiny_profile(tmp_path, 16384))
    model = edge_runtime.load(artifacts["shared-gqa"], profile=profile, context_length=100)
    assert (model.kv_format.name, model.context_length) == (profile.kv, 100)
    model = edge_runtime.load(artifacts["shared-gqa"], profile=profile, kv="tq3.5")
    assert (model.kv_format.name, model.context_length) == ("tq3.5", 256)
