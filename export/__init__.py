"""Export stage: a Hugging Face Gemma 4 checkpoint becomes an edge-runtime artifact (needs onnx, not torch)."""

from edge_runtime.errors import EdgeRuntimeError

try:
    import onnx  # noqa: F401
except ModuleNotFoundError as exc:
    raise EdgeRuntimeError("exporting needs the onnx package: pip install 'edge-runtime[export]'") from exc

from edge_runtime.export.exporter import export_checkpoint

__all__ = ["export_checkpoint"]
