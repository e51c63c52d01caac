"""What the ARM64 check runs: the CPU models, the artifacts exported on the host, and the cases run on each.

Shared by the host side (tools/arm64/check exports the artifacts and computes the x86 goldens) and the guest side
(tools/arm64/runner.py, inside the emulated root), so both run exactly the same cases. Plain data and the standard
library only: the guest imports it before anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> (QEMU_CPU value, what it stands for). qemu 7.2 (Debian bookworm) has no Armv9 model; its `max` model
# with SVE and SME turned off exposes dotprod + i8mm + bf16, which is what a recent phone's CPU offers to apps
# (Snapdragon 8 Gen 2's firmware does not expose SVE: device_profiles/android-8gb.toml).
CPUS: dict[str, tuple[str, str]] = {
    "cortex-a72": ("cortex-a72", "Pi 4: Armv8.0-A, NEON only"),
    "cortex-a76": ("cortex-a76", "Pi 5: Armv8.2-A, NEON + dotprod"),
    "neoverse-n1": ("neoverse-n1", "A76-class server core (Graviton2): dotprod"),
    "phone-i8mm": ("max,sve=off,sme=off", "Armv9 phone class: dotprod + i8mm (qemu max, SVE/SME off)"),
}
SMOKE_CPU = "cortex-a76"
# The build of edge_runtime/kernels/attention.c each emulated CPU must load (edge_runtime.attention_kernel.load()):
# the dot-product build (its integer key scores by sdot) where the CPU has Armv8.2's dot products, the Armv8-A NEON
# one on the Pi 4's core; anything else means that build is missing or stale, and numpy ran attention instead.
ATTENTION_KERNELS = {"cortex-a72": "aarch64", "cortex-a76": "aarch64-dotprod", "neoverse-n1": "aarch64-dotprod",
                     "phone-i8mm": "aarch64-dotprod"}

# x86 runs per quantized case with its inputs perturbed by one float32 ulp (runner.perturb_inputs): the yardstick
# for how far two CPUs' rounding may move a format's logits (compare.py).
NOISE_RUNS = 5
PROMPT = "The old house stood at the end of the lane, and every evening the"
GREEDY_TOKENS = 32


@dataclass(frozen=True)
class ArtifactSpec:
    """One export of the bundled checkpoint (weights, block size, PLE format, and LoRA slots in a precision)."""

    name: str
    weights: str
    block_size: int
    ple: str
    lora_slots: str | None = None
    lora_slot_precision: str | None = None


@dataclass(frozen=True)
class Case:
    """One run: an artifact and the KV cache settings it is loaded with."""

    name: str
    artifact: str
    kv: str = "fp16"
    kv_recent: int | None = None
    kv_sliding: str = "fp32"
    adapter: str | None = None  # a LoRA adapter directory beside the artifacts (ADAPTER), attached at load

    @property
    def rounds_at_run_time(self) -> bool:
        """Whether this case's kernels round values computed at run time (activations, KV codes), so that a one-ulp
        difference upstream can move its logits by a rounding step."""
        return self.weights not in ("fp32", "fp16") or self.kv != "fp32"

    @property
    def weights(self) -> str:
        return ARTIFACTS[self.artifact.removesuffix(FP32_ACTIVATION_SUFFIX)].weights


ARTIFACTS = {a.name: a for a in [
    ArtifactSpec("fp32", "fp32", 32, "fp32"),
    ArtifactSpec("fp16", "fp16", 32, "fp16"),
    ArtifactSpec("int8", "int8", 32, "int8"),
    ArtifactSpec("int4-b32", "int4", 32, "int4"),
    ArtifactSpec("int4-b128", "int4", 128, "fp32"),
    ArtifactSpec("int8-block-b128", "int8-block", 128, "fp32"),
    *(ArtifactSpec(f"ple-{p}", "fp32", 32, p) for p in ("int8", "int4", "tq4", "tq3", "tq2")),
    # edge-runtime's own onnxruntime operators (edge_runtime/kernels/onnxruntime_ops.c) in a model: LoRA slots beside
    # fp32 weights, so that the slots' arithmetic is all that differs from the plain fp32 case
    *(ArtifactSpec(f"lora-{p}", "fp32", 32, "fp32", lora_slots="8", lora_slot_precision=p) for p in ("int8", "fp16")),
]}
# The adapter the LoRA cases attach: tools/make_adapter.py's all-linear rank 8 for the bundled checkpoint (PEFT, on
# the host), written beside the artifacts.
ADAPTER = "adapter-all-linear-r8"
# Every KV format, with no exact recent tokens and the sliding rings in the format too, so that every stored
# position is read back from its codes (the defaults would keep this short prompt's positions exact).
KV_FORMATS = ("fp32", "fp16", "int8", "tq4", "tq3.5", "tq3", "tq2.5", "tq4-mse", "tq3.5-mse", "tq3-mse",
              "tq2.5-mse", "tq4-prod", "tq3.5-prod", "tq3-prod", "tq2.5-prod", "qjl")

CASES = {c.name: c for c in [
    Case("fp32", "fp32", kv="fp32"),  # float32 throughout: the parity bound, 1e-4
    *(Case(name, name) for name in ("fp16", "int8", "int4-b32", "int4-b128", "int8-block-b128")),
    *(Case(f"ple-{p}", f"ple-{p}", kv="fp32") for p in ("int8", "int4", "tq4", "tq3", "tq2")),
    *(Case(f"kv-{k}", "fp32", kv=k, kv_recent=0, kv_sliding=k) for k in KV_FORMATS),
    *(Case(f"lora-{p}", f"lora-{p}", kv="fp32", adapter=ADAPTER) for p in ("int8", "fp16")),
]}
SMOKE_CASES = ("fp32", "int8", "int4-b32", "int8-block-b128")
# The weight formats computed by com.microsoft.MatMulNBits, whose arithmetic depends on the CPU (probes.py tells
# which ran): int8 activations per block where MLAS has an integer kernel for the node (x86; ARM with dot-product
# instructions), fp32 activations where it has none (ARM without dot product, the Pi 4: the whole weight is widened
# to fp32 at every run). Their artifacts are also run on the host with MatMulNBits' fp32 compute (accuracy level 0):
# the Pi 4's arithmetic (see check's docs). int4 and int8 are not: edge-runtime's own MatMulInt4 and MatMulInt8
# compute them with the same arithmetic on every CPU.
CPU_DEPENDENT_WEIGHTS = ("int8-block",)
FP32_ACTIVATION_SUFFIX = "+fp32-activations"
# The runs whose held-out perplexity is scored (runner.run_quality: on a CPU, those whose arithmetic it changes),
# the runs whose onnxruntime node types are listed (runner.run_kernels), and the artifact `edge-runtime serve` loads:
# exported for every run of the full check, whichever cases it compares.
QUALITY_CASES = ("fp32", "fp16", "int8-block-b128")
NODE_CASES = ("fp32", "fp16", "int4-b32", "int8-block-b128")
SERVE_ARTIFACT = "int8"


def case(name: str) -> Case:
    """A case by name; `ARTIFACT+fp32-activations` is the host-only run of a CPU_DEPENDENT_WEIGHTS artifact at
    accuracy level 0."""
    return Case(name, name) if name.endswith(FP32_ACTIVATION_SUFFIX) else CASES[name]
