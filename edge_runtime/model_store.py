"""The models a user has, and what a model reference means: the bundled model, an artifact path or a name.

Ollama and mlx-lm users expect to say `-m NAME`. A name is a directory of the models directory
($EDGE_RUNTIME_MODELS, else `models` in the edge-runtime cache), where `edge-runtime export SRC --name NAME` writes,
or the bundled model's name. A path that exists always wins over a name, so an artifact in the working directory
is never shadowed by one of the same name in the models directory; a name never contains a path separator, so
anything else is taken as the path the user typed and reported as such when it is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.artifact import MANIFEST, Manifest, read_manifest
from edge_runtime.bundled import BUNDLED_NAME, bundled_artifact_path, default_artifact
from edge_runtime.errors import ArtifactError, EdgeRuntimeError
from edge_runtime.planner import Plan, plan_memory
from edge_runtime.profiles import Profile, detect_profile
from edge_runtime.progress import Progress, no_progress
from edge_runtime.user_cache import cache_dir

MODELS_ENV = "EDGE_RUNTIME_MODELS"
EXPORT_BY_NAME = "edge-runtime export CHECKPOINT_OR_REPO_ID --name NAME"


def models_dir() -> Path:
    """$EDGE_RUNTIME_MODELS, else `models` under the cache root (which honours $EDGE_RUNTIME_CACHE)."""
    if env := os.environ.get(MODELS_ENV):
        return Path(env)
    return cache_dir() / "models"


def is_name(ref: str) -> bool:
    """A bare name: no path separator, and not hidden (exports in progress write `.NAME.partial-PID`)."""
    return bool(ref) and "/" not in ref and os.sep not in ref and not ref.startswith(".")


def named_path(name: str) -> Path:
    """Where `export --name NAME` writes."""
    if not is_name(name):
        raise EdgeRuntimeError(f"--name {name!r}: a model name has no '/' and does not start with '.'; "
                               "pass -o PATH to export anywhere else")
    return models_dir() / name


def is_bundled(ref: str | Path | None) -> bool:
    """Whether `ref` means the bundled model, which may have to be exported into the cache before use."""
    if ref is None:
        return True
    return isinstance(ref, str) and ref == BUNDLED_NAME and not Path(ref).exists() and not (models_dir() / ref).exists()


def resolve_model(ref: str | Path | None = None, progress: Progress = no_progress) -> Path:
    """The artifact directory `ref` means: None is the bundled model (exported on first use, reporting to
    `progress`), a string may be a model name, a Path is always a path."""
    if is_bundled(ref):
        return default_artifact(progress)
    path = Path(ref)
    if isinstance(ref, Path) or path.exists() or not is_name(ref):
        return path
    if (models_dir() / ref).exists():
        return models_dir() / ref
    known = ", ".join([*_artifact_names(), BUNDLED_NAME])
    raise ArtifactError(f"{ref}: no such artifact directory, and no model of that name in {models_dir()} (known: "
                        f"{known}); put one there with `{EXPORT_BY_NAME}`, or see `edge-runtime list`")


def _artifact_names() -> list[str]:
    """Names of the models directory's entries that hold a manifest (damaged or not); others are not models."""
    root = models_dir()
    try:
        entries = sorted(root.iterdir()) if root.is_dir() else []
    except OSError as exc:
        raise EdgeRuntimeError(f"{root}: cannot read the models directory ({exc.strerror})") from exc
    return [entry.name for entry in entries if is_name(entry.name) and (entry / MANIFEST).is_file()]


@dataclass(frozen=True)
class ListedModel:
    """One artifact the user has, with what `edge-runtime list` shows of it."""

    name: str
    path: Path
    bundled: bool
    size_bytes: int
    manifest: Manifest | None
    plan: Plan | None  # at the profile's context, in the artifact's formats and the profile's KV format
    damage: str | None  # why the artifact cannot be used (damaged manifest, missing file), else None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "path": str(self.path), "bundled": self.bundled,
                                "size_bytes": self.size_bytes}
        if self.damage is not None:
            return {**data, "damaged": self.damage}
        formats, plan = self.manifest.formats, self.plan
        return {**data, "weights": formats["weights"], "block_size": self.manifest.weight_recipe.block_size,
                "ple": formats["ple"], "context_length": self.manifest.spec.max_position_embeddings,
                "fit": {"profile": plan.profile.name, "context": plan.context, "fits": plan.fits,
                        "peak_bytes": plan.peak_bytes, "budget_bytes": plan.budget_bytes,
                        "max_context": plan.max_context}}


def list_models(profile: Profile | None = None) -> list[ListedModel]:
    """The artifacts of the models directory (by name), then the bundled model's if it has been exported.

    Each is planned on `profile` (default: this device's) without hashing anything, so listing stays fast
    whatever the sizes; damage that reading the manifest reveals (bad JSON, a missing or truncated file) is
    reported on the entry, never raised.
    """
    profile = profile or detect_profile().profile
    found = [(name, models_dir() / name, False) for name in _artifact_names()]
    bundled = bundled_artifact_path()
    if (bundled / MANIFEST).is_file():
        found.append((BUNDLED_NAME, bundled, True))
    return [_listed(name, path, is_bundled_model, profile) for name, path, is_bundled_model in found]


def _listed(name: str, path: Path, bundled: bool, profile: Profile) -> ListedModel:
    size = 0
    try:
        size = sum(entry.stat().st_size for entry in path.iterdir() if entry.is_file())
        manifest = read_manifest(path)
        return ListedModel(name, path, bundled, size, manifest, plan_memory(path, profile), None)
    except (EdgeRuntimeError, OSError) as exc:
        return ListedModel(name, path, bundled, size, None, None, str(exc))


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fit(plan: Plan) -> str:
    if plan.fits:
        return f"yes (context {plan.context})"
    return f"no: {_size(plan.peak_bytes - plan.budget_bytes)} over at context {plan.context}"


def format_model_table(models: list[ListedModel], profile: Profile) -> str:
    """One line per model for `edge-runtime list`, or how to get one when there are none."""
    if not models:
        return (f"no models in {models_dir()} yet: `{EXPORT_BY_NAME}` puts one there (e.g. "
                "google/gemma-4-E2B-it); `edge-runtime run` exports the bundled model on first use")
    header = ("name", "weights", "PLE", "context", "size", f"fits {profile.name}", "path")
    rows = [None if m.damage else _row(m) for m in models]
    widths = [max(len(row[i]) for row in [header, *filter(None, rows)]) for i in range(len(header) - 1)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join([*(cell.ljust(width) for cell, width in zip(row[:-1], widths)), row[-1]])

    return "\n".join([line(header)] + [line(row) if row else f"{m.name.ljust(widths[0])}  damaged: {m.damage}"
                                        for m, row in zip(models, rows)])


def _row(m: ListedModel) -> tuple[str, ...]:
    formats = m.manifest.formats
    return (m.name, m.manifest.weight_recipe.label, formats["ple"], str(m.manifest.spec.max_position_embeddings), _size(m.size_bytes),
            _fit(m.plan), f"{m.path}{' (bundled)' if m.bundled else ''}")
