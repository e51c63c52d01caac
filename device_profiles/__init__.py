"""The bundled device profiles: one TOML file per device class, read by `edge_runtime.profiles`.

A package (not a data directory inside `edge_runtime`) so that the profiles install as package data beside the
runtime and can be read and edited as plain files; `PROFILE_DIR` is where they live once installed.
"""

from pathlib import Path

PROFILE_DIR = Path(__file__).parent
