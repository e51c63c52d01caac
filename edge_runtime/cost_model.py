"""The cost model: how fast a Gemma 4 model in given formats should decode and prefill on a profile's device, from
the device's published facts and the bytes and products a token needs. An estimate, labelled as one wherever it is
printed (`edge-runtime plan`, `edge-runtime profiles show`); `tools/cost_model_check.py` compares it with
`edge-runtime bench` on the machine at hand.

Decode reads every weight once per token (DESIGN.md section 3), then attends over the cache, so a step takes

    sum over formats f of model bytes in f / (DECODE_EFFICIENCY[f] x bandwidth)   weights, embedding and PLE rows
  + max(KV bytes / bandwidth,                                                     the cache attention reads at the
        (KV float values / ATTENTION_VALUES_PER_CYCLE                             context, or the compiled kernel's
         + KV packed values / PACKED_VALUES_PER_CYCLE) / (threads x clock))       arithmetic over it

(the kernel asks for the cache's next lines while it computes, so the two overlap: whichever is longer sets the
pace) and prefill is bound by int8 arithmetic (both quantized formats compute in int8):

    seconds per token >= sum over f of linear MACs in f / (threads x int8 MACs per cycle x clock x
                         PREFILL_EFFICIENCY[f])

where the KV-shared layers and the head count once per prefill chunk, since the engine runs them at its last
position only. A weight recipe that mixes formats (edge_runtime/weight_recipe.py) has each linear's bytes and MACs
go through its own format's kernel; the per-format efficiencies were measured on uniform artifacts only. Model bytes
and MACs come from the shapes (planner.py, the same arithmetic as the exporter's), KV bytes and values from the KV
format (KVFormat.attention_reads). The bandwidth is the profile's sustained read bandwidth where one was measured
and published, else SUSTAINED_SHARE of its peak.

The efficiencies are what the kernels achieve of the device's bandwidth or arithmetic peak. They were measured on
one machine only (CALIBRATED_ON) and are applied to every device: a kernel path that is slower or faster relative
to its peak there (the A72's int8 and int4 without dot-product instructions; NEON's
4-float vectors against the 8 of AVX2 the attention rates were measured with) makes the estimate wrong by that
ratio until it is measured on such a device.

What the model ignores: attention's arithmetic during prefill (small at short prompts, not at long ones); encoding
the step's keys and values into packed codes (~1 ms a step on E2B here, under cProfile); the Python and onnxruntime
call overhead per step (~36 calls a token on E2B, in the efficiencies as measured on a fast core, so relatively
larger on slow cores); thermal throttling (a Pi 4 without a heatsink drops to 1.5 GHz or lower); big.LITTLE
scheduling (the profiles' threads and clock are their big or middle cores'); other processes sharing the memory bus;
caches (an E2B step reads far more than any cache holds, which is why bandwidth rules).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_runtime.cpu_features import int8_dot_product
from edge_runtime.kv_formats import AttentionReads, default_sliding_format, kv_format
from edge_runtime.model import DEFAULT_PREFILL_CHUNK
from edge_runtime.model_spec import ModelSpec
from edge_runtime.planner import Plan, known_models, linear_macs_by_format, model_name, read_per_token_by_format
from edge_runtime.profiles import COST_FACTS, Profile
from edge_runtime.weight_formats import BLOCK_SIZES
from edge_runtime.weight_recipe import parse_recipe, weights_label

# Measured by tools/cost_model_check.py (`edge-runtime bench -p 128 -n 32 -r 3`, and `-p 0 -n 32 -r 1 -d 2048` or
# `-d 8192`) on random-weight E2B and E4B artifacts, int4 block 128 and int8, PLE int8, fp16 KV with fp32 sliding
# rings, onnxruntime 1.32, 2 threads, each run started with the 1-minute load average below 1.0, on:
CALIBRATED_ON = "AMD EPYC (Zen 4) KVM guest, 2 cores at 2.6 GHz, AVX-512 VNNI"
# Each constant is the mean of what the runs imply (the value that makes a run's estimate exact). Decode at depth
# 0, as a share of the profile's sustained read bandwidth (x86_64-dev: 35 GB/s), the KV terms subtracted: int4
# 0.78 (E2B 0.69-0.78 over 3 runs, E4B 0.85-0.88 over 2), int8 0.67 (E2B 0.59-0.71 over 2, E4B 0.70). E2B reaches
# less than E4B: the ~72 calls a step cost the same for fewer bytes.
# int8-block was measured later, on the same kind of machine running slower (int4 b128 E2B at 12.6 tok/s where the
# calibration's ran ~19), so by ratio to int4 and int8 in one sitting (E2B, block 128, `bench -p 128 -n 64 -r 2`):
# its weights streamed at 17.0-17.1 GB/s against int4's 15.2 and int8's 11.3-12.1, which puts it at 0.88 (from
# int4's 0.78) to 0.96 (from int8's 0.67): 0.88 is taken.
# int4 moved to edge-runtime's own MatMulInt4 in stop 32, measured by ratio to the MatMulNBits build in one sitting
# (Intel Xeon KVM, AVX-512 VNNI; README "int4 on edge-runtime's own kernel"): E2B's weights streamed 1.08x as fast
# at block 128 (17.3 against 16.0 GB/s) and 1.15x at block 32, so 0.78 x 1.08 = 0.84; prefill (pp128) 1.56x (E2B
# b128) to 1.68x (E4B b128): 0.45 x 1.56 = 0.70.
# int8 moved to edge-runtime's own MatMulInt8 in stop 33, by ratio to DynamicQuantizeMatMul in one sitting (the same
# Intel Xeon; README "int8 on edge-runtime's own kernel"): E2B decode 1.23x (five alternating pairs), so 0.67 x 1.23
# = 0.82; prefill (pp128) 1.62-1.83x (E2B) and 1.86-1.93x (E4B): 0.36 x 1.67 = 0.60.
DECODE_EFFICIENCY = {"int8": 0.82, "int4": 0.84, "int8-block": 0.88}
# Prefill (pp128), as a share of threads x int8 MACs per cycle x clock: int4 0.45 (E2B 0.40-0.44, E4B 0.49-0.51),
# int8 0.36 (E2B 0.34-0.35, E4B 0.41); int8-block, by ratio in the sitting above (pp128 141-143 against int4's 130
# and int8's 100-102): 0.49 (from int4) to 0.51 (from int8), 0.49 taken.
PREFILL_EFFICIENCY = {"int8": 0.60, "int4": 0.70, "int8-block": 0.49}
# Attention over the cache in the compiled kernel, in key and value elements per cycle per thread at the profile's
# clock: `python tools/attention_bench.py --kv fp16 int8 tq3.5 tq4 qjl --rows 2048 8192 32768 --dim 512
# --workers 2` (the decode step's own calls, one KV head's block of 8 query rows split over 2 pinned threads, two
# runs). Float kinds (fp32, fp16, int8: converted as loaded): fp16 2.01-2.07 at 8k and 32k rows (1.62-1.68 at 2k,
# where the fixed cost of a call weighs), int8 1.62-1.66. Packed codes (TurboQuant, QJL: looked up in a table
# first): tq3.5 1.32-1.44, tq4 1.36-1.50, qjl 0.93-1.02. Long blocks from memory run at the rate blocks in cache
# do (fp16 32k rows, 64 MB: 2.07; 8k: 2.03), so the cache's bytes hide behind the arithmetic here. Those runs were
# the x86-64-v3 build's; a CPU with AVX-512 now runs the x86-64-v4 build, ~1.4x as many fp16 values a cycle and
# ~1.3x as many tq3.5 ones (one core, 32k rows of 512), which these constants leave out: an estimate for such a CPU
# is on the slow side.
ATTENTION_VALUES_PER_CYCLE = 2.0
PACKED_VALUES_PER_CYCLE = 1.4
# Without a published sustained read bandwidth, this share of the peak: the Raspberry Pi 5's 11.6 GB/s read with 4
# threads of its 17.07 GB/s (device_profiles/pi5-8gb.toml gives the sources).
SUSTAINED_SHARE = 0.68
SHORT_CONTEXT = 128  # decode right after a short prompt
PROMPT_TOKENS = 128  # the prompt the prefill bound is stated for
LABEL = "estimate (cost model, not a measurement)"


@dataclass(frozen=True)
class Decode:
    """The decode estimate at one context: tokens cached, KV bytes read per token, tokens per second."""

    context: int
    kv_bytes_per_token: int
    tokens_per_second: float


@dataclass(frozen=True)
class Estimate:
    """Expected speed of one model in one set of formats on one profile's device, and what it was computed from.
    `unavailable` says why a format has no figures (its efficiencies were never measured)."""

    model: str
    weights: str
    block_size: int | None
    ple: str
    kv: str
    kv_sliding: str
    kv_recent: int
    profile: str
    threads: int
    bandwidth_gb_s: float | None  # None, with the next three: the profile lacks the facts (see `unavailable`)
    bandwidth_basis: str | None
    clock_ghz: float | None
    int8_macs_per_cycle: int | None
    kernel_path: str
    bytes_per_token: int
    decode: tuple[Decode, ...]
    prompt_tokens: int
    prefill_tokens_per_second: float | None
    unavailable: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"label": LABEL, "calibrated_on": CALIBRATED_ON, **vars(self), "decode": [vars(d) for d in self.decode]}


def bandwidth(profile: Profile) -> tuple[float, str]:
    """GB/s the estimate reads at, and where the figure comes from."""
    if profile.sustained_gb_s is not None:
        return profile.sustained_gb_s, "the profile's sustained read"
    return (SUSTAINED_SHARE * profile.peak_gb_s,
            f"{SUSTAINED_SHARE:g} x the {profile.peak_gb_s:g} GB/s peak: no published sustained read figure")


def attention_arithmetic(reads: AttentionReads, profile: Profile) -> float:
    """Seconds of the attention kernel's arithmetic over what a step reads, on all the profile's threads."""
    cycles = (reads.values - reads.packed) / ATTENTION_VALUES_PER_CYCLE + reads.packed / PACKED_VALUES_PER_CYCLE
    return cycles / (profile.threads * profile.clock_ghz * 1e9)


def kernel_path(profile: Profile) -> str:
    """The int8 instructions onnxruntime's kernels use on this device, as its CPU features say."""
    f = set(profile.cpu_features)
    if profile.arch == "aarch64":
        return "i8mm" if "i8mm" in f else "dotprod (sdot)" if "dotprod" in f else "neon (no dot-product)"
    if "vnni" in f:
        return "avx512-vnni" if "avx512" in f else "avx-vnni"
    return "avx512" if "avx512" in f else "avx2" if "avx2" in f else "sse"


