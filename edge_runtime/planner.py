"""The memory planner: will this model, in these formats, at this context, fit this device? Answered before loading.

The peak resident set of a run is predicted from shapes alone, item by item, so that an artifact or a checkpoint not
yet exported can be planned on any machine. What each item costs was measured on the x86_64 development VM
(onnxruntime 1.32, glibc 2.36, 4 KiB pages); `tools/plan_accuracy.py` checks the sum against `edge-runtime bench`
(E2B int4 and int8, fp16 and tq3.5 KV: within 3% at 2k and 8k context; 6% over at 32k, where random tokens start
to repeat and the scratch grows slower than the fit):

- weights resident: onnxruntime maps each graph's weights and repacks them to the heap (engine.py); what stays
  is each linear's format's (WeightFormat.linear_bytes). The embedding rows are read with pread, and hold nothing.
- PLE pages: ple.bin is mapped with MADV_RANDOM, so each distinct token maps the pages its row spans. Random
  tokens are the worst case (bench): N tokens, N distinct rows, up to the vocabulary. A page cache already holding
  the file in large folios can map more, clean pages the kernel reclaims under pressure (mapping.py).
- KV cache: the formats' own `cache_bytes`, full layers grown in steps of KV_GROWTH slots (kv_cache.py).
- activations: a prefill chunk's scratch (ONNX intermediates, PLE rows, attention scores bounded by
  attention.SCORE_BYTES, masks over the context) and what glibc keeps of it once freed; the head runs on the last
  position only. Fitted to prefill traces of E2B (chunks 64-256, contexts 1k-8k, int4 and int8, fp16 and tq3.5:
  within 30 MiB of each; a 512-token chunk measured 100 MiB above the fit).
- load transient: loading maps a tensor while repacking it, the head first (engine.py), so the load peak is the
  resident weights plus the largest tensor; it counts only where it exceeds the run's peak.
- LoRA adapter: one attached to the slots (lora_attach.py) is held as fed, float32 A and B for each module it
  changes, 4 r (in + out) bytes each (E2B, rank 16 on the seven projections: 96.6 MB); known from its file's header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from edge_runtime.artifact import MANIFEST, read_manifest
from edge_runtime.attention import SCORE_BYTES
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.families import FAMILIES, family_of, family_of_config, spec_from_hf_config
from edge_runtime.families.family import GraphPart
from edge_runtime.kv_cache import GROWTH as KV_GROWTH
from edge_runtime.kv_formats import DEFAULT_RECENT, default_sliding_format, kv_format
from edge_runtime.lora_attach import checked_adapter, fed_bytes
from edge_runtime.model_spec import ModelSpec
from edge_runtime.ple_store import LOSSLESS_FORMATS, storage_dtype, stored_width
from edge_runtime.profiles import Profile
from edge_runtime.safetensors_reader import INDEX_FILE, SINGLE_FILE, SafetensorsFile
from edge_runtime.weight_formats import BLOCK_SIZES, WeightFormat
from edge_runtime.weight_recipe import EMBED, parse_recipe, weights_label

MODEL_CONFIGS = Path(__file__).resolve().parent / "model_configs"
PAGE_BYTES = 4096  # Linux on the Pi 4, Android and x86_64; the Pi 5's own kernel uses 16 KiB pages (more per PLE row)
# Python, numpy, onnxruntime, tokenizers and the CLI imported (62 MiB), onnxruntime's environment, thread pools and
# E2B's 72 sessions: RSS after loading E2B int4 and int8 (1382 and 2271 MiB) less the predicted weights and tokenizer.
RUNTIME_BYTES = 89 << 20
# tokenizers' resident memory per byte of tokenizer.json, measured on synthetic byte-level BPE files (the real Gemma
# file was not available): it follows the count of vocabulary entries and merges (~390 bytes each) more than the
# bytes: 12.1-12.3 for 3.7 and 15 MiB files of 65k and 262k tokens with short tokens, 6.8 for 262k longer ones in
# 30 MiB. The short-token figure is taken, which errs toward refusing.
TOKENIZER_BYTES_PER_FILE_BYTE = 12.3
# Prefill scratch (least squares over the E2B traces above; attention's 2 score arrays counted apart):
# ACTIVATION_COPIES float32 copies of each value a chunk token carries through a layer, PAIR_BYTES per
# (chunk token, context token) pair (masks, widened keys), SCRATCH_BASE_BYTES whatever the chunk.
ACTIVATION_COPIES = 4
PAIR_BYTES = 33
SCRATCH_BASE_BYTES = 26 << 20
_COMPACT = dict(weights="int4", block_size=128, ple="int4", kv="tq3.5")  # the smallest formats the profiles use


@dataclass(frozen=True)
class _Setup:
    """Everything the peak depends on."""

    spec: ModelSpec
    weights: str
    block_size: int
    ple: str
    kv: str
    kv_recent: int
    kv_sliding: str
    context: int
    prefill_chunk: int
    tokenizer_file_bytes: int
    adapter_bytes: int


@dataclass(frozen=True)
class Plan:
    model: str
    spec: ModelSpec
    source: Path
    profile: Profile
    context: int
    weights: str
    block_size: int | None
    ple: str
    kv: str
    kv_sliding: str
    kv_recent: int
    items: list[tuple[str, int]]
    peak_bytes: int
    budget_bytes: int
    max_context: int
    suggestions: list[str]

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def refusal(self) -> str:
        """One line for a run that would be killed for memory: what, by how much, and what would fit instead."""
        instead = "would fit: " + "; ".join(self.suggestions) if self.suggestions else "nothing smaller fits"
        return (f"{self.model} at context {self.context} ({_formats(self)}) needs {_size(self.peak_bytes)} but "
                f"{self.profile.name} allows {_size(self.budget_bytes)} ({_size(self.peak_bytes - self.budget_bytes)} "
                f"over); {instead}")

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "spec"}, "source": str(self.source),
                "profile": self.profile.name, "items": [{"name": n, "bytes": b} for n, b in self.items],
                "fits": self.fits}


def plan_memory(source: Path, profile: Profile, context: int | None = None, *, kv: str | None = None,
                kv_recent: int | None = None, kv_sliding: str | None = None,
                prefill_chunk: int = 256, adapter: Path | None = None) -> Plan:
    """Predict the peak RSS of running `source` (artifact or HF checkpoint directory) on `profile`'s device.

    An artifact brings its formats; a checkpoint is planned in the profile's, as `export --profile` would write it.
    `context` defaults to the profile's (at most the model's), `kv` to the profile's KV format. `adapter` is a LoRA
    adapter directory attached to the artifact's slots, refused as loading would refuse it.
    """
    source = Path(source)
    adapter_bytes = 0
    if (source / MANIFEST).is_file():
        manifest = read_manifest(source)
        spec, formats = manifest.spec, manifest.formats
        weights, block_size, ple = formats["weights"], int(formats.get("block_size", 0)), formats["ple"]
        tokenizer = source / manifest.tokenizer["tokenizer"]
        if adapter is not None:
            slots = manifest.lora_slots
            adapter_bytes = fed_bytes(checked_adapter(Path(adapter), slots, spec, source), slots)
    elif (source / "config.json").is_file():
        if adapter is not None:
            raise EdgeRuntimeError(f"--adapter {adapter}: {source} is a checkpoint, with no LoRA slots to attach an "
                                   "adapter to; plan the artifact it exports with --lora-slots RANK")
        spec = spec_from_hf_config(json.loads((source / "config.json").read_text()), str(source / "config.json"))
        weights, block_size, ple = profile.weights, profile.block_size, profile.ple
        ple = _checkpoint_ple(source, spec) if ple == "auto" else ple
        tokenizer = source / "tokenizer.json"
    else:
        raise EdgeRuntimeError(f"{source}: neither an artifact (no {MANIFEST}) nor a Hugging Face checkpoint (no "
                               "config.json); pass an artifact directory from `edge-runtime export` or a checkpoint")
    limit = spec.max_position_embeddings
    context = min(profile.context, limit) if context is None else context
    if context < 1:
        raise EdgeRuntimeError(f"context {context} is not a positive number of tokens; pass --context 1 or more")
    if context > limit:
        raise EdgeRuntimeError(f"context {context} is larger than the model's {limit}; pass --context {limit} or less")
    kv = kv or profile.kv
    recent = kv_format(kv).default_recent if kv_recent is None else kv_recent
    kv_sliding = kv_sliding or default_sliding_format(kv)
    kv_format(kv_sliding)
    setup = _Setup(spec, weights, block_size, ple, kv, recent, kv_sliding, context, prefill_chunk,
                   tokenizer.stat().st_size if tokenizer.is_file() else 0, adapter_bytes)
    items = _items(setup)
    peak, budget = sum(b for _, b in items), profile.budget_bytes
    return Plan(model=model_name(spec), spec=spec, source=source, profile=profile, context=context, weights=weights,
                block_size=parse_recipe(weights, block_size).block_size, ple=ple, kv=kv, kv_sliding=kv_sliding,
                kv_recent=recent, items=items, peak_bytes=peak, budget_bytes=budget,
                max_context=_max_context(setup, budget),
                suggestions=[] if peak <= budget else _suggestions(setup, budget, source))


def model_name(spec: ModelSpec) -> str:
    """"Gemma 4 E2B (35 layers, hidden 1536)": the packaged config of the same family and shape names it."""
    shape = f"{spec.num_hidden_layers} layers, hidden {spec.hidden_size}"
    for name, known in known_models().items():
        if (known.family, known.num_hidden_layers, known.hidden_size) == (spec.family, spec.num_hidden_layers,
                                                                          spec.hidden_size):
            return f"{name} ({shape})"
    return f"{family_of(spec).title} ({shape})"


def known_models() -> dict[str, ModelSpec]:
    """The published configs packaged with the runtime (model_configs/, named for their model: gemma-4-e2b.json is
    "Gemma 4 E2B") of every registered family, by name, family by family in the registry's order: what "the smaller
    model" of a family can be."""
    found = []
    for path in MODEL_CONFIGS.glob("*.json"):
        config = json.loads(path.read_text())
        if any(config.get("model_type") in family.model_types for family in FAMILIES.values()):
            family = family_of_config(config, str(path))
            found.append((list(FAMILIES).index(family.name), path.stem, family, config, path))
    return {f"{family.title} {stem.rsplit('-', 1)[-1].upper()}": family.read_config(config, str(path))
            for _, stem, family, config, path in sorted(found, key=lambda entry: entry[:2])}


