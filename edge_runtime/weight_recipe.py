"""Weight recipes: which weight format each role of a model's linear layers takes, as `--weights` writes it.

A recipe is a base format and overrides by role, `BASE[,ROLE=FORMAT...]`: `int4` puts every linear in int4;
`int4,o_proj=int8,per_layer=int8` keeps the attention output and the per-layer-input projections in int8. The
idea is llama.cpp's k-quant mixes (Q4_K_M keeps attn_v, some ffn_down and the output in Q6_K; `llama-quantize
--tensor-type attn_v=q8_0` overrides one kind of tensor) and mlx-lm's `--quant-predicate mixed_4_6`; a named recipe
(NAMED_RECIPES) stands for its text, and may itself be the base of further overrides.

Roles follow the graphs' fused matrices: q, k and v are one matrix product in a segment (their rows
concatenated), gate and up likewise, so each group takes one format. Splitting a group when its members' formats
differ would add a node and a second activation quantization per layer (at batch 1 a node costs microseconds
whatever its size, and E2B runs 35 layers a token) for a choice, v apart from q and k, that the measurements here
never asked for; the fusion stays, and the recipe names the group.

The recipe's text is the manifest's `formats.weights`, so a uniform recipe is the format's plain name, as in every
artifact written before recipes; the formats each tensor got are recorded beside it (artifact.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.weight_formats import BLOCK_SIZES, WEIGHT_FORMATS, WeightFormat, weight_format

QKV, O_PROJ, GATE_UP, DOWN_PROJ, PER_LAYER, EMBED = "qkv", "o_proj", "gate_up", "down_proj", "per_layer", "embed"
ROLES: dict[str, str] = {
    QKV: "attention q, k and v projections (one fused matrix; q alone on KV-shared layers)",
    O_PROJ: "attention output projection",
    GATE_UP: "MLP gate and up projections (one fused matrix)",
    DOWN_PROJ: "MLP down projection",
    PER_LAYER: "per-layer-input projections: the model projection, and each layer's input gate and projection",
    EMBED: "token embedding, which is also the LM head",
}
# Linears no role names (Gemma 3n's AltUp and LAuReL matrices) take the recipe's base format: OTHER is not in ROLES,
# so no override can name it.
OTHER = "other"
_FUSED = {"q_proj": QKV, "k_proj": QKV, "v_proj": QKV, "gate_proj": GATE_UP, "up_proj": GATE_UP}
# int4-mixed: the cheapest roles whose int8 helped most on the bundled model's held-out text (README, Quality, which
# has every role measured): int4 everywhere +1.00% perplexity (block 32) and +0.96% (block 128), this recipe +0.58%
# and +0.77%, for 5% (block 32) and 7% (block 128) more bytes per token at E2B's shapes. The head (embed) helps as
# much alone but costs E2B 11% more bytes; o_proj, gate_up and down_proj helped least.
NAMED_RECIPES: dict[str, str] = {"int4-mixed": f"int4,{QKV}=int8,{PER_LAYER}=int8"}
SYNTAX = "BASE[,ROLE=FORMAT...]"


@dataclass(frozen=True)
class WeightRecipe:
    """A base format and the roles that differ from it, in ROLES order."""

    base: WeightFormat
    overrides: tuple[tuple[str, WeightFormat], ...] = ()

    def format_for(self, role: str) -> WeightFormat:
        return dict(self.overrides).get(role, self.base)

    @property
    def text(self) -> str:
        """The recipe as `--weights` takes it and the manifest records it: "int4", "int4,o_proj=int8"."""
        return ",".join([self.base.name, *(f"{role}={fmt.name}" for role, fmt in self.overrides)])

    @property
    def label(self) -> str:
        """How listings show it: "int4 b32", "int4 b32, o_proj int8"."""
        return ", ".join([self.base.label, *(f"{role} {fmt.label}" for role, fmt in self.overrides)])

    @property
    def formats(self) -> tuple[WeightFormat, ...]:
        """Every format the recipe uses, the base first."""
        return tuple(dict.fromkeys([self.base, *(fmt for _, fmt in self.overrides)]))

    @property
    def block_size(self) -> int | None:
        """The block of the formats in blocks (int4) the recipe uses, None if it uses none."""
        return next((fmt.block_size for fmt in self.formats if fmt.block_size), None)


def parse_recipe(text: str, block_size: int) -> WeightRecipe:
    """The recipe `text` says (module docstring), its int4 in blocks of `block_size`; a ValueError gives one line
    naming the part that is wrong and the valid choices."""
    parts = [part.strip() for part in str(text).split(",")]
    if "" in parts:
        raise ValueError(f"an empty part; write {SYNTAX}, e.g. int4,{O_PROJ}=int8")
    head, *rest = parts
    if "=" in head:
        raise ValueError(f"{head!r} comes first; a recipe starts with its base: {_bases()}")
    if head in NAMED_RECIPES:
        head, *named = NAMED_RECIPES[head].split(",")
        rest = named + rest
    try:
        base = weight_format(head, block_size)
    except ValueError as exc:
        raise ValueError(f"not available; choose one of {_bases()}, then any ROLE=FORMAT overrides"
                         if head not in WEIGHT_FORMATS else str(exc)) from None
    chosen: dict[str, WeightFormat] = {}
    for part in rest:
        role, equals, name = (item.strip() for item in part.partition("="))
        if not equals:
            raise ValueError(f"{part!r} is not ROLE=FORMAT (e.g. {O_PROJ}=int8); roles: {', '.join(ROLES)}")
        if role not in ROLES:
            group = _FUSED.get(role)
            hint = f" ({role} is computed in one matrix with the rest of {group}: give {group})" if group else ""
            raise ValueError(f"unknown role {role!r}{hint}; roles: {', '.join(ROLES)}")
        if role in chosen:
            raise ValueError(f"{role} is given twice")
        try:
            chosen[role] = weight_format(name, block_size)
        except ValueError as exc:
            raise ValueError(f"{role}={name}: {exc}") from None
    return WeightRecipe(base, tuple((role, chosen[role]) for role in ROLES if chosen.get(role, base) != base))


def _bases() -> str:
    return f"{', '.join(WEIGHT_FORMATS)} or a named recipe ({', '.join(NAMED_RECIPES)})"


def weights_label(text: str, block_size: int | None) -> str:
    """The listing label of a recorded recipe (`weights` and `block_size` of a manifest, a profile or a plan, whose
    block is None when no format in blocks is used: any block then reads the same recipe)."""
    return parse_recipe(text, block_size or BLOCK_SIZES[0]).label