def estimate(spec: ModelSpec, profile: Profile, *, weights: str, block_size: int, ple: str, kv: str,
             kv_recent: int, kv_sliding: str, contexts: Sequence[int], prompt_tokens: int = PROMPT_TOKENS,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Estimate:
    """Decode tokens/s at each of `contexts` and the prefill bound for a `prompt_tokens` prompt (module docstring)."""
    missing = [key for key in COST_FACTS if getattr(profile, key) is None]
    gb_s, basis = bandwidth(profile) if not missing else (None, None)
    by_format = read_per_token_by_format(spec, weights, block_size, ple)
    unmeasured = [name for name in by_format if name not in DECODE_EFFICIENCY]
    recipe = parse_recipe(weights, block_size or BLOCK_SIZES[0])
    slow = [fmt.name for fmt in recipe.formats
            if fmt.needs_int8_dot_product and not int8_dot_product(profile.arch, profile.cpu_features)]
    fmt, sliding = kv_format(kv), kv_format(kv_sliding)
    decode: list[Decode] = []
    prefill = None
    unavailable = None
    if missing:
        unavailable = f"no estimate: the profile gives no {', '.join(missing)} (device_profiles/README.md)"
    elif slow:
        unavailable = (f"no estimate for {' and '.join(slow)} weights: this CPU ({kernel_path(profile)}) has no int8 "
                       "dot-product kernel for them, and onnxruntime widens them to float32 at every step; use int8 "
                       "or int4")
    elif not unmeasured:
        rate = gb_s * 1e9
        weights_seconds = sum(n / (DECODE_EFFICIENCY[name] * rate) for name, n in by_format.items())
        for context in sorted(set(contexts)):
            reads = fmt.attention_reads(spec, context, kv_recent, sliding)
            seconds = weights_seconds + max(reads.bytes / rate, attention_arithmetic(reads, profile))
            decode.append(Decode(context, reads.bytes, 1 / seconds))
        macs_per_second = profile.threads * profile.int8_macs_per_cycle * profile.clock_ghz * 1e9
        chunks = math.ceil(prompt_tokens / prefill_chunk)
        prefill_seconds = sum((prompt_tokens * every + chunks * last) / (macs_per_second * PREFILL_EFFICIENCY[name])
                              for name, (every, last) in linear_macs_by_format(spec, weights, block_size).items())
        prefill = prompt_tokens / prefill_seconds
    else:
        unavailable = (f"no estimate for {' and '.join(unmeasured)} weights: the cost model's efficiencies are "
                       f"measured for {', '.join(DECODE_EFFICIENCY)} only")
    return Estimate(model=model_name(spec), weights=weights, block_size=recipe.block_size,
                    ple=ple, kv=kv, kv_sliding=kv_sliding, kv_recent=kv_recent, profile=profile.name,
                    threads=profile.threads, bandwidth_gb_s=gb_s, bandwidth_basis=basis, clock_ghz=profile.clock_ghz,
                    int8_macs_per_cycle=profile.int8_macs_per_cycle, kernel_path=kernel_path(profile),
                    bytes_per_token=sum(by_format.values()), decode=tuple(decode), prompt_tokens=prompt_tokens,
                    prefill_tokens_per_second=prefill, unavailable=unavailable)


def plan_estimate(plan: Plan) -> Estimate:
    """The planned model in the plan's formats, at a short context and the plan's."""
    return estimate(plan.spec, plan.profile, weights=plan.weights, block_size=plan.block_size or 0, ple=plan.ple,
                    kv=plan.kv, kv_recent=plan.kv_recent, kv_sliding=plan.kv_sliding,
                    contexts=(min(SHORT_CONTEXT, plan.context), plan.context))


def profile_estimates(profile: Profile) -> list[Estimate]:
    """The known models (the packaged configs: Gemma 4 and Gemma 3n E2B and E4B) in the profile's default formats, at a
    short context and the profile's (at most the model's). A PLE format of "auto" is taken as bf16, the published
    checkpoints' own."""
    ple = "bf16" if profile.ple == "auto" else profile.ple
    return [estimate(spec, profile, weights=profile.weights, block_size=profile.block_size, ple=ple, kv=profile.kv,
                     kv_recent=kv_format(profile.kv).default_recent, kv_sliding=default_sliding_format(profile.kv),
                     contexts=(SHORT_CONTEXT, min(profile.context, spec.max_position_embeddings)))
            for spec in known_models().values()]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_estimates(estimates: Sequence[Estimate]) -> str:
    """The "estimate" section `plan` and `profiles show` print: one row per model, then what it was computed from."""
    first = estimates[0]
    recent = f", {first.kv_recent} exact recent" if first.kv_recent else ""
    lines = [f"{LABEL}: weights {weights_label(first.weights, first.block_size)}, PLE {first.ple}, KV {first.kv} (sliding {first.kv_sliding}{recent})"]
    contexts = sorted({d.context for e in estimates for d in e.decode})
    header = ["model", "bytes/token", *(f"decode t/s @ {c}" for c in contexts),
              f"prefill t/s bound ({first.prompt_tokens}-token prompt)"]
    rows = []
    for e in estimates:
        if e.unavailable:
            lines.append(f"  {e.model}: {e.unavailable}")
            continue
        speed = {d.context: f"{d.tokens_per_second:.1f}" for d in e.decode}
        rows.append([e.model.split(" (")[0], _gib(e.bytes_per_token), *(speed.get(c, "-") for c in contexts),
                     f"{e.prefill_tokens_per_second:.0f}"])
    if rows:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines += ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in [header, *rows]]
    if first.bandwidth_gb_s is None:
        return "\n".join(lines)
    lines.append(f"  from {first.bandwidth_gb_s:.1f} GB/s ({first.bandwidth_basis}) and {first.threads} threads x "
                 f"{first.int8_macs_per_cycle} int8 MACs/cycle ({first.kernel_path}) x {first.clock_ghz:g} GHz;")
    lines.append(f"  efficiencies measured on {CALIBRATED_ON} only (README, \"Speed estimates\")")
    return "\n".join(lines)
