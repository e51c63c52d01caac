"""Checkpoint -> artifact: validate everything first, write into a temporary sibling, rename when complete.

An interrupted or failed export never leaves a directory at the destination, and never deletes anything it did
not write: export/destination.py decides where files go and what an existing destination may be.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edge_runtime.artifact import (
    CHAT_TEMPLATE_FILE,
    EMBED_SCALES,
    GENERATION_CONFIG_FILE,
    MANIFEST,
    PLE_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    Manifest,
    TensorRef,
    file_entry,
)
from edge_runtime.chat_template import ChatTemplate
from edge_runtime.errors import CheckpointError, EdgeRuntimeError, UnwritableError
from edge_runtime.export.adapter_merge import MergedWeights
from edge_runtime.export.checkpoint import Checkpoint
from edge_runtime.export.destination import check_destination, partial_path, remove_stale_partials, replace
from edge_runtime.export.onnx_graph import GraphBuilder, WeightsWriter
from edge_runtime.families.family import HEAD
from edge_runtime.lora_adapter import open_adapters
from edge_runtime.lora_slots import LoraSlots, SlotRequest, parse_slots, slot_dtype
from edge_runtime.ple_store import LOSSLESS_FORMATS, PLE_FORMATS, decode_rows, encode_rows, storage_dtype, stored_width
from edge_runtime.progress import Notice, Progress, no_notice, no_progress
from edge_runtime.version import __version__
from edge_runtime.weight_formats import BLOCK_SIZES, EmbeddingWeights, WeightFormat
from edge_runtime.weight_recipe import DOWN_PROJ, EMBED, GATE_UP, O_PROJ, PER_LAYER, QKV, WeightRecipe, parse_recipe

SLOTTED_ROLES = (QKV, O_PROJ, GATE_UP, DOWN_PROJ, PER_LAYER)  # the weight roles of the linears LoRA slots can take


def export_checkpoint(checkpoint: Path, out: Path, *, weights: str = "fp32", block_size: int = 32,
                      ple: str = "auto", force: bool = False, adapters: Sequence[Path] = (),
                      adapter_scales: Sequence[float] = (), lora_slots: str | None = None,
                      lora_slot_precision: str | None = None, progress: Progress = no_progress,
                      notice: Notice = no_notice) -> Path:
    """Export a HF checkpoint directory (of a family edge-runtime knows) to an artifact directory at `out`.

    `weights` is a weight format or a recipe of formats by role (edge_runtime/weight_recipe.py: "int4",
    "int4,o_proj=int8"); `block_size` applies to its int4 weights. `ple="auto"` stores the PLE table at the
    checkpoint's own precision (bf16 -> bf16, f16 -> fp16, f32 -> fp32), so the default artifact is lossless.
    `progress(stage, done, total)` is called as each stage advances, with the stage's own units; `notice` hears
    about leftovers of interrupted exports removed on the way (export/destination.py says what is ever removed).
    `adapters` are PEFT LoRA adapter directories merged into the weights in order, each scaled by its
    `adapter_scales` entry (one value scales all); all are checked against the checkpoint before anything is written.
    `lora_slots` ("16", "16:q_proj,v_proj": edge_runtime/lora_slots.py) gives those projections inputs through which
    the runtime attaches an adapter at load, in `lora_slot_precision` ("fp32", "fp16" or "int8"; by default by the
    weights: lora_slots.slot_dtype).
    """
    if block_size not in BLOCK_SIZES:
        raise EdgeRuntimeError(f"--block-size {block_size}: not available; choose one of "
                               f"{', '.join(map(str, BLOCK_SIZES))}")
    try:
        recipe = parse_recipe(weights, block_size)
    except ValueError as exc:
        raise EdgeRuntimeError(f"--weights {weights}: {exc}") from None
    try:
        slots = None if lora_slots is None else parse_slots(lora_slots)
    except ValueError as exc:
        raise EdgeRuntimeError(f"--lora-slots {lora_slots}: {exc}") from None
    try:
        dtype = slot_dtype(lora_slot_precision, tuple(recipe.format_for(role).name for role in SLOTTED_ROLES))
    except ValueError as exc:
        raise EdgeRuntimeError(f"--lora-slot-precision {lora_slot_precision}: {exc}") from None
    request = None if slots is None else SlotRequest(*slots, dtype)
    if ple != "auto" and ple not in PLE_FORMATS:
        raise EdgeRuntimeError(f"--ple {ple}: not available; choose auto or one of {', '.join(PLE_FORMATS)}")
    out, checkpoint = Path(out), Path(checkpoint)
    check_destination(out, checkpoint, force)
    ckpt = Checkpoint(checkpoint)
    ckpt.validate()
    merged = MergedWeights(ckpt, open_adapters([Path(a) for a in adapters], list(adapter_scales), ckpt.expected,
                                                ckpt.family.embedding))
    if ple == "auto":
        ple = LOSSLESS_FORMATS[ckpt.dtype_of(ckpt.family.ple_table)]
    tokenizer_source = ckpt.path / TOKENIZER_FILE
    if not tokenizer_source.is_file():
        raise CheckpointError(f"{tokenizer_source}: missing; the artifact needs the checkpoint's tokenizer")
    _chat_template(ckpt.path)

    tmp = partial_path(out)
    try:
        remove_stale_partials(out, notice)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise _os_error(exc, out, checkpoint) from None
    try:
        manifest = _write_artifact(ckpt, merged, tmp, recipe, block_size, ple, request, progress)
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
        replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, out, checkpoint) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _os_error(exc: OSError, out: Path, checkpoint: Path) -> EdgeRuntimeError:
    """A failed read or write as one line: which path, what the system said, what to do (nothing is left behind)."""
    name = Path(exc.filename) if exc.filename else None
    if name is not None and name.resolve().is_relative_to(checkpoint.resolve()):
        return EdgeRuntimeError(f"cannot read {name}: {exc.strerror or exc}; check the checkpoint's files")
    where = f" ({name})" if name is not None and name != out else ""
    reason = exc.strerror or str(exc)
    return UnwritableError(f"cannot write the artifact at {out}: {reason}{where}; choose an output path on a "
                           "writable filesystem with room for it", str(name or out), reason)


def _write_artifact(ckpt: Checkpoint, merged: MergedWeights, tmp: Path, recipe: WeightRecipe, block_size: int,
                    ple: str, slots: SlotRequest | None, progress: Progress) -> Manifest:
    spec, family = ckpt.spec, ckpt.family
    n = spec.num_hidden_layers
    contract = family.contract(spec)
    builders = family.graph_builders()
    graphs: list[GraphBuilder] = []
    with WeightsWriter(tmp / WEIGHTS_FILE) as writer:
        embedding = _write_embedding(ckpt, merged, writer, recipe.format_for(EMBED), progress)

        def new_graph(name: str) -> GraphBuilder:
            graphs.append(GraphBuilder(name, writer, slots))
            return graphs[-1]

        graph_bytes = 0
        for i, segment in enumerate(contract.segments):
            progress("layers", i, len(contract.segments))
            try:
                graph_bytes += builders.build_segment(spec, i, merged.tensor, embedding.head, recipe, new_graph,
                                                      tmp / segment.graph)
            except ValueError as exc:  # a weight the format cannot hold
                raise CheckpointError(f"{ckpt.path}: {exc}; export it in another format (--weights)") from None
        progress("layers", len(contract.segments), len(contract.segments))

    ple_width = stored_width(ple, n * spec.hidden_size_per_layer_input, spec.hidden_size_per_layer_input)
    ple_shape = (spec.vocab_size_per_layer_input, ple_width)
    _write_ple_store(ckpt, merged, tmp / PLE_FILE, ple, progress)

    progress("checksums", 0, 1)
    tokenizer = _copy_tokenizer(ckpt.path, tmp)
    files = {path.name: file_entry(path) for path in sorted(tmp.iterdir())}
    progress("checksums", 1, 1)

    lora = None if slots is None else LoraSlots(slots.rank, slots.modules, {t: shape for g in graphs
                                                                            for t, shape in g.slotted.items()},
                                                slots.dtype)
    lookup = {HEAD: embedding.codes, **({EMBED_SCALES: embedding.scales} if embedding.scales else {})}
    return Manifest(
        spec=spec,
        source={"architecture": ckpt.architecture, "dtypes": ckpt.dtypes(), "checkpoint": ckpt.path.name},
        formats={"weights": recipe.text, "block_size": block_size, "ple": ple},
        weight_formats={name: fmt for g in graphs for name, fmt in g.linears.items()},
        graphs=contract,
        tensors=lookup,
        ple_store=TensorRef(PLE_FILE, 0, ple_shape, storage_dtype(ple).name),
        tokenizer=tokenizer,
        files=files,
        created_by=f"edge-runtime {__version__}",
        adapters=tuple(adapter.record() for adapter in merged.adapters),
        read_per_token={"weights": graph_bytes, "embedding_row": embedding.format.row_bytes(spec.hidden_size),
                        "ple_row": ple_width * storage_dtype(ple).itemsize},
        lora_slots=lora,
    )


def _write_embedding(ckpt: Checkpoint, merged: MergedWeights, writer: WeightsWriter, fmt: WeightFormat,
                     progress: Progress) -> EmbeddingWeights:
    """Write the tied embedding, streaming it in row blocks, once per layout its readers need (the format decides:
    int8's head kernel wants it transposed, the others read the rows lookup reads)."""
    name = ckpt.family.embedding
    vocab, hidden = ckpt.spec.vocab_size, ckpt.spec.hidden_size
    done = 0

    def rows() -> Iterator[np.ndarray]:
        nonlocal done
        for chunk in merged.row_chunks(name):
            yield chunk
            done += len(chunk)
            progress("embedding", done, vocab)

    try:
        return fmt.write_embedding(writer, rows(), vocab, hidden)
    except ValueError as exc:  # values the format cannot hold
        raise CheckpointError(f"{ckpt.path}: {HEAD} has {exc}; export with --weights fp32, or {EMBED}=fp32 in the "
                              "recipe") from None


def _write_ple_store(ckpt: Checkpoint, merged: MergedWeights, path: Path, fmt: str, progress: Progress) -> None:
    """Stream the PLE table into its store in row blocks, refusing values the format cannot hold."""
    vocab, layer_width = ckpt.spec.vocab_size_per_layer_input, ckpt.spec.hidden_size_per_layer_input
    width = ckpt.spec.num_hidden_layers * layer_width
    done = 0
    with open(path, "wb") as f:
        for chunk in merged.row_chunks(ckpt.family.ple_table):
            stored = encode_rows(chunk, fmt, layer_width)
            done += len(chunk)
            progress("PLE store", done, vocab)
            if not np.isfinite(decode_rows(stored, fmt, width, layer_width)).all():
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
    template = _chat_template(source)
    if template is not None:
        (tmp / CHAT_TEMPLATE_FILE).write_text(template)
        names["chat_template"] = CHAT_TEMPLATE_FILE
    return names


def _chat_template(source: Path) -> str | None:
    """The checkpoint's chat template, from its own file or tokenizer_config.json, compiled so that a broken one
    stops the export before any work rather than every chat after it."""
    where, template = source / CHAT_TEMPLATE_FILE, None
    if where.is_file():
        template = where.read_text()
    elif (source / TOKENIZER_CONFIG_FILE).is_file():
        where = source / TOKENIZER_CONFIG_FILE
        try:
            template = json.loads(where.read_text()).get("chat_template")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{where}: not valid JSON ({exc})") from exc
    if not isinstance(template, str):
        return None
    ChatTemplate(template, origin=str(where))
    return template
