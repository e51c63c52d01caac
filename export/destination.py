"""Where an export lands: written beside its destination, renamed into place, replacing only an artifact.

A user's checkpoint can be a 10 GB download and a directory handed to `-o` may hold anything, so export never
deletes what it did not make. It writes into `.<name>.partial-<pid>` next to the destination, and the final
rename is the only step that makes the artifact visible. `--force` replaces what is there only when it is an
edge-runtime artifact holding nothing but its own files, and never the checkpoint being exported. A process
killed mid-export (SIGKILL, power loss) cannot clean up after itself: the next export to the same place removes
the leftovers whose process is gone, when every file in them is one an artifact holds, and says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from edge_runtime.artifact import FORMAT_NAME, MANIFEST, is_artifact_file
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.progress import Notice

LISTED = 5  # entries named in a refusal; the rest are counted


def partial_path(out: Path) -> Path:
    """This process's work directory for `out`."""
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def check_destination(out: Path, checkpoint: Path, force: bool) -> None:
    """Refuse, before any work, a destination that export would have to destroy something of the user's to use."""
    if out.resolve() == checkpoint.resolve() or checkpoint.resolve().is_relative_to(out.resolve()):
        raise EdgeRuntimeError(f"{out}: this is where the checkpoint being exported lives ({checkpoint}); "
                               "choose another output path")
    existing = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if existing != out:
        if not existing.is_dir():
            raise EdgeRuntimeError(f"{out}: {existing} is a file, not a directory; choose another output path")
        return
    if not force:
        raise EdgeRuntimeError(f"{out}: already exists; choose another path or pass --force to replace it "
                               "(only an edge-runtime artifact is ever replaced)")
    if out.is_symlink() or not out.is_dir():
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise EdgeRuntimeError(f"{out}: is {kind}, not an edge-runtime artifact; --force only replaces artifacts, "
                               "so choose another output path")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not _is_artifact(out):
        raise EdgeRuntimeError(f"{out}: is not an edge-runtime artifact (no {FORMAT_NAME} {MANIFEST}) and holds "
                               f"{_listing(entries)}; --force only replaces artifacts, so choose another output path")
    foreign = [name for name in entries if not is_artifact_file(name)]
    if foreign:
        raise EdgeRuntimeError(f"{out}: holds files that are not part of the artifact ({_listing(foreign)}); "
                               "--force would delete them: move them out first or choose another output path")


def remove_stale_partials(out: Path, notice: Notice) -> None:
    """Remove what earlier exports to `out` left when they were killed: their process is gone and every file in
    them is one export writes."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:partial|old)-(\d+)")
    for entry in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir() or _running(int(match[1])):
            continue
        if all(is_artifact_file(p.name) and p.is_file() for p in entry.iterdir()):
            shutil.rmtree(entry)
            notice(f"removed {entry}, left by an export that was interrupted (process {match[1]} is gone)")


def replace(tmp: Path, out: Path) -> None:
    """Make the finished artifact visible at `out`; a replaced artifact is moved aside first and deleted last, so
    that at every moment `out` is a complete artifact."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _is_artifact(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    more = len(names) - LISTED
    return f"{shown} and {more} more" if more > 0 else shown
