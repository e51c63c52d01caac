"""The command line's conventions (llama.cpp's tools, Ollama): --version, -h, examples in every help, flags shown
and parsed as flags, option names whole at 80 columns, shell completion, usage errors as one line."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import typer

import edge_runtime
from edge_runtime.cli import app

ROOT = Path(__file__).resolve().parents[1]
GROUP = typer.main.get_command(app)
COMMANDS = {name: command for name, command in GROUP.commands.items() if name != "profiles"}
COMMANDS.update({f"profiles {name}": command for name, command in GROUP.commands["profiles"].commands.items()})


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "80"})


def test_version_comes_from_one_place():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout == f"edge-runtime {edge_runtime.__version__}\n"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "edge_runtime.version.__version__"}


@pytest.mark.parametrize("name", ["", "profiles", *COMMANDS])
def test_every_help_answers_to_h_and_ends_with_real_examples(name):
    words = name.split()
    short, long = cli(*words, "-h"), cli(*words, "--help")
    assert short.returncode == long.returncode == 0 and short.stdout == long.stdout and short.stderr == ""
    help_text = long.stdout
    assert "<bool>" not in help_text and "…" not in help_text and "╭" not in help_text
    examples = help_text.rstrip("\n").split("\n  Examples:\n")[1].splitlines()
    assert 2 <= len(examples) <= 4, examples
    for line in examples:
        words = shlex.split(line)
        words = words[words.index("edge-runtime") + 1:]
        words = words[:words.index("<")] if "<" in words else words
        if name:
            assert " ".join(words).startswith(name), line
            command = COMMANDS.get(name) or GROUP.commands[name]
            command.make_context(name, words[len(name.split()):])  # raises on an unknown option or a bad value
        else:
            assert words[0] in GROUP.commands, line


@pytest.mark.parametrize("name", COMMANDS)
def test_option_names_are_whole_and_flags_take_no_value_at_80_columns(name):
    command = COMMANDS[name]
    help_text = cli(*name.split(), "--help").stdout
    for param in command.params:
        names = [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else []
        for option in names:
            assert option in help_text, (name, option)
        if getattr(param, "is_flag", False):
            on = next(o for o in param.opts if o.startswith("--"))
            declared = next(line.strip().split("  ")[0] for line in help_text.splitlines()
                            if line.strip().startswith(on) or f", {on}" in line)
            assert "<" not in declared, declared  # listed as a flag: no <bool> or other value placeholder
            required = [p for p in command.params if p.param_type_name == "argument" and p.required]
            with pytest.raises(typer.BadParameter, match="a flag takes no value, got 'true'"):
                command.make_context(name, [on, "true", *["x"] * len(required)])


def test_a_flag_given_a_value_is_refused_as_a_usage_error():
    """`run --json true` used to run the prompt "true"; `plan --json false` read "false" as the checkpoint."""
    for args in (("run", "--json", "true"), ("plan", "-m", "x.art", "--json", "false"),
                 ("serve", "--prompt-cache", "no")):
        result = cli(*args)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith(f"error: invalid value for '{args[-2]}': a flag takes no value, got "
                                        f"'{args[-1]}'; write {args[-2]} alone")
    assert cli("run", "--stats", "off").stderr == ("error: invalid value for '--stats': a flag takes no value, got "
                                                   "'off'; write --stats alone or --no-stats (see edge-runtime run "
                                                   "--help)\n")


@pytest.mark.parametrize("args,line", [
    (("run", "hi", "--bogus"), "error: no such option: --bogus (see edge-runtime run --help)"),
    (("run", "hi", "-n", "many"), ("error: invalid value for '-n' / '--max-new-tokens': Input should be a valid "
                                  "integer, unable to parse string as an integer (see edge-runtime run --help)")),
    (("run",), "error: missing argument 'PROMPT' (see edge-runtime run --help)"),
    (("frob",), "error: no such command 'frob' (see edge-runtime --help)"),
    (("profiles", "shw"), "error: no such command 'shw'. Did you mean 'show'? (see edge-runtime profiles --help)"),
    (("info", "a.art", "extra"), "error: got unexpected extra argument(s) (extra) (see edge-runtime info --help)"),
])
def test_usage_errors_are_one_line_with_exit_code_1(args, line):
    """click drew a box-drawn panel of several lines and exited 2, which `plan` uses for "does not fit"."""
    result = cli(*args)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", line + "\n")


def test_shell_completion_is_available():
    help_text = cli("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    completed = subprocess.run([sys.executable, "-m", "edge_runtime"], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "_EDGE_RUNTIME_COMPLETE": "complete_bash",
                                    "COMP_WORDS": "edge-runtime profiles s", "COMP_CWORD": "2"})
    assert completed.returncode == 0 and completed.stdout.split() == ["show"]
    script = cli("--show-completion", "bash")
    assert script.returncode == 0 and "_EDGE_RUNTIME_COMPLETE=complete_bash" in script.stdout
