"""edge-runtime: Gemma 4 E2B/E4B offline on a Raspberry Pi or a phone CPU, from an exported artifact."""

__version__ = "0.1.0"

from edge_runtime.model import Model, load

__all__ = ["Model", "__version__", "load"]
