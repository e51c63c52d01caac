"""The README's first session, run as written: the commands a new user types, with the bundled checkpoint
standing in for a downloaded Gemma 4 (the install line is what this environment already did)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from edge_runtime.bundled import BUNDLED_CHECKPOINT

README = Path(__file__).resolve().parents[1] / "README.md"


def session_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"## A first session on a device.*?```bash\n(.*?)```", text, re.DOTALL).group(1)
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    # The bundled model's context is 512 tokens, where Gemma 4's is 128k.
    lines = [line.replace("/path/to/gemma-4-E2B-it", str(BUNDLED_CHECKPOINT)).replace("--context 8192", "--context 512")
             for line in lines]
    return [shlex.split(line) for line in lines if line]


def test_the_first_session_works_as_written(tmp_path):
    commands = session_commands()
    assert commands[0][:2] == ["pip", "install"]
    names = [c[1] for c in commands[1:]]
    assert names == ["profiles", "plan", "export", "plan", "chat"]
    env = {**os.environ, "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")}
    for command in commands[1:]:
        assert command[0] == "edge-runtime"
        stdin = "Hello there.\n/stats\nAnd then?\n/quit\n" if command[1] == "chat" else None
        result = subprocess.run([sys.executable, "-m", "edge_runtime", *command[1:]], cwd=tmp_path, input=stdin,
                                capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, (command, result.stderr)
        if command[1] == "chat":
            assert len(result.stdout.strip().splitlines()) >= 2 and "cached" in result.stderr
        if command[1] == "plan":
            assert "fits" in result.stdout
    assert (tmp_path / "e2b.art" / "manifest.json").is_file()
