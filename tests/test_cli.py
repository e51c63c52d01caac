"""The `edge-runtime` command as a user runs it: export, run (streaming), info, and the bundled default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import edge_runtime


def cli(*args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, input=stdin)


def test_export_then_run_greedy_matches_sdk(checkpoints, tmp_path):
    out = tmp_path / "artifact"
    exported = cli("export", str(checkpoints["shared-mqa-wide"]), "-o", str(out), "--ple", "fp32")
    assert exported.returncode == 0, exported.stderr
    assert json.loads((out / "manifest.json").read_text())["formats"]["ple"] == "fp32"
    result = cli("run", "-m", str(out), "the quick brown fox", "-n", "12", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    expected = edge_runtime.load(out).generate("the quick brown fox", max_new_tokens=12, temperature=0)
    assert result.stdout == expected + "\n"
    assert "generated" in result.stderr and "tok/s" in result.stderr


def test_export_int4_from_the_command_line(checkpoints, tmp_path):
    out = tmp_path / "q4"
    exported = cli("export", str(checkpoints["shared-gqa"]), "-o", str(out), "--weights", "int4", "--block-size",
                   "64", "--ple", "int8")
    assert exported.returncode == 0, exported.stderr
    formats = json.loads((out / "manifest.json").read_text())["formats"]
    assert (formats["weights"], formats["block_size"], formats["ple"]) == ("int4", 64, "int8")
    refused = cli("export", str(checkpoints["shared-gqa"]), "-o", str(tmp_path / "bad"), "--block-size", "48")
    assert refused.returncode == 1
    assert refused.stderr == "error: --block-size 48: not available; choose one of 32, 64, 128\n"
    assert not (tmp_path / "bad").exists()


def test_run_seed_makes_sampling_reproducible(artifacts):
    args = ("run", "-m", str(artifacts["shared-gqa"]), "hello", "-n", "10", "--seed", "5", "--temperature", "1")
    assert cli(*args).stdout == cli(*args).stdout


def test_info_human_and_json(artifacts):
    path = artifacts["shared-mqa-wide"]
    text = cli("info", str(path))
    assert text.returncode == 0
    assert text.stdout.startswith(f"{path}: Gemma 4 (Gemma4ForConditionalGeneration), edge-runtime ")  # the family's
    assert "layers 6 (4 sliding, window 8; 2 full)" in text.stdout
    assert "KV cache in 4 layers (2 share it)" in text.stdout
    data = json.loads(cli("info", str(path), "--json").stdout)
    assert data["formats"] == {"weights": "fp32", "block_size": 32, "ple": "bf16"}
    assert data["kv_cache_layers"] == 4 and data["bytes"] == sum(data["files"].values())


@pytest.mark.parametrize("args,message", [
    (("info", "/nonexistent/model"), "error: /nonexistent/model: no such artifact directory"),
    (("run", "-m", "/nonexistent/model", "hi"), "error: /nonexistent/model: no such artifact directory"),
    (("export", "/nonexistent/ckpt", "-o", "/tmp/never-written"), "error: /nonexistent/ckpt: no such checkpoint"),
])
def test_missing_paths_are_one_line_errors(args, message):
    result = cli(*args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)


def test_run_rejects_bad_sampling_value(artifacts):
    result = cli("run", "-m", str(artifacts["shared-gqa"]), "hi", "--top-p", "1.5")
    assert result.returncode == 1 and result.stderr.strip() == "error: top_p=1.5: must be in (0, 1]"


def test_bundled_model_is_the_default(tmp_path):
    """First run exports the bundled checkpoint into the cache; the second reuses it."""
    env = {"EDGE_RUNTIME_CACHE": str(tmp_path)}
    first = cli("run", "The list", "-n", "20", "--temperature", "0", env=env)
    assert first.returncode == 0, first.stderr
    cached = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()
    second = cli("run", "The list", "-n", "20", "--temperature", "0", env=env)
    assert second.stdout == first.stdout and len(first.stdout.split()) >= 5
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == cached


def test_verify_names_the_damaged_file(artifacts, tmp_path):
    import shutil

    from edge_runtime.families.contract import segment_graph

    copy = tmp_path / "copy"
    shutil.copytree(artifacts["shared-gqa"], copy)
    intact = cli("verify", str(copy))
    assert intact.returncode == 0, intact.stderr
    assert "every file matches its SHA-256" in intact.stdout
    name = segment_graph(2)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    damaged = cli("verify", str(copy))
    assert damaged.returncode == 1
    assert damaged.stderr.strip() == (f"error: {copy}: SHA-256 mismatch in {name}; the artifact is damaged, "
                                      "re-export or re-copy it")
    missing = cli("verify", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no such artifact directory" in missing.stderr


def test_verify_json_is_always_one_object_naming_every_damaged_file(artifacts, tmp_path):
    """--json used to print nothing when a file was missing or of the wrong size (only an error on stderr)."""
    import shutil

    from edge_runtime.families.contract import segment_graph

    copy = tmp_path / "copy"
    shutil.copytree(artifacts["shared-gqa"], copy)
    intact = cli("verify", str(copy), "--json")
    assert intact.returncode == 0 and intact.stderr == ""
    assert json.loads(intact.stdout) == {"artifact": str(copy), "ok": True, "damaged": {}, "error": None}
    flipped, truncated, removed = segment_graph(2), "weights.bin", "ple.bin"
    data = bytearray((copy / flipped).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / flipped).write_bytes(bytes(data))
    (copy / truncated).write_bytes((copy / truncated).read_bytes()[:-1])
    (copy / removed).unlink()
    damaged = cli("verify", str(copy), "--json")
    error = (f"{copy}: SHA-256 mismatch in {flipped}; size differs from the manifest in {truncated}; missing {removed}; "
             "the artifact is damaged, re-export or re-copy it")
    assert damaged.returncode == 1 and damaged.stderr == f"error: {error}\n"
    assert json.loads(damaged.stdout) == {"artifact": str(copy), "ok": False, "error": error, "damaged": {
        flipped: "SHA-256 mismatch", truncated: "size differs from the manifest", removed: "missing"}}
    nothing = cli("verify", str(tmp_path / "nothing"), "--json")
    error = f"{tmp_path}/nothing: no such artifact directory (create one with `edge-runtime export`)"
    assert nothing.returncode == 1 and nothing.stderr == f"error: {error}\n"
    assert json.loads(nothing.stdout) == {"artifact": str(tmp_path / "nothing"), "ok": False, "damaged": {},
                                          "error": error}


def test_run_reads_the_prompt_from_stdin_and_prints_json(artifacts):
    args = ("-m", str(artifacts["shared-gqa"]), "-n", "8", "--temperature", "0")
    given = cli("run", "the quick brown fox", *args)
    piped = cli("run", "-", *args, stdin="the quick brown fox")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == given.stdout and len(given.stdout.strip()) > 0
    data = json.loads(cli("run", "the quick brown fox", *args, "--json").stdout)
    assert data["text"] + "\n" == given.stdout
    assert data["generated_tokens"] == 8 and data["finish_reason"] == "length" and data["cached_tokens"] == 0


def test_chat_session_keeps_turns_in_the_cache(bundled):
    """A piped session: three turns, /stats after each, /system and /reset; later turns reuse the cache."""
    path, env = bundled
    session = ("Tell me about the sea.\n/stats\nAnd the river?\n/stats\n/system Be brief.\nThanks.\n/stats\n"
               "/nonsense\n/quit\nnever read\n")
    result = cli("chat", "-n", "12", "--temperature", "0", "--kv", "fp32", stdin=session, env=env)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.split("\n")
    m = edge_runtime.load(path, kv="fp32")
    first = m.chat([{"role": "user", "content": "Tell me about the sea."}], max_new_tokens=12, temperature=0)
    assert result.stdout.startswith(first + "\n")
    stats = [line for line in result.stderr.splitlines() if line.startswith("prompt ")]
    cached = [int(line.split("(")[1].split()[0]) for line in stats]
    assert cached[0] == 0 and cached[1] > 0, stats
    assert "system prompt set, conversation cleared" in result.stderr
    assert "unknown command /nonsense" in result.stderr
    after_reset = m.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Thanks."}],
                         max_new_tokens=12, temperature=0)
    assert after_reset in replies or after_reset + "\n" in result.stdout
    assert "never read" not in result.stdout


def test_chat_with_tools_shows_the_call_asks_for_its_result_and_goes_on(bundled, tmp_path):
    """`chat --tools --think`, piped: the thought dimmed on stderr, the call shown, its result read from the next
    line, then the model's answer on stdout, exactly as the SDK's conversation gives them."""
    path, env = bundled
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather now in a city.",
                                               "parameters": {"type": "object", "properties": {
                                                   "city": {"type": "string"}}, "required": ["city"]}}}]
    (tmp_path / "tools.json").write_text(json.dumps({"tools": tools}))
    result = cli("chat", "--tools", str(tmp_path / "tools.json"), "--think", "-n", "60", "--temperature", "0",
                 "--kv", "fp32", stdin="What is the weather in Oslo?\n21 C, clear\n", env=env)
    assert result.returncode == 0, result.stderr
    conversation = edge_runtime.load(path, kv="fp32").conversation(
        tools=tools, chat_template_kwargs={"enable_thinking": True})
    first = conversation.reply("What is the weather in Oslo?", max_new_tokens=60, temperature=0)
    for _ in first:
        pass
    [call] = first.message["tool_calls"]
    conversation.add_tool_result(call["id"], "21 C, clear")
    answer = "".join(conversation.reply(None, max_new_tokens=60, temperature=0).content())
    shown = f"] {call['function']['name']}({call['function']['arguments']})"
    assert shown in result.stderr
    assert result.stdout == (first.message["content"] or "") + answer + "\n"

    thought = cli("chat", "--think", "-n", "40", "--temperature", "0", "--kv", "fp32", stdin="Hi\n", env=env)
    reply = edge_runtime.load(path, kv="fp32").conversation(chat_template_kwargs={"enable_thinking": True}).reply(
        "Hi", max_new_tokens=40, temperature=0)
    for _ in reply:
        pass
    assert reply.message["reasoning_content"] in thought.stderr and reply.message["reasoning_content"]
    assert thought.stdout == reply.message["content"] + "\n"


def test_chat_tools_file_errors_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{tools: []}")
    (tmp_path / "dict.json").write_text('{"type": "function"}')
    for name, message in [("missing.json", (f"error: --tools {tmp_path / 'missing.json'}: cannot read it "
                                           "(No such file or directory)")),
                          ("bad.json", (f"error: --tools {tmp_path / 'bad.json'}: not valid JSON (Expecting property "
                                       "name enclosed in double quotes: line 1 column 2 (char 1))")),
                          ("dict.json", f"error: --tools {tmp_path / 'dict.json'}: must hold a list of tools")]:
        result = cli("chat", "--tools", str(tmp_path / name), stdin="")
        assert result.returncode == 1 and result.stderr.startswith(message), result.stderr


@pytest.mark.parametrize("args,message", [
    (("run", "hi", "--profile", "pi6"), "error: unknown profile 'pi6': choose one of android-12gb"),
    (("chat", "--profile", "pi6"), "error: unknown profile 'pi6': choose one of android-12gb"),
    (("run", "hi", "--context", "100000"), "error: context 100000 is larger than the model's 256"),
    (("run", "hi", "--context", "100000", "--profile", "none"),
     "error: context_length=100000: must be between 1 and the model's 256"),
    (("run", "word " * 40, "--context", "16"), "error: the prompt has 122 tokens but the context holds 16; shorten"),
])
def test_bad_run_and_chat_input_is_one_line(artifacts, args, message):
    result = cli(*args[:1], "-m", str(artifacts["shared-gqa"]), *args[1:])
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_names_a_damaged_file(artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifacts["shared-gqa"], copy)
    assert cli("run", "-m", str(copy), "hi", "-n", "2").returncode == 0
    with open(copy / "ple.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0x10]))
    for command in (("run", "-m", str(copy), "hi"), ("chat", "-m", str(copy))):
        result = cli(*command, stdin="hi\n")
        assert result.returncode == 1
        assert result.stderr.strip() == (f"error: {copy}/ple.bin: SHA-256 differs from the manifest; the artifact is "
                                         "damaged, re-export or re-copy it (edge-runtime verify lists every damaged "
                                         "file)")


def test_template_errors_are_one_line(checkpoints, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["shared-gqa"], ckpt)
    (ckpt / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }\n{% endfor %}")
    result = cli("export", str(ckpt), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: chat template {ckpt}/chat_template.jinja, line 1: ")
    assert not (tmp_path / "out").exists()
    (ckpt / "chat_template.jinja").write_text("{{ raise_exception('only user turns, please') }}")
    assert cli("export", str(ckpt), "-o", str(tmp_path / "out")).returncode == 0
    chat = cli("chat", "-m", str(tmp_path / "out"), stdin="hi\n")
    assert chat.returncode == 1
    assert chat.stderr.strip() == f"error: chat template {tmp_path}/out/chat_template.jinja: only user turns, please"


@pytest.mark.parametrize("args", [("run", "hi", "-t", "0"), ("chat", "-t", "0"), ("run", "hi", "--threads", "-2"),
                                  ("bench", "-t", "0"), ("perplexity", "--text-file", "x.txt", "-t", "0")])
def test_threads_below_one_are_refused(artifacts, args):
    """-t 0 used to be taken as "the default" without a word."""
    result = cli(*args[:1], "-m", str(artifacts["shared-gqa"]), *args[1:])
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"error: invalid value for '-t' / '--threads': Input should be greater than or equal to "
                             f"1 (see edge-runtime {args[0]} --help)\n")


@pytest.mark.parametrize("command", [("run", "-m", "{}", "hi"), ("chat", "-m", "{}"), ("info", "{}")])
def test_a_checkpoint_given_as_the_model_says_to_export_it(checkpoints, command):
    checkpoint = checkpoints["shared-gqa"]
    result = cli(*(part.format(checkpoint) for part in command), stdin="hi\n")
    assert result.returncode == 1
    assert result.stderr == (f"error: {checkpoint}: no manifest.json; this is not an edge-runtime artifact but a "
                             f"Hugging Face checkpoint; export it first: edge-runtime export {checkpoint} -o "
                             "shared-gqa.art\n")


def test_a_prompt_that_is_not_utf8_is_one_line_naming_the_byte(artifacts):
    """`printf 'The list \\xff is' | edge-runtime run -` used to end in TypeError: TextInputSequence must be str."""
    base = [sys.executable, "-m", "edge_runtime", "run", "-m", str(artifacts["shared-gqa"]), "-n", "2"]
    piped = subprocess.run([*base, "-"], input=b"The list \xff is", capture_output=True, timeout=120)
    assert piped.returncode == 1 and piped.stdout == b""
    assert piped.stderr.decode() == ("error: stdin: not UTF-8 text (invalid start byte, byte 0xff at offset 9); "
                                     "convert it to UTF-8 first, e.g. iconv -f latin1 -t utf-8\n")
    argument = subprocess.run([*base, b"The list \xe9t\xe9"], capture_output=True, timeout=120)
    assert argument.returncode == 1
    assert argument.stderr.decode().startswith("error: PROMPT: not UTF-8 text (invalid continuation byte, byte 0xe9 at "
                                               "offset 9); ")


def test_the_stats_line_is_never_wrapped(artifacts):
    """rich wrapped it at 80 columns whenever stderr was not a terminal."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "run", "-m", str(artifacts["shared-gqa"]),
                             "the quick brown fox", "-n", "12", "--seed", "1"], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert len(line) > 80 and re.fullmatch(r"prompt \d+ tokens \(0 cached\), [\d.]+ tok/s \| generated \d+ tokens, "
                                           r"[\d.]+ tok/s \| context \d+/256", line), line


