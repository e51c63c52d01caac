"""edge-runtime: Gemma 4 E2B/E4B offline on a Raspberry Pi or a phone CPU, from an exported artifact."""

import os

# Attention's matrix products are small (a few query rows against the cache), and OpenBLAS's own threads
# spin between calls against onnxruntime's pool on the same cores: an E2B decode step took 238 ms with them,
# 104 ms without (2 cores). This only takes effect if numpy is not imported yet; set it yourself otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from edge_runtime.conversation import Conversation
from edge_runtime.errors import EdgeRuntimeError, RequestError
from edge_runtime.model import GenerationStats, Model, load
from edge_runtime.model_store import list_models
from edge_runtime.profiles import Profile, detect_profile, load_profile
from edge_runtime.reply_parser import ReplyStream, parse_reply
from edge_runtime.version import __version__

__all__ = ["Conversation", "EdgeRuntimeError", "GenerationStats", "Model", "Profile", "ReplyStream", "RequestError",
           "__version__", "detect_profile", "list_models", "load", "load_profile", "parse_reply"]
