"""Write a random PEFT LoRA adapter for a checkpoint the tools make (tools/make_checkpoint.py), with PEFT itself.

A fine-tune's adapter cannot be downloaded here, so merging is proven on random ones; they must be in exactly the
layout PEFT (and Unsloth, which saves through PEFT) writes, so PEFT makes them: transformers builds the checkpoint's
model on the meta device (no weights: a real-shape E2B costs nothing), `get_peft_model` wraps it as the options say,
every trainable tensor (lora_A, lora_B, DoRA's magnitude, modules_to_save copies) gets random values, and
`save_pretrained` writes adapter_config.json and adapter_model.safetensors. lora_B is random too (PEFT starts it at
zero), so that the adapter changes the model.

    python tools/make_adapter.py /tmp/ckpt /tmp/adapter --r 16 --alpha 32 --target-modules all-linear
    python tools/make_adapter.py /tmp/ckpt /tmp/adapter --dora --rank-pattern q_proj=4 --modules-to-save norm
    python tools/make_adapter.py /tmp/ckpt /tmp/adapter --target-regex '.*language_model.*\\.(q_proj|v_proj)'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Unsloth's default targets: every projection of the attention and the MLP.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pattern(items: list[str], kind: type) -> dict:
    """`name=value` options as PEFT's rank_pattern / alpha_pattern."""
    pattern = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key or not value:
            raise SystemExit(f"error: {item!r}: expected PATTERN=VALUE")
        pattern[key] = kind(value)
    return pattern


def make_adapter(checkpoint: Path | str, out: Path | str, *, r: int = 8, alpha: float = 16,
                 target_modules: list[str] | str = "all-linear", use_rslora: bool = False, use_dora: bool = False,
                 layers_to_transform: list[int] | None = None, rank_pattern: dict[str, int] | None = None,
                 alpha_pattern: dict[str, float] | None = None, modules_to_save: list[str] | None = None,
                 fan_in_fan_out: bool = False, ensure_weight_tying: bool = False, seed: int = 0,
                 std: float = 0.05) -> Path:
    """Write the adapter into `out` (created) and return it. `std` is the spread of lora_A and lora_B's values
    (DoRA's magnitude: 1 + std * noise; modules_to_save copies: std * noise added to 1 for norms, else plain noise),
    large enough that the merged model differs visibly from the base."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    checkpoint, out = Path(checkpoint), Path(out)
    config = json.loads((checkpoint / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])
    model_config = transformers.AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        model = model_class(model_config)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, use_rslora=use_rslora,
                      use_dora=use_dora, layers_to_transform=layers_to_transform, rank_pattern=rank_pattern or {},
                      alpha_pattern=alpha_pattern or {}, modules_to_save=modules_to_save,
                      fan_in_fan_out=fan_in_fan_out, ensure_weight_tying=ensure_weight_tying,
                      base_model_name_or_path=str(checkpoint))
    peft_model = get_peft_model(model, lora)
    generator = torch.Generator().manual_seed(seed)
    random: dict[int, torch.nn.Parameter] = {}  # by the meta parameter it replaces, so that tied ones stay tied
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        noise = torch.randn(param.shape, generator=generator) * std
        if "lora_magnitude_vector" in name or (".modules_to_save." in name and "norm" in name):
            noise = noise + 1.0
        elif ".modules_to_save." in name:
            noise = noise / std * 0.02
        random[id(param)] = torch.nn.Parameter(noise)
    for module in peft_model.modules(remove_duplicate=False):
        for attribute, param in module._parameters.items():
            if param is not None and id(param) in random:
                module._parameters[attribute] = random[id(param)]
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json) the adapter is for")
    parser.add_argument("out", type=Path, help="adapter directory to write")
    parser.add_argument("--r", type=int, default=8, help="rank (default 8)")
    parser.add_argument("--alpha", type=float, default=16, help="lora_alpha (default 16)")
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument("--target-modules", nargs="+", default=None,
                         help="module names, or all-linear (default), or 'projections' (q/k/v/o, gate/up/down)")
    targets.add_argument("--target-regex", help="target_modules as one regular expression over module names")
    parser.add_argument("--rslora", action="store_true", help="use_rslora: scale alpha / sqrt(r)")
    parser.add_argument("--dora", action="store_true", help="use_dora: weight-decomposed LoRA")
    parser.add_argument("--fan-in-fan-out", action="store_true",
                        help="set fan_in_fan_out (PEFT turns it off again for torch.nn.Linear)")
    parser.add_argument("--layers-to-transform", type=int, nargs="+", default=None)
    parser.add_argument("--rank-pattern", nargs="+", default=[], metavar="PATTERN=R")
    parser.add_argument("--alpha-pattern", nargs="+", default=[], metavar="PATTERN=ALPHA")
    parser.add_argument("--modules-to-save", nargs="+", default=None, help="modules trained in full (e.g. norm)")
    parser.add_argument("--ensure-weight-tying", action="store_true",
                        help="keep the LM head tied to a retrained embed_tokens (modules_to_save)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.05, help="spread of the random values (default 0.05)")
    args = parser.parse_args(argv)
    if args.target_regex is not None:
        target: list[str] | str = args.target_regex
    elif args.target_modules in (None, ["all-linear"]):
        target = "all-linear"
    elif args.target_modules == ["projections"]:
        target = PROJECTIONS
    else:
        target = args.target_modules
    make_adapter(args.checkpoint, args.out, r=args.r, alpha=args.alpha, target_modules=target,
                 use_rslora=args.rslora, use_dora=args.dora, layers_to_transform=args.layers_to_transform,
                 rank_pattern=_pattern(args.rank_pattern, int), alpha_pattern=_pattern(args.alpha_pattern, float),
                 modules_to_save=args.modules_to_save, fan_in_fan_out=args.fan_in_fan_out,
                 ensure_weight_tying=args.ensure_weight_tying, seed=args.seed,
                 std=args.std)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
