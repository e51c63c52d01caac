"""The README's code blocks, run as a reader would run them.

Each block is run as written on the bundled model unless a `<!-- readme-test: KIND -->` line before it says
otherwise, and then the text before it must say so to the reader too:
- setup: the two set-up commands (this environment did the installing; .ci/run must be the second verbatim);
- checkpoint-run: needs a Gemma 4 checkpoint, run with the bundled checkpoint in its place;
- checkpoint, gemma3n-checkpoint, network, kiosk: need a real (Gemma 4 or Gemma 3n) checkpoint, the network, or the
  kiosk itself: every `edge-runtime` command in them is parsed by the command line (an unknown option or a bad value
  fails), none is run;
- server: run against `edge-runtime serve` on the bundled model;
- emulation: the ARM64 check, which .ci/run runs (as root, for minutes): its commands must name its executable.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import serving
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<kind>[\w-]+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```\n", re.DOTALL)
# What the reader is told before a block that does not run as written, by kind.
LABELS = {"setup": "Set-up", "checkpoint-run": "needs a Gemma 4 checkpoint", "checkpoint": "needs a Gemma 4 checkpoint",
          "gemma3n-checkpoint": "needs a Gemma 3n checkpoint", "network": "needs the network", "kiosk": "on the kiosk", "server": "With `edge-runtime serve` running",
          "emulation": "run by `.ci/run`, not by the tests"}
DOCUMENTS = {"ini", ""}  # a file's contents and the layout listing: text to read, not to run
GROUP = typer.main.get_command(app)


def blocks() -> list[tuple[str, str, str, str]]:
    """(kind, language, body, the text before the block) for every fenced block of the README."""
    text = README.read_text()
    found = []
    for match in BLOCK.finditer(text):
        kind = match["kind"] or ("document" if match["lang"] in DOCUMENTS else "run")
        before = text[text.rfind("\n\n", 0, match.start() - 2):match.start()]
        if kind == "setup":
            before = text[text.rfind("\n## ", 0, match.start()):match.start()]
        found.append((kind, match["lang"], match["body"], " ".join(before.split())))
    return found


def of_kind(*kinds: str) -> list[tuple[str, str]]:
    return [(lang, body) for kind, lang, body, _ in blocks() if kind in kinds]


def commands(body: str) -> list[str]:
    """The block's command lines: backslash continuations joined, comments dropped."""
    return [line for line in body.replace("\\\n", " ").splitlines() if shlex.split(line, comments=True)]


@pytest.fixture()
def shell_env(tmp_path) -> dict[str, str]:
    """PATH with an `edge-runtime` that is this Python's (as `pip install` puts one there), a fresh cache."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "edge-runtime"
    launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m edge_runtime "$@"\n')
    launcher.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "EDGE_RUNTIME_CACHE": str(tmp_path / "cache")}


def run_bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_block_is_run_or_labelled():
    kinds = [kind for kind, *_ in blocks()]
    assert set(kinds) <= {"run", "document", *LABELS}, kinds
    assert kinds.count("run") >= 2 and kinds.count("setup") == 2
    for kind, lang, body, before in blocks():
        if kind == "document":
            assert lang in DOCUMENTS
            continue
        assert lang in ("bash", "python"), (kind, lang, body[:60])
        if kind != "run":
            assert LABELS[kind] in before, f"the text before this {kind} block does not say so:\n{before}\n{body}"


def test_the_set_up_commands(tmp_path, shell_env):
    (_, install_and_run), (_, tests) = of_kind("setup")
    install, run = install_and_run.strip().split(" && ")
    assert install == 'pip install ".[export]"'  # what this environment already did, editable
    result = run_bash(run, tmp_path, shell_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "generated" in result.stderr
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci.splitlines()


def test_blocks_run_as_written_on_the_bundled_model(tmp_path, shell_env):
    for lang, body in of_kind("run"):
        if lang == "bash":
            for line in commands(body):
                result = run_bash(line, tmp_path, shell_env)
                assert result.returncode == 0, (line, result.stderr)
        else:
            result = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=shell_env, capture_output=True,
                                    text=True, timeout=600)
            assert result.returncode == 0, result.stderr
            assert "GenerationStats(" in result.stdout


def test_the_first_session_with_the_bundled_checkpoint_standing_in(tmp_path, shell_env):
    """The device session, with the bundled checkpoint as the downloaded one and its 512-token context."""
    ((_, body),) = of_kind("checkpoint-run")
    lines = commands(body)
    assert lines[0] == 'pip install ".[export]"'
    names = [shlex.split(line, comments=True)[1] for line in lines[1:]]
    assert names == ["profiles", "plan", "export", "plan", "chat"]
    for line in lines[1:]:
        line = line.replace("/path/to/gemma-4-E2B-it", str(BUNDLED_CHECKPOINT)).replace("--context 8192",
                                                                                        "--context 512")
        stdin = None
        if " chat " in line:
            # Seeded: unseeded, the session printed one line in 1 of 30 runs (a reply that ended at once).
            line, stdin = line + " --seed 1", "Hello there.\n/stats\nAnd then?\n/quit\n"
        result = subprocess.run(["bash", "-e", "-c", line], cwd=tmp_path, env=shell_env, input=stdin,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (line, result.stderr)
        if " chat " in line:
            assert len(result.stdout.strip().splitlines()) >= 2 and "cached" in result.stderr
        if " plan " in line:
            assert "fits" in result.stdout
    assert (tmp_path / "e2b.art" / "manifest.json").is_file()


def test_commands_that_cannot_run_here_parse():
    """Blocks for a real checkpoint, the network or the kiosk: each edge-runtime command is accepted by the CLI."""
    checked = 0
    for _, body in of_kind("checkpoint", "gemma3n-checkpoint", "network", "kiosk"):
        for line in commands(body):
            for part in re.split(r"&&|\|", line):
                words = shlex.split(part, comments=True)
                words = words[1:] if words[:1] == ["sudo"] else words
                if words[:1] != ["edge-runtime"]:
                    continue
                command = GROUP.commands[words[1]]
                command.make_context(words[1], words[2:])  # raises on an unknown option or a bad value
                checked += 1
    assert checked >= 15


def test_the_emulation_commands_name_the_check():
    ((_, body),) = of_kind("emulation")
    for line in commands(body):
        program = ROOT / shlex.split(line, comments=True)[0]
        assert program.is_file() and os.access(program, os.X_OK), line
    assert "tools/arm64/check --smoke" in (ROOT / ".ci" / "run").read_text()


def test_the_server_blocks_against_a_running_server(bundled, tmp_path):
    (python_lang, client), (bash_lang, curl) = of_kind("server")
    assert (python_lang, bash_lang) == ("python", "bash")
    with serving(bundled, tmp_path / "serve.log") as (_, url):
        address = url.removeprefix("http://")
        result = subprocess.run([sys.executable, "-c", client.replace("127.0.0.1:8080", address)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.strip(), result.stderr
        result = run_bash(curl.replace("127.0.0.1:8080", address), tmp_path, {**os.environ, "KEY": ""})
        assert result.returncode == 0 and result.stdout.rstrip().endswith("data: [DONE]"), result.stdout[-300:]
