"""edge-runtime: Gemma 4 E2B/E4B offline on a Raspberry Pi or a phone CPU, from an exported artifact."""

import importlib
import os

# Attention's matrix products are small (a few query rows against the cache), and OpenBLAS's own threads
# spin between calls against onnxruntime's pool on the same cores: an E2B decode step took 238 ms with them,
# 104 ms without (2 cores). This only takes effect if numpy is not imported yet; set it yourself otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The SDK's names, imported when first used (PEP 562): the `edge-runtime` command imports the package before it
# decides whether to start itself again (edge_runtime/__main__.py), and numpy and onnxruntime cost ~0.25 s to import.
_EXPORTS = {
    "Conversation": "edge_runtime.conversation", "EdgeRuntimeError": "edge_runtime.errors",
    "RequestError": "edge_runtime.errors", "GenerationStats": "edge_runtime.model", "Model": "edge_runtime.model",
    "load": "edge_runtime.model", "list_models": "edge_runtime.model_store", "Profile": "edge_runtime.profiles",
    "detect_profile": "edge_runtime.profiles", "load_profile": "edge_runtime.profiles",
    "ReplyStream": "edge_runtime.reply_parser", "parse_reply": "edge_runtime.reply_parser",
    "__version__": "edge_runtime.version",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