def _checkpoint_ple(checkpoint: Path, spec: ModelSpec) -> str:
    """The PLE format export's "auto" picks: the one holding the checkpoint's own dtype of the PLE table."""
    index, name = checkpoint / INDEX_FILE, family_of(spec).ple_table
    shards = json.loads(index.read_text())["weight_map"] if index.is_file() else {name: SINGLE_FILE}
    file = SafetensorsFile(checkpoint / next(file for key, file in shards.items() if key.endswith(name)))
    return LOSSLESS_FORMATS[next(entry.dtype for key, entry in file.entries.items() if key.endswith(name))]


def _graphs(spec: ModelSpec) -> list[GraphPart]:
    """The graphs' parts (the family's shapes) in the engine's load order: the head's segment, the last, first."""
    segments = family_of(spec).graph_parts(spec)
    return [part for segment in (segments[-1], *segments[:-1]) for part in segment]


def linear_formats(spec: ModelSpec, weights: str, block_size: int) -> dict[str, WeightFormat]:
    """The format of every linear the graphs hold, by name, as the weight recipe `weights` gives its role: what an
    export records in its manifest's weight_formats."""
    recipe = parse_recipe(weights, block_size)
    return {linear.name: recipe.format_for(linear.role) for graph in _graphs(spec) for linear in graph.linears}


