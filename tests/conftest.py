"""Shared fixtures: tiny random Gemma 4 and Gemma 3n checkpoints (made by tools/make_checkpoint.py), their artifacts,
and the transformers reference model of their family loaded from the same files independently of our reader."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import make_checkpoint


def pytest_configure(config: pytest.Config) -> None:
    """Point edge-runtime's user cache (bundled artifact, models, verified.json) at a directory of this session, for
    the tests and every process they start: the suite never writes into the real ~/.cache."""
    cache = Path(tempfile.mkdtemp(prefix="edge-runtime-test-cache-"))
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
    os.environ["EDGE_RUNTIME_CACHE"] = str(cache)


S, F = "sliding_attention", "full_attention"

# Gemma 4: together these exercise every feature of the E models: KV sharing over both layer types, sliding windows
# that test sequences exceed 3x, head_dim != global_head_dim, 1 and 2 KV heads, double-wide MLP on and off,
# proportional partial RoPE, both checkpoint layouts and all three dtypes.
CONFIGS = {
    "shared-mqa-wide": dict(
        layout="multimodal", dtype="bf16", shards=True,
        text=dict(vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                  global_head_dim=32, hidden_size_per_layer_input=16, sliding_window=8, num_kv_shared_layers=2,
                  use_double_wide_mlp=True, layer_types=[S, S, F, S, S, F]),
    ),
    "shared-gqa": dict(
        layout="causal", dtype="f32", shards=False,
        text=dict(vocab_size=384, vocab_size_per_layer_input=384, hidden_size=96, intermediate_size=160,
                  num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                  global_head_dim=48, hidden_size_per_layer_input=8, sliding_window=6, num_kv_shared_layers=3,
                  use_double_wide_mlp=False, layer_types=[S, F, S, S, F, S, F]),
    ),
    "unshared-f16": dict(
        layout="multimodal", dtype="f16", shards=False,
        text=dict(vocab_size=320, vocab_size_per_layer_input=320, hidden_size=48, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                  global_head_dim=16, hidden_size_per_layer_input=12, sliding_window=5, num_kv_shared_layers=0,
                  use_double_wide_mlp=True, layer_types=[S, S, F, F],
                  rope_parameters={S: {"rope_type": "default", "rope_theta": 10000.0},
                                   F: {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                       "rope_theta": 1000000.0}}),
    ),
    # Gemma 3n: AltUp with 4 and 3 streams, LAuReL, sparse MLPs (0.95 and 0.9) and dense ones, per-layer and scalar MLP
    # sizes, KV sharing over both layer types and none, GQA and MQA, a PLE vocabulary shorter than the vocabulary
    # (image/audio ids in the multimodal layout; in the causal one, ids embedded by embed_tokens with PLE row 0), the
    # correct-output scale on and off, the old RoPE keys and rope_parameters, transformers' default layer pattern
    # (whose last layer stays sliding), both layouts, all three dtypes, shards.
    "3n-multimodal": dict(
        layout="multimodal", dtype="bf16", shards=True, tokenizer_vocab=384,  # text ids below the image/audio ids
        text=dict(model_type="gemma3n_text", vocab_size=400, vocab_size_per_layer_input=384, hidden_size=64,
                  intermediate_size=[128, 96, 128, 96, 128, 96], num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=8, laurel_rank=8,
                  num_kv_shared_layers=2, layer_types=[S, S, F, S, S, F], sliding_window=8,
                  activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0], rope_theta=1e6,
                  rope_local_base_freq=1e4),
    ),
    "3n-causal": dict(
        layout="causal", dtype="f32", shards=False,
        text=dict(model_type="gemma3n_text", vocab_size=320, vocab_size_per_layer_input=300, hidden_size=48,
                  intermediate_size=96, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                  hidden_size_per_layer_input=12, laurel_rank=4, altup_num_inputs=3, altup_correct_scale=False,
                  num_kv_shared_layers=3, layer_types=[S, F, S, S, F, S, F], sliding_window=6,
                  activation_sparsity_pattern=[0.95, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],
                  rope_parameters={S: {"rope_type": "default", "rope_theta": 10000.0},
                                   F: {"rope_type": "default", "rope_theta": 100000.0}}),
    ),
    "3n-unshared-f16": dict(
        layout="multimodal", dtype="f16", shards=False,
        text=dict(model_type="gemma3n_text", vocab_size=300, vocab_size_per_layer_input=300, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                  hidden_size_per_layer_input=8, laurel_rank=4, num_kv_shared_layers=0, sliding_window=5,
                  rope_theta=1e6, rope_local_base_freq=1e4),
    ),
}
COMMON = dict(rms_norm_eps=1e-6, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
              max_position_embeddings=256, bos_token_id=2, eos_token_id=1, pad_token_id=0)


def build_checkpoint(out: Path, name: str) -> Path:
    c = CONFIGS[name]
    return make_checkpoint.make_checkpoint(out, {**COMMON, **c["text"]}, layout=c["layout"], dtype=c["dtype"],
                                           max_shard_bytes=40_000 if c["shards"] else None, seed=7,
                                           tokenizer_vocab=c.get("tokenizer_vocab"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: build_checkpoint(root / name, name) for name in CONFIGS}


@pytest.fixture(scope="session")
def artifacts(checkpoints, tmp_path_factory) -> dict[str, Path]:
    from edge_runtime.export import export_checkpoint

    root = tmp_path_factory.mktemp("artifacts")
    return {name: export_checkpoint(path, root / name) for name, path in checkpoints.items()}


@pytest.fixture(scope="session")
def bundled(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The bundled (trained) model exported into a fresh cache directory, which commands without -m must find;
    with the environment that points them there."""
    from edge_runtime.bundled import default_artifact

    env = {"EDGE_RUNTIME_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGE_RUNTIME_CACHE", env["EDGE_RUNTIME_CACHE"])
        return default_artifact(), env


