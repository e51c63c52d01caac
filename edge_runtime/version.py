"""The release version, in a module of its own so that the exporter (which stamps it into every manifest), the
CLI and the build read it without importing the SDK that `edge_runtime/__init__` gathers."""

__version__ = "0.1.0"