def linear_macs_by_format(spec: ModelSpec, weights: str, block_size: int) -> dict[str, tuple[int, int]]:
    """Per weight format, (multiply-accumulates of the linear layers run at every prompt position, those run once
    per prefill chunk at its last position): a decode step runs both; attention's own products are not counted."""
    formats, out = linear_formats(spec, weights, block_size), {}
    for graph in _graphs(spec):
        for linear in graph.linears:
            every, last = out.get(formats[linear.name].name, (0, 0))
            macs = linear.n * linear.k
            out[formats[linear.name].name] = (every + macs, last) if graph.every_position else (every, last + macs)
    return out


def linear_macs(spec: ModelSpec) -> tuple[int, int]:
    """linear_macs_by_format's two counts over every format."""
    every, last = zip(*linear_macs_by_format(spec, "fp32", BLOCK_SIZES[0]).values(), strict=True)
    return sum(every), sum(last)


def _weights_read(spec: ModelSpec, weights: str, block_size: int) -> tuple[dict[str, int], int, int]:
    """(bytes the graphs read per token by weight format name, the graphs' vector values counted in the recipe's
    base; bytes resident once loaded; the load peak above the runtime: resident so far plus the tensor being
    repacked, at its worst)."""
    formats, base = linear_formats(spec, weights, block_size), parse_recipe(weights, block_size).base.name
    stored: dict[str, int] = {}
    resident = load_peak = 0
    for graph in _graphs(spec):
        largest = 0
        for linear in graph.linears:
            fmt = formats[linear.name]
            on_disk, kept = fmt.linear_bytes(linear.n, linear.k)
            stored[fmt.name] = stored.get(fmt.name, 0) + on_disk
            resident += kept
            largest = max(largest, on_disk)
        stored[base] = stored.get(base, 0) + 4 * graph.vector_values
        resident += 4 * graph.vector_values
        load_peak = max(load_peak, resident + largest)
    return stored, resident, load_peak


