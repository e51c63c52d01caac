"""SHA-256 checks at load time that do not re-hash gigabytes on every start.

`edge-runtime verify` hashes every file. Loading hashes a file only when it is new to this machine or has
changed since it was last found intact: the (size, mtime, inode) of each file that matched its manifest hash is
remembered in the user cache (`verified.json`; entries of files since deleted are dropped whenever it is written). So the first load after an export or a copy checks everything
(one read of the artifact: 15 s for E2B int4 on the development VM; at an SD card's 90 MB/s, about a minute),
and a file rewritten since (a flipped byte, a half-finished copy) is caught by name. What this cannot see is a
change that keeps size and mtime, such as bit rot on the medium: `verify` is for that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edge_runtime.artifact import Manifest, sha256_file
from edge_runtime.errors import ArtifactError
from edge_runtime.progress import Progress, no_progress
from edge_runtime.user_cache import cache_dir

STAMPS_FILE = "verified.json"


def _read_stamps(path: Path) -> dict[str, list]:
    try:
        stamps = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamps(path: Path, stamps: dict[str, list]) -> None:
    """Best effort and atomic: a read-only home directory only means hashing again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(stamps))
        tmp.replace(path)
    except OSError:
        pass


def check_artifact(artifact: Path, manifest: Manifest, progress: Progress = no_progress) -> None:
    """Raise ArtifactError naming the first file whose SHA-256 differs from the manifest.

    Reports ("checking", MiB hashed, MiB to hash) as it goes: the first check of E2B reads 5 GB.
    """
    stamps_path = cache_dir() / STAMPS_FILE
    stamps = _read_stamps(stamps_path)
    pending = {}
    for name, entry in manifest.files.items():
        file = (Path(artifact) / name).resolve()
        info = file.stat()
        stamp = [info.st_size, info.st_mtime_ns, info.st_ino, entry["sha256"]]
        if stamps.get(str(file)) != stamp:
            pending[name] = (file, stamp)
    total, done = sum(stamp[0] for _, stamp in pending.values()) >> 20, 0
    for name, (file, stamp) in pending.items():
        progress("checking", done, total)
        done += stamp[0] >> 20
        if sha256_file(file) != stamp[3]:
            raise ArtifactError(f"{Path(artifact) / name}: SHA-256 differs from the manifest; the artifact is damaged, "
                                "re-export or re-copy it (edge-runtime verify lists every damaged file)")
        stamps[str(file)] = stamp
    if pending:
        _write_stamps(stamps_path, {path: stamp for path, stamp in stamps.items() if Path(path).exists()})