def test_chat_refuses_a_message_it_cannot_take_and_goes_on(bundled):
    """A message longer than the context (or not UTF-8) used to end a piped chat with exit 1, losing the rest."""
    path, env = bundled
    long = "word " * 200
    session = f"Tell me about the sea.\n{long}\n".encode() + b"The list \xff is\nAnd the river?\n/stats\n"
    result = subprocess.run([sys.executable, "-m", "edge_runtime", "chat", "-n", "8", "--temperature", "0", "--kv",
                             "fp32", "--profile", "none", "-c", "128"], input=session, capture_output=True,
                            timeout=300, env={**os.environ, **env})
    m = edge_runtime.load(path, kv="fp32", context_length=128)
    conversation = m.conversation()
    replies = [conversation.say(q, max_new_tokens=8, temperature=0) for q in ("Tell me about the sea.", "And the river?")]
    assert result.returncode == 1
    assert result.stdout.decode() == "".join(f"{reply}\n" for reply in replies)
    alone = len(m.chat_prompt_ids([{"role": "user", "content": long}]))
    stderr = result.stderr.decode().splitlines()
    assert stderr[:2] == [
        (f"error: the message takes {alone} tokens (with the system prompt and the chat template's markers) but the "
         "context holds 128; it was not added to the conversation: shorten it, or load the model with a longer context"),
        ("error: the message: not UTF-8 text (invalid start byte, byte 0xff at offset 9); convert it to UTF-8 first, "
         "e.g. iconv -f latin1 -t utf-8")]
    assert stderr[2].startswith(f"prompt {conversation.stats.prompt_tokens} tokens ({conversation.stats.cached_tokens} "
                                "cached)") and conversation.stats.cached_tokens > 0