def weight_bytes(spec: ModelSpec, weights: str, block_size: int) -> tuple[int, int, int]:
    """(bytes the graphs read per token, as a manifest's read_per_token["weights"]; bytes resident once loaded;
    the load peak above the runtime: resident so far plus the tensor being repacked, at its worst)."""
    stored, resident, load_peak = _weights_read(spec, weights, block_size)
    return sum(stored.values()), resident, load_peak


def embedding_row_bytes(spec: ModelSpec, weights: str, block_size: int) -> int:
    """Bytes of the main embedding row a token reads, in the format the recipe gives the embedding (the head's own
    row, or for int4 and int8 the row's tile: WeightFormat.row_bytes)."""
    return parse_recipe(weights, block_size).format_for(EMBED).row_bytes(spec.hidden_size)


def read_per_token(spec: ModelSpec, weights: str, block_size: int, ple: str) -> dict[str, int]:
    """The model bytes one decode step reads, by part, as an export in these formats records them in its manifest
    (`Manifest.read_per_token`): known before exporting, which is what the cost model needs."""
    return {"weights": weight_bytes(spec, weights, block_size)[0],
            "embedding_row": embedding_row_bytes(spec, weights, block_size), "ple_row": ple_row_bytes(spec, ple)}


def read_per_token_by_format(spec: ModelSpec, weights: str, block_size: int, ple: str) -> dict[str, int]:
    """read_per_token's bytes by the weight format's kernel they go through (the cost model's efficiencies): each
    linear's in its format, the embedding row in the embedding's, the PLE row with the graphs' vector values in the
    recipe's base format."""
    recipe = parse_recipe(weights, block_size)
    by_format = _weights_read(spec, weights, block_size)[0]
    embed = recipe.format_for(EMBED).name
    by_format[embed] = by_format.get(embed, 0) + embedding_row_bytes(spec, weights, block_size)
    by_format[recipe.base.name] += ple_row_bytes(spec, ple)
    return by_format


def ple_row_bytes(spec: ModelSpec, ple: str) -> int:
    width = spec.num_hidden_layers * spec.hidden_size_per_layer_input
    return stored_width(ple, width, spec.hidden_size_per_layer_input) * storage_dtype(ple).itemsize


def ple_page_bytes(spec: ModelSpec, ple: str, context: int) -> int:
    """Mapped PLE pages after `context` distinct tokens: a row at a random token spans row/page + 1 pages, less
    the chance it starts on a page boundary (offsets are multiples of gcd(row, page))."""
    row = ple_row_bytes(spec, ple)
    pages = row / PAGE_BYTES + 1 - math.gcd(row, PAGE_BYTES) / PAGE_BYTES
    return round(min(context, spec.vocab_size_per_layer_input) * pages * PAGE_BYTES)


def activation_bytes(spec: ModelSpec, chunk: int, context: int) -> int:
    """Scratch of the last prefill chunk, the one attending over the whole context (see the module docstring)."""
    chunk = min(chunk, context)
    width = family_of(spec).activation_width(spec)
    groups = spec.num_attention_heads // spec.num_key_value_heads
    scores = min(SCORE_BYTES, 4 * groups * chunk * context)  # one KV head's scores at a time (attention.py)
    return SCRATCH_BASE_BYTES + ACTIVATION_COPIES * 4 * chunk * width + 2 * scores + PAIR_BYTES * chunk * context


