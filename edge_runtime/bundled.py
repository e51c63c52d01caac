"""The embedded default model: a small trained Gemma-4-architecture checkpoint shipped in the package.

It is shipped as a checkpoint, not an artifact, so that the first run exercises the same export path a
real model takes; the artifact is written once into the user cache directory, keyed by the checkpoint's
contents and the artifact format version so that an upgrade re-exports instead of misreading.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from edge_runtime.artifact import FORMAT_VERSION, MANIFEST
from edge_runtime.errors import EdgeRuntimeError, UnwritableError
from edge_runtime.user_cache import cache_dir

BUNDLED_CHECKPOINT = Path(__file__).parent / "bundled" / "gemma4-tiny"
BUNDLED_NAME = BUNDLED_CHECKPOINT.name


def _fingerprint(checkpoint: Path) -> str:
    digest = hashlib.sha256(f"format {FORMAT_VERSION}".encode())
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def bundled_artifact_path() -> Path:
    """Where the bundled model's artifact is (or will be, once exported) in the cache."""
    return cache_dir() / f"{BUNDLED_NAME}-{_fingerprint(BUNDLED_CHECKPOINT)}"


def default_artifact(progress=None) -> Path:
    """Path of the bundled model's artifact, exporting it on first use."""
    target = bundled_artifact_path()
    if not (target / MANIFEST).is_file():
        # Imported only when an export is due: the runtime must load without the [export] extra (onnx), and the
        # exporter is built on runtime modules, so an import at the top would make runtime and exporter one circle.
        from edge_runtime.export import export_checkpoint

        kwargs = {"progress": progress} if progress else {}
        try:
            export_checkpoint(BUNDLED_CHECKPOINT, target, force=True, **kwargs)
        except UnwritableError as exc:
            raise EdgeRuntimeError(f"cannot write the bundled model's artifact into {target.parent}: {exc.reason} "
                                   f"({exc.path}); it is exported there on first use, so set EDGE_RUNTIME_CACHE to a "
                                   "writable directory") from None
    return target
