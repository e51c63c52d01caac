"""A checkpoint named by its Hugging Face repo id (`owner/name`), downloaded through huggingface_hub.

huggingface_hub does the downloading so that the user's token, cache (HF_HOME, HF_HUB_CACHE), mirror (HF_ENDPOINT),
offline mode (HF_HUB_OFFLINE) and resumption behave as in every other Hugging Face tool, and a checkpoint already
in that cache is not fetched again. It is imported only when a repo id is given: the runtime never needs it.
Only the files export reads are fetched (a Gemma repo also holds other formats); each error it raises becomes one
line saying what to do, always including the way around the network: a local checkpoint directory.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path

from edge_runtime.artifact import CHAT_TEMPLATE_FILE, GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from edge_runtime.errors import CheckpointError, EdgeRuntimeError
from edge_runtime.safetensors_reader import INDEX_FILE

# The Hub's rule for model ids, less its length limit and its ban on "--" and "..", which it reports itself.
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
CHECKPOINT_FILES = ["config.json", "*.safetensors", INDEX_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                    GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE]
OR_LOCAL = "or pass a local checkpoint directory instead"


def is_repo_id(text: str) -> bool:
    return _REPO_ID.fullmatch(text) is not None


def checkpoint_dir(source: str, revision: str | None = None, progress_bars: bool = True,
                   before_download: Callable[[Path], None] | None = None) -> Path:
    """The checkpoint directory `source` names: itself when it is a local directory, else the snapshot of the
    Hugging Face repo of that id (downloaded, or found in the Hugging Face cache; see `download_checkpoint`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if revision is not None:
            raise EdgeRuntimeError(f"--revision {revision}: {source} is a local directory; --revision applies only "
                                   "to a Hugging Face repo id (owner/name)")
        return path
    if path.exists() or not is_repo_id(source):
        raise CheckpointError(f"{source}: no such checkpoint directory, and not a Hugging Face repo id (owner/name); "
                              "pass a local checkpoint directory (config.json + safetensors) or a repo id such as "
                              "google/gemma-4-E2B-it")
    return download_checkpoint(source, revision, progress_bars, before_download)


def download_checkpoint(repo_id: str, revision: str | None = None, progress_bars: bool = True,
                        before_download: Callable[[Path], None] | None = None) -> Path:
    """The local snapshot of `repo_id` at `revision` (default: main) holding the files export reads.

    huggingface_hub draws its own progress bars on stderr, even when stderr is a log file; `progress_bars=False`
    turns them off for the rest of the process (huggingface_hub has no other switch than a global one).
    `before_download(hub_cache)` runs first, with the directory the snapshot will be in: a check that would fail
    after the download (an export destination already taken) fails before hours of it instead.
    """
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise EdgeRuntimeError(f"downloading {repo_id} needs huggingface_hub: pip install 'edge-runtime[export]', "
                               f"{OR_LOCAL}") from None
    if before_download is not None:
        before_download(Path(constants.HF_HUB_CACHE))
    if not progress_bars:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    at = f" at revision {revision}" if revision else ""
    try:
        # Subdirectories hold other formats (original/, onnx/, ...) that export never reads.
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=CHECKPOINT_FILES,
                                      ignore_patterns=["*/*"]))
    except GatedRepoError:
        message = (f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} and log in with "
                   f"`hf auth login` (or set HF_TOKEN), {OR_LOCAL}")
    except RevisionNotFoundError:
        message = (f"{repo_id} has no revision {revision or 'main'!r} on the Hugging Face Hub; pass an existing "
                   f"branch, tag or commit with --revision, {OR_LOCAL}")
    except RepositoryNotFoundError:
        message = (f"{repo_id}: no such local directory, and no such repo on the Hugging Face Hub (or it is private: "
                   f"log in with `hf auth login` or set HF_TOKEN); check the id, {OR_LOCAL}")
    except LocalEntryNotFoundError:
        why = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "no network?"
        message = (f"{repo_id}{at}: cannot reach the Hugging Face Hub ({why}), and it is not complete in the Hugging "
                   f"Face cache ({constants.HF_HUB_CACHE}); connect and run this again (files already downloaded "
                   f"are kept), {OR_LOCAL}")
    except (HfHubHTTPError, OSError, *_transport_errors()) as exc:
        first_line = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        message = (f"downloading {repo_id}{at} failed: {first_line}; run this again (files already downloaded are "
                   f"kept), {OR_LOCAL}")
    raise EdgeRuntimeError(message)


def _transport_errors() -> list[type[Exception]]:
    """The HTTP client's own connection errors, which a download that keeps failing mid-file lets through (the
    client is httpx2 from huggingface_hub 2, httpx in 1)."""
    errors = []
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except ImportError:
            continue
    return errors
