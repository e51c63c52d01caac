"""Checkpoint -> artifact: validate everything first, write into a temporary sibling, rename when complete.

An interrupted or failed export never leaves a directory at the destination: all files are written to
`.<name>.partial-<pid>` next to it and only the final rename makes the artifact visible. An existing
artifact is replaced only with `force=True`, and then only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_runtime import __version__
from edge_runtime.artifact import (
    CHAT_TEMPLATE_FILE,
    GENERATION_CONFIG_FILE,
    HEAD_GRAPH,
    KV_FORMATS,
    MANIFEST,
    PLE_FILE,
    PROLOGUE_GRAPH,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHT_FORMATS,
    WEIGHTS_FILE,
    Manifest,
    TensorRef,
    file_entry,
    layer_graph,
)
from edge_runtime.errors import CheckpointError, EdgeRuntimeError
from edge_runtime.ple_store import PLE_FORMATS, decode_rows, encode_rows, storage_dtype
from export.checkpoint import Checkpoint
from export.gemma4 import build_head, build_layer, build_prologue
from export.onnx_graph import WeightsWriter

Progress = Callable[[str, int, int], None]
LOSSLESS_PLE = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


def export_checkpoint(checkpoint: Path, out: Path, *, weights: str = "fp32", ple: str = "auto",
                      force: bool = False, progress: Progress = _no_progress) -> Path:
    """Export a HF Gemma 4 checkpoint directory to an artifact directory at `out`; returns `out`.

    `ple="auto"` stores the PLE table at the checkpoint's own precision (bf16 -> bf16, f16 -> fp16,
    f32 -> fp32), so the default artifact is lossless.
    """
    if weights not in WEIGHT_FORMATS:
        raise EdgeRuntimeError(f"--weights {weights}: not available; choose one of {', '.join(WEIGHT_FORMATS)}")
    if ple != "auto" and ple not in PLE_FORMATS:
        raise EdgeRuntimeError(f"--ple {ple}: not available; choose auto or one of {', '.join(PLE_FORMATS)}")
    out = Path(out)
    if out.exists() and not force:
        raise EdgeRuntimeError(f"{out}: already exists; choose another path or pass --force to replace it")
    ckpt = Checkpoint(Path(checkpoint))
    ckpt.validate()
    if ple == "auto":
        ple = LOSSLESS_PLE[ckpt.dtype_of("embed_tokens_per_layer.weight")]
    tokenizer_source = ckpt.path / TOKENIZER_FILE
    if not tokenizer_source.is_file():
        raise CheckpointError(f"{tokenizer_source}: missing; the artifact needs the checkpoint's tokenizer")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = _write_artifact(ckpt, tmp, weights, ple, progress)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write_artifact(ckpt: Checkpoint, tmp: Path, weights: str, ple: str, progress: Progress) -> Manifest:
    spec = ckpt.spec
    n = spec.num_hidden_layers
    total = n + 4
    with WeightsWriter(tmp / WEIGHTS_FILE) as writer:
        progress("embedding", 0, total)
        embed_shape = (spec.vocab_size, spec.hidden_size)
        embed = writer.add(ckpt.row_chunks("embed_tokens.weight"), embed_shape, np.dtype(np.float32))
        graph_bytes = build_prologue(spec, ckpt.tensor, writer, tmp)
        progress("prologue", 1, total)
        for i in range(n):
            graph_bytes += build_layer(spec, i, ckpt.tensor, writer, tmp)
            progress(f"layer {i}", 2 + i, total)
        graph_bytes += build_head(spec, ckpt.tensor, embed, writer, tmp)
        progress("head", 2 + n, total)

    ple_shape = (spec.vocab_size_per_layer_input, n * spec.hidden_size_per_layer_input)
    _write_ple_store(ckpt, tmp / PLE_FILE, ple)
    progress("PLE store", 3 + n, total)

    tokenizer = _copy_tokenizer(ckpt.path, tmp)
    files = {path.name: file_entry(path) for path in sorted(tmp.iterdir())}
    progress("checksums", total, total)

    return Manifest(
        spec=spec,
        source={"architecture": ckpt.architecture, "dtypes": ckpt.dtypes(), "checkpoint": ckpt.path.name},
        formats={"weights": weights, "ple": ple, "kv": KV_FORMATS[0]},
        graphs={"prologue": PROLOGUE_GRAPH, "layers": [layer_graph(i) for i in range(n)], "head": HEAD_GRAPH},
        tensors={"embed_tokens": embed},
        ple_store=TensorRef(PLE_FILE, 0, ple_shape, storage_dtype(ple).name),
        tokenizer=tokenizer,
        files=files,
        created_by=f"edge-runtime {__version__}",
        read_per_token={"weights": graph_bytes, "embedding_row": spec.hidden_size * 4,
                        "ple_row": ple_shape[1] * storage_dtype(ple).itemsize},
    )


def _write_ple_store(ckpt: Checkpoint, path: Path, fmt: str) -> None:
    """Stream the PLE table into its store in row blocks, refusing values the format cannot hold."""
    with open(path, "wb") as f:
        for chunk in ckpt.row_chunks("embed_tokens_per_layer.weight"):
            stored = encode_rows(chunk, fmt)
            if not np.isfinite(decode_rows(stored, fmt)).all():
                raise CheckpointError(
                    f"{ckpt.path}: embed_tokens_per_layer has values outside the {fmt} range "
                    f"(largest magnitude {float(np.abs(chunk).max()):.3g}); export with --ple bf16 or fp32"
                )
            f.write(memoryview(stored).cast("B"))


def _copy_tokenizer(source: Path, tmp: Path) -> dict[str, str | None]:
    """Copy the tokenizer files and put the chat template in its own file whichever way it shipped."""
    shutil.copyfile(source / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
    names: dict[str, str | None] = {"tokenizer": TOKENIZER_FILE, "tokenizer_config": None,
                                    "generation_config": None, "chat_template": None}
    for key, name in (("tokenizer_config", TOKENIZER_CONFIG_FILE), ("generation_config", GENERATION_CONFIG_FILE)):
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
            names[key] = name
    template = None
    if (source / CHAT_TEMPLATE_FILE).is_file():
        template = (source / CHAT_TEMPLATE_FILE).read_text()
    elif names["tokenizer_config"]:
        try:
            template = json.loads((source / TOKENIZER_CONFIG_FILE).read_text()).get("chat_template")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{source / TOKENIZER_CONFIG_FILE}: not valid JSON ({exc})") from exc
    if isinstance(template, str):
        (tmp / CHAT_TEMPLATE_FILE).write_text(template)
        names["chat_template"] = CHAT_TEMPLATE_FILE
    return names
