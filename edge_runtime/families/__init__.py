"""The model families edge-runtime runs, one package each, found by a config's `model_type` or a manifest's family.

As mlx-lm finds `models/<model_type>.py`, export and planning find a checkpoint's family by the `model_type` of its
config.json, and loading finds an artifact's by the family its manifest names. A new family is a package beside
gemma4/ (family.py says what it gives) and one entry in FAMILIES.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.errors import ArtifactError, CheckpointError, UnsupportedConfigError
from edge_runtime.families import gemma3n, gemma4
from edge_runtime.families.family import Family
from edge_runtime.model_spec import ModelSpec

FAMILIES: dict[str, Family] = {family.name: family for family in (gemma4.FAMILY, gemma3n.FAMILY)}


def _known() -> str:
    return ", ".join(f"{f.name} (model_type {' or '.join(f.model_types)})" for f in FAMILIES.values())


def family_named(name: Any, where: str) -> Family:
    """The family an artifact's manifest names."""
    if name not in FAMILIES:
        raise ArtifactError(f"{where}: model family {name!r} is not one this runtime knows ({_known()}); upgrade "
                            "edge-runtime, or re-export the checkpoint with this version")
    return FAMILIES[name]


def family_of_config(config: Any, where: str) -> Family:
    """The family of a Hugging Face config.json, by its `model_type`."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: not a Hugging Face config (not a JSON object)")
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type is None:
        raise UnsupportedConfigError(f"{where}: no model_type; a Hugging Face config.json names its model's type, "
                                     f"and edge-runtime knows {_known()}")
    raise UnsupportedConfigError(f"{where}: model_type {model_type!r} is not a model family edge-runtime knows; "
                                 f"it knows {_known()}")


def family_of(spec: ModelSpec) -> Family:
    return FAMILIES[spec.family]


def spec_from_hf_config(config: Any, where: str = "config.json") -> ModelSpec:
    """Resolve a Hugging Face config.json into its family's spec, refusing what that family cannot run."""
    return family_of_config(config, where).read_config(config, where)
