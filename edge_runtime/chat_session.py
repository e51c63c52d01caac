"""The terminal side of `edge-runtime chat`: reading messages, showing replies, thoughts and tool calls.

Shaped after llama-cli's conversation mode: the reply streams to stdout, everything about it (the thought with
`--think`, notes, errors) goes to stderr, so that `chat < questions.txt > answers.txt` keeps only the answers.
With `--tools`, a reply that calls tools shows each call and asks for its result (a line, `\\` to continue it;
piped input gives the results as the next lines), then the model goes on with them, as an app would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from edge_runtime.chat_reply import ChatReply
from edge_runtime.conversation import Conversation
from edge_runtime.errors import EdgeRuntimeError

HELP = ("commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /stats "
        "(last turn's counts and speeds), /help, /quit; end a line with \\ to continue it")


def read_tools(path: Path) -> list[dict[str, Any]]:
    """OpenAI function declarations from a JSON file: a list of them, or an object whose "tools" is one (the
    body of an OpenAI request)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EdgeRuntimeError(f"--tools {path}: cannot read it ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgeRuntimeError(f"--tools {path}: not valid JSON ({exc})") from None
    tools = data.get("tools") if isinstance(data, dict) else data
    if not isinstance(tools, list):
        raise EdgeRuntimeError(f"--tools {path}: must hold a list of tools, [{{\"type\": \"function\", \"function\": "
                               "{\"name\": ..., \"parameters\": {...}}}], or an object with such a \"tools\" list")
    return tools


def read_message(interactive: bool, prompt: str = "> ") -> str | None:
    """One message; lines ending in a backslash continue it. None at end of input."""
    lines = []
    while True:
        try:
            line = input((prompt if not lines else ". ") if interactive else "")
        except EOFError:
            return "\n".join(lines) if lines else None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def show_reply(reply: ChatReply, err: Console, show_thought: bool) -> None:
    """Stream the reply's text to stdout and, with `show_thought`, its thought dimmed on stderr; then its calls."""
    thinking = False
    for delta in reply:
        if text := delta.get("reasoning_content"):
            if show_thought:
                err.print(text, style="dim", end="")
                thinking = True
        elif text := delta.get("content"):
            if thinking:
                err.print()
                thinking = False
            sys.stdout.write(text)
            sys.stdout.flush()
    if thinking:
        err.print()
    for call in reply.message.get("tool_calls") or []:
        function = call["function"]
        err.print(f"\n[tool call {call['id']}] {function['name']}({function['arguments']})")


def answer_tool_calls(conversation: Conversation, interactive: bool, err: Console) -> bool:
    """Ask for the result of each pending call; False when the input ends first."""
    for call in conversation.pending_tool_calls:
        result = read_message(interactive, f"result of {call['function']['name']}> ")
        if result is None:
            err.print("(input ended before the tool results; the calls stay unanswered)")
            return False
        conversation.add_tool_result(call["id"], result)
    return True