# Gemma 4's format markers, each one special token, appended to the test tokenizer: the tiny checkpoints' tokenizer
# predates them, and tool calls, thoughts and their grammars are matched on them by id.
GEMMA4_MARKERS = ["<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>', "<|think|>", "<|channel>", "<channel|>"]


@pytest.fixture(scope="session")
def gemma4_artifact(tmp_path_factory) -> Path:
    """A tiny random Gemma 4 artifact whose tokenizer has Gemma 4's markers (ids 480-491 of a 512-wide vocabulary:
    the ids above the tokenizer's are never allowed by a grammar) and Gemma 4's chat template, for constrained
    decoding."""
    from tokenizers import AddedToken, Tokenizer

    from edge_runtime.chat_template import GEMMA4_TEMPLATE
    from edge_runtime.export import export_checkpoint

    root = tmp_path_factory.mktemp("gemma4-markers")
    text = dict(COMMON, vocab_size=512, vocab_size_per_layer_input=512, hidden_size=64, intermediate_size=128,
                num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=32,
                hidden_size_per_layer_input=8, sliding_window=16, num_kv_shared_layers=0, use_double_wide_mlp=False,
                layer_types=[S, F, S, F], max_position_embeddings=1024)
    checkpoint = make_checkpoint.make_checkpoint(root / "checkpoint", text, layout="causal", dtype="f32",
                                                 max_shard_bytes=None, seed=3, tokenizer_vocab=480)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(marker, special=True, normalized=False) for marker in GEMMA4_MARKERS])
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    (checkpoint / "chat_template.jinja").write_text(GEMMA4_TEMPLATE)
    return export_checkpoint(checkpoint, root / "artifact")


REFERENCE_CLASSES = {"gemma4_text": ("Gemma4ForCausalLM", "Gemma4TextConfig"),
                     "gemma3n_text": ("Gemma3nForCausalLM", "Gemma3nTextConfig")}


def reference_model(checkpoint: Path):
    """transformers' causal LM of the checkpoint's family (Gemma4ForCausalLM, Gemma3nForCausalLM), eager float32,
    with weights read by the `safetensors` library; only weights transformers itself drops on load (Gemma 3n's
    KV-shared layers' K/V) are left out."""
    import torch
    import transformers
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    text = config.get("text_config", config)
    prefix = "model.language_model." if "text_config" in config else "model."
    model_class, config_class = REFERENCE_CLASSES[text.get("model_type", "gemma4_text")]
    text = {k: v for k, v in text.items() if k not in ("architectures", "model_type", "transformers_version")}
    text_config = getattr(transformers, config_class)(**text)
    text_config._attn_implementation = "eager"
    model = getattr(transformers, model_class)(text_config).eval()
    state = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        for key, value in load_file(shard).items():
            if key.startswith(prefix):
                state["model." + key[len(prefix):]] = value.to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    dropped = tuple(f"model.{k}." for k in getattr(model.model, "_keys_to_ignore_on_load_unexpected", None) or ())
    assert set(missing) <= {"lm_head.weight"} and all(k.startswith(dropped) for k in unexpected), (missing, unexpected)
    model.tie_weights()
    return model


@pytest.fixture
def gemma3n_without_towers(monkeypatch):
    """Gemma3nForConditionalGeneration builds its vision tower through timm, which is not a test dependency, and
    both towers at the published sizes: build neither. The text model and both embedders are built as published."""
    import torch
    import transformers.models.gemma3n.modeling_gemma3n as modeling

    real = modeling.AutoModel

    class TowersLeftOut:
        @staticmethod
        def from_config(config, **kwargs):
            if config.model_type in ("gemma3n_vision", "gemma3n_audio"):
                return torch.nn.Module()
            return real.from_config(config, **kwargs)

    monkeypatch.setattr(modeling, "AutoModel", TowersLeftOut)


def overwrite_first_value(checkpoint: Path, tensor: str, value: float, file_name: str = "model.safetensors") -> None:
    """Write `value` as the first float32 of `tensor` in a single-file checkpoint (a bad weight, for the errors), or
    in another safetensors file of the directory (an adapter's)."""
    import numpy as np

    file = checkpoint / file_name
    data = bytearray(file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8:8 + header_len])[tensor]["data_offsets"][0]
    data[start:start + 4] = np.float32(value).tobytes()
    file.write_bytes(bytes(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@contextmanager
def serving(bundled: tuple[Path, dict[str, str]], log: Path, *options: str,
            launcher: Sequence[str] = ("-m", "edge_runtime")) -> Iterator[tuple[subprocess.Popen, str]]:
    """`edge-runtime serve` on the bundled model as a process of its own, as a kiosk runs it, its stderr in `log`.

    Yields the process and its base URL once /health answers; on leaving, stops it as systemd does (SIGTERM).
    """
    artifact, env = bundled
    port = free_port()
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, *launcher, "serve", "-m", str(artifact), "--port", str(port),
                                    *options], env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within 60 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