def test_chat_stats_after_reset_tell_of_the_cleared_conversation(bundled):
    """/stats after /reset or /system used to print the previous turn's figures and the engine's old context."""
    path, env = bundled
    session = "Tell me about the sea.\n/stats\n/reset\n/stats\nHi.\n/system Be brief.\n/stats\n/nonsense\n"
    result = cli("chat", "-n", "6", "--temperature", "0", "--profile", "none", stdin=session, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    context = edge_runtime.load(path).context_length
    assert lines[0].startswith("prompt ") and lines[1] == "conversation cleared"
    assert lines[2] == f"no turn yet | context 0/{context}"
    assert lines[3:6] == ["system prompt set, conversation cleared", f"no turn yet | context 0/{context}",
                          ("unknown command /nonsense; commands: /reset (forget the conversation), /system TEXT (set "
                           "the system prompt and reset), /stats (last turn's counts and speeds), /help, /quit; end a "
                           "line with \\ to continue it")]


def _stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (where rich draws progress bars) and return what it drew."""
    import pty

    primary, secondary = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "edge_runtime", *args], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=secondary, env={**os.environ, "TERM": "xterm", **env})
    os.close(secondary)
    drawn = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(primary)
    return process.wait(timeout=300), drawn.decode(errors="replace")


def test_the_first_run_notice_shows_only_when_the_bundled_model_is_exported(bundled, tmp_path):
    """It used to be drawn on every run from a terminal, the cache warm or not."""
    args = ["run", "The list", "-n", "4", "--temperature", "0"]
    code, warm = _stderr_on_a_terminal(args, bundled[1])
    assert code == 0 and "generated 4 tokens" in warm
    assert "first run" not in warm
    code, cold = _stderr_on_a_terminal(args, {"EDGE_RUNTIME_CACHE": str(tmp_path)})
    assert code == 0 and "first run: exporting the bundled model" in cold