def _items(s: _Setup) -> list[tuple[str, int]]:
    _, resident, load_peak = weight_bytes(s.spec, s.weights, s.block_size)
    slots = -(-s.context // KV_GROWTH) * KV_GROWTH
    items = [
        ("weights resident", resident),
        ("tokenizer", round(TOKENIZER_BYTES_PER_FILE_BYTE * s.tokenizer_file_bytes)),
        ("runtime overhead", RUNTIME_BYTES),
        ("PLE pages at context", ple_page_bytes(s.spec, s.ple, s.context)),
        ("KV cache at context", kv_format(s.kv).cache_bytes(s.spec, slots, s.kv_recent, kv_format(s.kv_sliding))),
        (f"activations (prefill chunk {min(s.prefill_chunk, s.context)})",
         activation_bytes(s.spec, s.prefill_chunk, s.context)),
        *([("LoRA adapter attached", s.adapter_bytes)] if s.adapter_bytes else []),
    ]
    transient = RUNTIME_BYTES + load_peak - sum(b for _, b in items)
    return items + [("load transient (beyond the run)", transient)] if transient > 0 else items


def _peak(s: _Setup) -> int:
    return sum(b for _, b in _items(s))


def _max_context(s: _Setup, budget: int) -> int:
    """The largest context (at most the model's) whose peak fits `budget`; 0 if not even one token fits."""
    low, high = 0, s.spec.max_position_embeddings
    while low < high:  # the peak never falls as the context grows
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _peak(replace(s, context=mid)) <= budget else (low, mid - 1)
    return low


def _suggestions(s: _Setup, budget: int, source: Path) -> list[str]:
    """Changes that would fit, each with its peak: smaller formats, a shorter context, the smaller model of its family."""
    export = "re-export with " if (source / MANIFEST).is_file() else "export with "
    changes = [(f"{export}--weights int4 --block-size 128", dict(weights="int4", block_size=128)),
               (f"{export}--ple int4", dict(ple="int4")), ("--kv tq3.5", dict(kv="tq3.5", kv_recent=DEFAULT_RECENT))]
    out = []
    for label, change in changes:
        alternative = replace(s, **change)
        if _peak(alternative) < _peak(s) and _peak(alternative) <= budget:
            out.append(f"{label}: {_size(_peak(alternative))}")
    compact = replace(s, **_COMPACT, kv_recent=DEFAULT_RECENT)
    if not out and _peak(compact) <= budget:
        out.append(f"{export}--weights int4 --block-size 128 --ple int4, and --kv tq3.5: {_size(_peak(compact))}")
    if 0 < (fitting := _max_context(s, budget)):
        out.append(f"--context {fitting}: {_size(_peak(replace(s, context=fitting)))}")
    own = weight_bytes(s.spec, "int4", 128)[1]
    for name, spec in known_models().items():
        if spec.family != s.spec.family or weight_bytes(spec, "int4", 128)[1] >= own:
            continue
        small = replace(compact, spec=spec, context=min(s.context, spec.max_position_embeddings))
        if _peak(small) > budget and (context := _max_context(small, budget)):
            small = replace(small, context=context)
        if _peak(small) <= budget:
            out.append(f"{name} int4 at context {small.context}: {_size(_peak(small))}")
    return out


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def _formats(plan: Plan) -> str:
    recent = f", {plan.kv_recent} exact recent" if plan.kv_recent else ""
    return f"weights {weights_label(plan.weights, plan.block_size)}, PLE {plan.ple}, KV {plan.kv} (sliding {plan.kv_sliding}{recent})"


def format_plan(plan: Plan) -> str:
    """The table `edge-runtime plan` prints: each item, the peak against the budget, the verdict and what would fit."""
    p = plan.profile
    width = max(len(name) for name, _ in plan.items)
    lines = [f"{plan.model}, context {plan.context}, on {p.name} ({p.title})", f"  {_formats(plan)}", ""]
    lines += [f"  {name:<{width}}  {_size(size):>10}" for name, size in plan.items]
    lines += [f"  {'-' * (width + 12)}", f"  {'peak RSS':<{width}}  {_size(plan.peak_bytes):>10}",
              f"  {'budget':<{width}}  {_size(plan.budget_bytes):>10}  ({p.app_share:.0%} of {_size(p.memory_bytes)})", ""]
    spare = plan.budget_bytes - plan.peak_bytes
    lines.append(f"fits, {_size(spare)} to spare" if plan.fits else f"does not fit: {_size(-spare)} over")
    lines.append(f"largest context that fits: {plan.max_context}" if plan.max_context
                 else "no context fits in these formats")
    lines += [f"  would fit: {s}" for s in plan.suggestions]
    return "\n".join(lines)
