"""`edge-runtime`: export, run and inspect models from a terminal (shaped after llama.cpp's tools and Ollama).

Every user error ends in one line on stderr starting with "error:" and exit code 1, usage errors (an unknown
option, a value that does not parse) included: exit code 2 is `plan`'s "does not fit", and llama.cpp's tools and
Ollama exit 1 on a bad option too. Help is plain text (click's layout): rich's option tables cut long option
names at 80 columns and, in the typer this was written against, label flags `<bool>`.
"""

from __future__ import annotations

import json
import sys
from itertools import pairwise
from pathlib import Path

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge_runtime.errors import ContextLengthError, EdgeRuntimeError, InvalidTextError
from edge_runtime.kv_formats import DEFAULT_KV_FORMAT, KV_FORMATS
from edge_runtime.version import __version__
from edge_runtime.weight_recipe import NAMED_RECIPES, ROLES, SYNTAX

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=HELP_OPTIONS,
                  epilog="\b\nExamples:\n  edge-runtime run \"The list\" -n 60\n"
                         "  edge-runtime export /path/to/gemma-4-E2B-it -o e2b.art\n  edge-runtime chat -m e2b.art")
# Lines on stderr are never wrapped (a piped stderr is 80 columns to rich) nor read as markup or highlighted.
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)

_BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0", "y", "n", "t", "f"}


class _Command(typer.core.TyperCommand):
    """A command whose flags refuse a value: `--json true` would otherwise pass `true` on as the next argument
    (run's prompt, plan's checkpoint) or fail as an "extra argument" that does not say why."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:  # PROMPT, not typer's {prompt}, as click and llama.cpp's tools write arguments
            if param.param_type_name == "argument" and param.metavar is None:
                param.metavar = param.name.upper()

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        flags = {name: param for param in self.params if getattr(param, "is_flag", False)
                 for name in (*param.opts, *param.secondary_opts)}
        for option, value in pairwise(args):
            if option == "--":
                break
            if option in flags and value.lower() in _BOOLEAN_WORDS:
                param = flags[option]
                on = option if option in param.opts else param.opts[-1]
                off = f" or {param.secondary_opts[-1]}" if param.secondary_opts else ", or leave it out"
                raise typer.BadParameter(f"a flag takes no value, got {value!r}; write {on} alone{off}", ctx=ctx,
                                         param=param)
        return super().parse_args(ctx, args)


def _command(group: typer.Typer, *examples: str, name: str | None = None):
    """Register a command the project's way: flags that refuse a value, and its Examples at the end of --help."""
    epilog = "\b\nExamples:\n" + "\n".join(f"  {line}" for line in examples)
    return group.command(name, cls=_Command, epilog=epilog)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"edge-runtime {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """Run Gemma 4 and Gemma 3n E2B/E4B offline: export a checkpoint, then generate from the artifact."""


KV = typer.Option(DEFAULT_KV_FORMAT, "--kv", help=f"KV cache format: {', '.join(KV_FORMATS)}.")
PROFILE_KV = typer.Option(None, "--kv", help=f"KV cache format: {', '.join(KV_FORMATS)} (default: the profile's, "
                          f"else {DEFAULT_KV_FORMAT}).")
PROFILE = typer.Option("auto", "--profile", help="Device profile whose threads, KV format and context apply, and "
                       "whose memory the model must fit (edge-runtime profiles list); auto: detect this device; "
                       "none: no profile, no memory check.")
CONTEXT = typer.Option(None, "-c", "--context", help="Context length in tokens (default: the profile's, at most the "
                       "model's).")
THREADS = typer.Option(None, "-t", "--threads", min=1, help="Threads (default: the profile's, else up to 4).")
MODEL = typer.Option(None, "-m", "--model", help="Artifact directory, or a model name from `edge-runtime list` "
                     "(default: the bundled model).")
SAMPLING_HELP = "Default: the model's generation_config."
TEMPERATURE = typer.Option(None, "--temperature", help="0 for greedy. " + SAMPLING_HELP)
TOP_K = typer.Option(None, "--top-k", help="0 disables it. " + SAMPLING_HELP)
TOP_P = typer.Option(None, "--top-p", help=SAMPLING_HELP)
MIN_P = typer.Option(None, "--min-p", help="Drop tokens below min-p x the top probability.")
REPEAT_PENALTY = typer.Option(None, "--repeat-penalty", help="Penalize the last 64 tokens (1: off).")
SEED = typer.Option(None, "--seed", help="Seed for reproducible sampling.")
KV_RECENT = typer.Option(None, "--kv-recent", help="Keep this many most recent tokens exact besides their KV codes "
                         "(default: 32 for compressed formats, 0 for fp32/fp16/int8).")
KV_SLIDING = typer.Option(None, "--kv-sliding", help="KV format of the sliding-window layers (their rings stop at "
                          "the window; default: fp16, fp32 with --kv fp32).")
ADAPTER = typer.Option(None, "--adapter", help="A PEFT LoRA adapter directory to attach at load to an artifact "
                       "exported with --lora-slots (no re-export).")
LOW_MEMORY = typer.Option(False, "--low-memory", help="64-token prefill chunks and freed scratch returned to the "
                          "OS: less resident memory, slower prefill.")


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"error: {exc}")
    return typer.Exit(1)


def _note(message: str) -> None:
    err.print(f"note: {message}")


def _progress_bar():
    return Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)


def _with_progress(work, heading: str | None = None):
    """`work(report)` with a progress bar that appears at the first report, so that work which turns out to have
    nothing slow to do (a warm cache, files already checked) draws nothing; `heading` is printed above it then."""
    bar, task = None, None

    def report(stage: str, done: int, total: int) -> None:
        nonlocal bar, task
        if bar is None:
            bar = _progress_bar()
            bar.start()
            if heading and not bar.disable:
                bar.console.print(heading)
            task = bar.add_task(stage, total=None)
        bar.update(task, description=stage, completed=done, total=total)

    try:
        return work(report)
    finally:
        if bar is not None:
            bar.stop()


@_command(app, "edge-runtime export /path/to/gemma-4-E2B-it -o e2b.art",
          "edge-runtime export /path/to/gemma-4-E2B-it -o e2b-q4.art --weights int4 --block-size 128 --ple int8",
          "edge-runtime export /path/to/gemma-4-E2B-it -o e2b-mix.art --weights int4,o_proj=int8,per_layer=int8",
          "edge-runtime export /path/to/gemma-4-E2B-it -o e2b.art --profile pi5-8gb")
def export(
    checkpoint: str = typer.Argument(..., help="Hugging Face checkpoint directory (config.json + safetensors), or "
                                     "a Hugging Face repo id (owner/name) to download it from."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Artifact directory to create."),
    name: str | None = typer.Option(None, "--name", help="Create the artifact in the models directory as NAME, "
                                    "for `-m NAME` (see `edge-runtime list`)."),
    revision: str | None = typer.Option(None, "--revision", help="Branch, tag or commit of the repo id (default: "
                                        "main)."),
    weights: str | None = typer.Option(None, help="Weight format: fp32 (exact reference; the default), fp16, int8 "
                                       "(per output channel), int4 or int8-block (blocks of --block-size; int8-block "
                                       "needs int8 dot products: not the Pi 4); or a recipe of formats "
                                       f"by role, {SYNTAX} (roles: {', '.join(ROLES)}), e.g. "
                                       "int4,o_proj=int8,per_layer=int8; named recipes: "
                                       f"{', '.join(f'{k} = {v}' for k, v in NAMED_RECIPES.items())}."),
    block_size: int | None = typer.Option(None, "--block-size", help="int4 and int8-block block size: 32 (default), 64 "
                                          "or 128."),
    ple: str | None = typer.Option(None, help="PLE store format: auto (the checkpoint's precision; the default), "
                                   "bf16, fp16, fp32, int8, int4, tq4, tq3 or tq2."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact once the new one is complete "
                               "(never anything else: not a checkpoint, not a directory with other files)."),
    profile: str | None = typer.Option(None, "--profile", help="Take the weight, block size and PLE formats from "
                                       "this device profile (explicit options still win)."),
    adapter: list[Path] | None = typer.Option(None, "--adapter", help="A PEFT / Unsloth LoRA adapter directory "
                                              "(adapter_config.json + adapter_model.safetensors) to merge into the "
                                              "weights before they are quantized; repeat to stack adapters in order."),
    adapter_scale: list[float] | None = typer.Option(None, "--adapter-scale", help="Scale of the adapters' updates "
                                                     "(default 1): once for all, or once per --adapter."),
    lora_slots: str | None = typer.Option(None, "--lora-slots", help="Give the projections inputs for a LoRA adapter "
                                          "attached at load (run/chat/serve --adapter): RANK[:MODULES], e.g. 16 "
                                          "(q, k, v, o, gate, up, down and the PLE projections, PEFT's all-linear) "
                                          "or 16:q_proj,v_proj."),
    lora_slot_precision: str | None = typer.Option(None, "--lora-slot-precision", help="int8 (default beside int8 "
                                                   "/ int4 weights) or fp16 (beside fp16): a quarter or half of "
                                                   "float32's bytes a token, through edge-runtime's own operators; "
                                                   "fp32 (beside fp32): onnxruntime's MatMul, equal to the adapter "
                                                   "merged at export."),
) -> None:
    """Convert a Gemma 4 or Gemma 3n checkpoint (a directory, or a Hugging Face repo id to download) into an artifact."""
    try:
        from edge_runtime.export import export_checkpoint
        from edge_runtime.export.destination import check_destination
        from edge_runtime.export.hub import checkpoint_dir
        from edge_runtime.model_store import named_path
        from edge_runtime.profiles import load_profile

        if (output is None) == (name is None):
            raise EdgeRuntimeError("give -o OUT (an artifact directory to create) or --name NAME (in the models "
                                   "directory, for -m NAME), not both or none")
        output = named_path(name) if name is not None else output
        formats = {"weights": weights, "block_size": block_size, "ple": ple}
        if profile is not None:
            p = load_profile(profile)
            formats = {name: getattr(p, name) if value is None else value for name, value in formats.items()}
        given = {name: value for name, value in formats.items() if value is not None}
        source = checkpoint_dir(checkpoint, revision, progress_bars=err.is_terminal,
                                before_download=lambda hub_cache: check_destination(output, hub_cache, force))
        _with_progress(lambda report: export_checkpoint(source, output, force=force, adapters=adapter or [],
                                                        adapter_scales=adapter_scale or [],
                                                        lora_slots=lora_slots,
                                                        lora_slot_precision=lora_slot_precision, progress=report,
                                                        notice=_note, **given))
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    err.print(f"wrote {output}" + (f"; use it with -m {name}" if name else ""))


def _load(model: str | None, profile: str, context: int | None, threads: int | None, kv: str | None,
          kv_recent: int | None, kv_sliding: str | None, low_memory: bool, adapter: Path | None = None):
    from edge_runtime.model import load

    path = _resolve_model(model)
    return _with_progress(lambda report: load(
        path, profile=None if profile == "none" else profile, context_length=context, threads=threads, kv=kv,
        kv_recent=kv_recent, kv_sliding=kv_sliding, low_memory=low_memory, progress=report, adapter=adapter))


def _served_adapters(options: list[str]) -> tuple[Path | None, dict[str, Path]]:
    """serve's --adapter options: the one DIR attached to every request (or None), and the NAME=DIR ones."""
    default, named = [], {}
    for option in options:
        name, sep, path = option.partition("=")
        if sep and name and "/" not in name and not Path(option).exists():
            if name in named:
                raise EdgeRuntimeError(f"--adapter {option}: the name {name!r} is given twice; name each adapter once")
            named[name] = Path(path)
        else:
            default.append(Path(option))
    if len(default) > 1:
        raise EdgeRuntimeError(f"--adapter given {len(default)} directories without a name; attach one to every "
                               "request, and offer the others as NAME=DIR")
    return (default[0] if default else None), named


def _print_stats(s, m) -> None:
    """llama.cpp's figures for the generation `s` on model `m`, whose KV cache holds what that left."""
    err.print(f"prompt {s.prompt_tokens} tokens ({s.cached_tokens} cached), {s.prefill_tokens_per_second:.1f} tok/s | "
              f"generated {s.generated_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s | "
              f"context {m.context_used}/{m.context_length}")


def _resolve_model(model: str | None) -> Path:
    from edge_runtime.model_store import is_bundled, resolve_model

    if not is_bundled(model):
        return resolve_model(model)
    return _with_progress(lambda report: resolve_model(model, report), "first run: exporting the bundled model")


@_command(app, 'edge-runtime run "The list" -n 60',
          'edge-runtime run -m e2b.art "Why is the sky blue?" -n 200 --temperature 0',
          'edge-runtime run -m e2b.art "Once upon" --temperature 0.8 --top-k 40 --seed 1',
          "edge-runtime run -m e2b.art - --json < prompt.txt")
def run(
    prompt: str = typer.Argument(..., help="Text to continue; - reads it from stdin."),
    model: str | None = MODEL,
    max_new_tokens: int = typer.Option(128, "-n", "--max-new-tokens", min=0, help="Stop after this many tokens."),
    temperature: float | None = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    min_p: float | None = MIN_P,
    repeat_penalty: float | None = REPEAT_PENALTY,
    seed: int | None = SEED,
    stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable)."),
    profile: str = PROFILE,
    context: int | None = CONTEXT,
    threads: int | None = THREADS,
    stats: bool = typer.Option(True, "--stats/--no-stats", help="Print token counts and speeds to stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print the text and the figures as one JSON object at the end."),
    low_memory: bool = LOW_MEMORY,
    kv: str | None = PROFILE_KV,
    kv_recent: int | None = KV_RECENT,
    kv_sliding: str | None = KV_SLIDING,
    adapter: Path | None = ADAPTER,
) -> None:
    """Continue PROMPT, streaming the text to stdout."""
    from edge_runtime.text_input import decode_os_text, decode_utf8

    try:
        prompt = decode_utf8(sys.stdin.buffer.read(), "stdin") if prompt == "-" else decode_os_text(prompt, "PROMPT")
        m = _load(model, profile, context, threads, kv, kv_recent, kv_sliding, low_memory, adapter)
        pieces = m.stream(prompt, max_new_tokens=max_new_tokens, stop=stop, temperature=temperature, top_k=top_k,
                          top_p=top_p, min_p=min_p, repetition_penalty=repeat_penalty, seed=seed)
        text = []
        for piece in pieces:
            text.append(piece)
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps({"model": str(m.path), "text": "".join(text), **m.stats.to_dict()}, indent=1))
        return
    sys.stdout.write("\n")
    if stats:
        _print_stats(m.stats, m)


@_command(app, "edge-runtime chat", 'edge-runtime chat -m e2b.art --system "Answer briefly." --kv tq3.5',
          "edge-runtime chat -m e2b.art --tools kiosk_tools.json --think",
          "edge-runtime chat -m e2b.art -n 64 --temperature 0 < questions.txt")
def chat(
    model: str | None = MODEL,
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    tools: Path | None = typer.Option(None, "--tools", help="JSON file of OpenAI function declarations the model "
                                      "may call; each call is shown and its result asked for."),
    think: bool = typer.Option(False, "--think", help="Let the model think before it answers (Gemma 4's thinking "
                               "mode); the thought is shown dimmed on stderr."),
    max_new_tokens: int = typer.Option(512, "-n", "--max-new-tokens", min=0, help="Longest reply in tokens."),
    temperature: float | None = TEMPERATURE,
    top_k: int | None = TOP_K,
    top_p: float | None = TOP_P,
    min_p: float | None = MIN_P,
    repeat_penalty: float | None = REPEAT_PENALTY,
    seed: int | None = SEED,
    profile: str = PROFILE,
    context: int | None = CONTEXT,
    threads: int | None = THREADS,
    low_memory: bool = LOW_MEMORY,
    kv: str | None = PROFILE_KV,
    kv_recent: int | None = KV_RECENT,
    kv_sliding: str | None = KV_SLIDING,
    adapter: Path | None = ADAPTER,
) -> None:
    """Talk with the model: streamed replies, earlier turns kept in the KV cache (/help for commands).

    A message that cannot be taken (longer than the context, not UTF-8) is refused with one line and the chat goes
    on without it; with piped input the exit code is then 1 once the input is done.
    """
    from edge_runtime.chat_session import HELP, answer_tool_calls, read_message, read_tools, show_reply
    from edge_runtime.text_input import decode_os_text

    try:
        declared = read_tools(tools) if tools is not None else None
        m = _load(model, profile, context, threads, kv, kv_recent, kv_sliding, low_memory, adapter)
        m.sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        conversation = m.conversation(system, tools=declared,
                                      chat_template_kwargs={"enable_thinking": True} if think else None)
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    interactive = sys.stdin.isatty()
    sys.stdin.reconfigure(errors="surrogateescape")  # bytes that are not UTF-8 reach decode_os_text, which names them
    refused = False
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repeat_penalty,
                   seed=seed)
    if interactive:
        err.print(f"{m.name}: context {m.context_length}, KV {m.kv_format.name}. {HELP}")
    while (message := read_message(interactive)) is not None:
        command, _, argument = message.strip().partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/help":
            err.print(HELP)
        elif command == "/reset":
            conversation.reset()
            err.print("conversation cleared")
        elif command == "/system":
            conversation.reset()
            conversation.system = argument.strip() or None
            err.print("system prompt set, conversation cleared" if argument.strip() else
                      "system prompt removed, conversation cleared")
        elif command == "/stats":
            if conversation.turns:
                _print_stats(conversation.stats, m)
            else:
                err.print(f"no turn yet | context 0/{m.context_length}")
        elif command.startswith("/"):
            err.print(f"unknown command {command}; {HELP}")
        elif message.strip():
            try:
                text: str | None = decode_os_text(message, "the message")
                while True:  # a reply, then, while it calls tools, their results and the model's next reply
                    dropped = conversation.dropped_turns
                    reply = conversation.reply(text, max_new_tokens=max_new_tokens, **options)
                    if dropped != conversation.dropped_turns:
                        err.print(f"(the oldest {conversation.dropped_turns - dropped} turns were dropped to fit the "
                                  f"context of {m.context_length} tokens)")
                    show_reply(reply, err, think)
                    if not conversation.pending_tool_calls or not answer_tool_calls(conversation, interactive, err):
                        break
                    text = None
            except (ContextLengthError, InvalidTextError) as exc:
                err.print(f"error: {exc}")
                refused = True
                continue
            except EdgeRuntimeError as exc:
                if not interactive:
                    raise _fail(exc) from None
                err.print(f"error: {exc}")
            except KeyboardInterrupt:
                err.print("\n(reply interrupted; not kept in the conversation)")
            sys.stdout.write("\n")
            sys.stdout.flush()
    if refused and not interactive:
        raise typer.Exit(1)


@_command(app, "edge-runtime list", "edge-runtime list --profile pi4-4gb --json", name="list")
def list_command(
    profile: str = typer.Option("auto", "--profile", help="Device profile the fit is checked on (auto: this device)."),
    as_json: bool = typer.Option(False, "--json", help="Print every model as JSON."),
) -> None:
    """The models you have, for -m NAME: the models directory's and the bundled one, with their fit on this device."""
    from edge_runtime.model_store import format_model_table, list_models
    from edge_runtime.profiles import resolve_profile

    try:
        device = resolve_profile(profile)
        models = list_models(device)
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps([m.to_dict() for m in models], indent=1) if as_json else format_model_table(models, device))


@_command(app, "edge-runtime info", "edge-runtime info e2b.art --json")
def info(
    model: str | None = typer.Argument(None, help="Artifact directory or model name (default: the bundled model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """Describe an artifact: model shape, formats and files."""
    from edge_runtime.artifact import read_manifest
    from edge_runtime.families import family_of
    from edge_runtime.lora_adapter import ADAPTER_WEIGHTS

    try:
        artifact = _resolve_model(model)
        manifest = read_manifest(artifact)
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    s, slots = manifest.spec, manifest.lora_slots
    summary = {
        "artifact": str(artifact),
        "created_by": manifest.created_by,
        "source": manifest.source,
        "formats": manifest.formats,
        "weight_formats": manifest.to_dict()["weight_formats"],
        "layers": s.num_hidden_layers,
        "hidden_size": s.hidden_size,
        "vocab_size": s.vocab_size,
        "kv_cache_layers": len(s.cache_layers()),
        "context_length": s.max_position_embeddings,
        "bytes": sum(f["size"] for f in manifest.files.values()),
        "files": {name: f["size"] for name, f in manifest.files.items()},
        "adapters": list(manifest.adapters),
        "lora_slots": None if slots is None else {"rank": slots.rank, "modules": list(slots.modules),
                                                  "dtype": slots.dtype, "slotted_tensors": len(slots.tensors)},
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    sliding = s.layer_types.count("sliding_attention")
    typer.echo(f"{artifact}: {family_of(s).title} ({manifest.source.get('architecture')}), {manifest.created_by}")
    typer.echo(f"  layers {s.num_hidden_layers} ({sliding} sliding, window {s.sliding_window}; "
               f"{s.num_hidden_layers - sliding} full), hidden {s.hidden_size}, vocab {s.vocab_size}")
    typer.echo(f"  KV cache in {len(s.cache_layers())} layers ({s.num_kv_shared_layers} share it), "
               f"context {s.max_position_embeddings}")
    typer.echo(f"  formats: weights {manifest.weight_recipe.label}, PLE {manifest.formats['ple']} "
               "(KV cache format is chosen at run time: --kv)")
    typer.echo(f"  size {summary['bytes'] / 2**20:.1f} MiB in {len(manifest.files)} files "
               f"(PLE store {manifest.files['ple.bin']['size'] / 2**20:.1f} MiB)")
    if manifest.adapters:
        typer.echo("  LoRA adapters merged: " + ", ".join(
            f"{a['name']} (scale {a['scale']:g}, weights sha256 {a['sha256'][ADAPTER_WEIGHTS][:12]})"
            for a in manifest.adapters))
    if slots is not None:
        typer.echo(f"  LoRA slots: rank {slots.rank} in {', '.join(slots.modules)} ({len(slots.tensors)} projections, "
                   f"{slots.dtype}); attach an adapter with --adapter DIR")


@_command(app, "edge-runtime verify e2b.art", "edge-runtime verify /media/usb/e2b.art --json")
def verify(
    model: str | None = typer.Argument(None, help="Artifact directory or model name (default: the bundled model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object, whatever it is."),
) -> None:
    """Check every file's SHA-256 against the manifest (loading hashes only files new or changed since last seen intact).

    Exit code 1 unless every file is intact. --json always prints {"artifact", "ok", "damaged": {file: what is
    wrong}, "error"}, the error being the line stderr gets.
    """
    from edge_runtime.artifact import describe_damage, verify_artifact

    artifact = model
    try:
        artifact = _resolve_model(model)
        damaged = verify_artifact(artifact)
        error = describe_damage(artifact, damaged) if damaged else None
    except EdgeRuntimeError as exc:
        damaged, error = {}, str(exc)
    if as_json:
        typer.echo(json.dumps({"artifact": None if artifact is None else str(artifact), "ok": error is None,
                               "damaged": damaged, "error": error}))
    elif error is None:
        typer.echo(f"{artifact}: every file matches its SHA-256 in the manifest")
    if error is not None:
        raise _fail(EdgeRuntimeError(error))


@_command(app, "edge-runtime bench -m e2b-q4.art", "edge-runtime bench -m e2b-q4.art -p 512 -n 64 -d 3584 -r 1",
          "edge-runtime bench -m e2b-q4.art -p 0 -n 32 -d 0,2048,8192,32736 --fill --kv tq3.5 --json")
def bench(
    model: str | None = MODEL,
    n_prompt: str = typer.Option("128,512", "-p", "--n-prompt", help="Prompt sizes to prefill, comma-separated (0: no prompt test)."),
    n_gen: str = typer.Option("64,128", "-n", "--n-gen", help="Token counts to generate, comma-separated (0: no generation test)."),
    repetitions: int = typer.Option(3, "-r", "--repetitions", help="Runs of each test (median ± stdev)."),
    depth: str = typer.Option("0", "-d", "--depth", help="Tokens already in the context before each test, "
                              "comma-separated: each test runs at each depth, repetitions taking turns."),
    threads: int | None = typer.Option(None, "-t", "--threads", min=1, help="Threads (default: up to 4)."),
    context: int | None = typer.Option(None, "--context", help="Context length to load (default: what tests need)."),
    probe_mb: int = typer.Option(1024, "--probe-mb", help="Size of the memory-bandwidth probe in MiB."),
    low_memory: bool = LOW_MEMORY,
    kv: str = KV,
    kv_recent: int | None = KV_RECENT,
    kv_sliding: str | None = KV_SLIDING,
    as_json: bool = typer.Option(False, "--json", help="Print every figure as one JSON object."),
    adapter: Path | None = ADAPTER,
    fill: bool = typer.Option(False, "--fill", help="Fill the depth by repeating one prefilled chunk's keys "
                              "and values instead of prefilling it whole (seconds, not minutes, at 32k)."),
) -> None:
    """Measure prefill and decode speed, memory, and decode against the bandwidth ceiling (like llama-bench)."""
    from edge_runtime.bench import BenchConfig, format_report, parse_counts, parse_depths, run_bench

    try:
        config = BenchConfig(parse_counts(n_prompt, "-p/--n-prompt"), parse_counts(n_gen, "-n/--n-gen"),
                             repetitions, parse_depths(depth), threads, context, probe_mb, low_memory, kv, kv_recent,
                             kv_sliding, adapter, fill)
        path = _resolve_model(model)
        result = _with_progress(lambda report: run_bench(path, config, report))
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(result, indent=1) if as_json else format_report(result))


@_command(app, "edge-runtime perplexity -m e2b-q4.art --text-file wiki.txt",
          "edge-runtime perplexity -m e2b-q4.art --text-file wiki.txt --context 1024 --kv tq3.5 --json",
          "edge-runtime perplexity -m e2b-slots.art --text-file heldout.txt --adapter my-lora/")
def perplexity(
    model: str | None = MODEL,
    text_file: Path = typer.Option(..., "--text-file", help="UTF-8 text to score."),
    context: int | None = typer.Option(None, "--context", help="Window length in tokens (default: min(512, model's))."),
    threads: int | None = typer.Option(None, "-t", "--threads", min=1, help="Threads (default: up to 4)."),
    kv: str = KV,
    kv_recent: int | None = KV_RECENT,
    kv_sliding: str | None = KV_SLIDING,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    adapter: Path | None = ADAPTER,
) -> None:
    """Perplexity of a text, in BOS-started windows through the chunked KV-cache path."""
    from edge_runtime.model import load
    from edge_runtime.perplexity import evaluate, read_text

    try:
        text = read_text(text_file)
        m = load(_resolve_model(model), threads=threads, kv=kv, kv_recent=kv_recent, kv_sliding=kv_sliding,
                 adapter=adapter)
        result = _with_progress(lambda report: evaluate(m, text, context, progress=report))
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    figures = {"model": str(m.path), "adapter": None if m.adapter is None else str(m.adapter), "kv": kv,
               "kv_recent": m.kv_recent, "kv_sliding": m.kv_sliding_format.name, "text_file": str(text_file), "perplexity": result.perplexity,
               "nll": result.nll, "tokens": result.tokens, "windows": result.windows, "context": result.context,
               "seconds": result.seconds, "tokens_per_second": result.tokens_per_second}
    if as_json:
        typer.echo(json.dumps(figures, indent=1))
        return
    typer.echo(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.4f} nats) over {result.tokens} tokens "
               f"in {result.windows} windows of up to {result.context}; {result.tokens_per_second:.1f} tokens/s")


profiles_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=HELP_OPTIONS,
                           help="Device profiles: what fits on a Raspberry Pi or a phone.",
                           epilog="\b\nExamples:\n  edge-runtime profiles list\n  edge-runtime profiles show pi5-8gb\n"
                                  "  edge-runtime profiles detect --json")
app.add_typer(profiles_app, name="profiles")


@_command(profiles_app, "edge-runtime profiles list", "edge-runtime profiles list --json", name="list")
def profiles_list(as_json: bool = typer.Option(False, "--json", help="Print every profile as JSON.")) -> None:
    """Every device profile, one line each."""
    from edge_runtime.profiles import format_profile_table, list_profiles

    profiles = list_profiles()
    typer.echo(json.dumps([p.to_dict() for p in profiles], indent=1) if as_json else format_profile_table(profiles))


@_command(profiles_app, "edge-runtime profiles show pi4-4gb", "edge-runtime profiles show my-board.toml --json",
          name="show")
def profiles_show(
    name: str = typer.Argument(..., help="Profile name, or a path to a profile TOML file."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON."),
) -> None:
    """One profile in full: memory, CPU, storage, default formats and context, and the speed the cost model estimates
    for the known models (Gemma 4 and Gemma 3n E2B and E4B) in those formats."""
    from edge_runtime.cost_model import format_estimates, profile_estimates
    from edge_runtime.profiles import format_profile, load_profile

    try:
        p = load_profile(name)
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    estimates = profile_estimates(p)
    if as_json:
        typer.echo(json.dumps({**p.to_dict(), "estimate": [e.to_dict() for e in estimates]}, indent=1))
    else:
        typer.echo(f"{format_profile(p)}\n\n{format_estimates(estimates)}")


@_command(profiles_app, "edge-runtime profiles detect", "edge-runtime profiles detect --json", name="detect")
def profiles_detect(as_json: bool = typer.Option(False, "--json", help="Print the detection as JSON.")) -> None:
    """Which profile this device matches, and the facts read to decide (device tree, /proc, Android properties)."""
    from edge_runtime.profiles import detect_profile, format_profile

    found = detect_profile()
    if as_json:
        typer.echo(json.dumps(found.to_dict(), indent=1))
        return
    typer.echo(f"{found.profile.name}{'' if found.exact else ' (nearest match)'}")
    for reason in found.reasons:
        typer.echo(f"  {reason}")
    typer.echo(format_profile(found.profile))


@_command(app, "edge-runtime plan /path/to/gemma-4-E2B-it --profile pi5-8gb",
          "edge-runtime plan -m e2b-q4.art --profile pi4-4gb --context 32768",
          "edge-runtime plan -m e2b.art --kv tq3.5 --json")
def plan(
    source: Path | None = typer.Argument(None, help="Checkpoint directory (planned in the profile's formats)."),
    model: str | None = MODEL,
    profile: str = typer.Option("auto", "--profile", help="Device profile (auto: detect this device)."),
    context: int | None = CONTEXT,
    kv: str | None = PROFILE_KV,
    kv_recent: int | None = KV_RECENT,
    kv_sliding: str | None = KV_SLIDING,
    as_json: bool = typer.Option(False, "--json", help="Print the budget as JSON."),
    adapter: Path | None = ADAPTER,
) -> None:
    """Whether a model fits a device: weights, PLE pages, KV cache, activations and overhead against its memory, and
    the decode and prefill speed the cost model estimates for it there.

    Exit code 2 when it does not fit (and what would fit is printed).
    """
    from edge_runtime.cost_model import format_estimates, plan_estimate
    from edge_runtime.planner import format_plan, plan_memory
    from edge_runtime.profiles import resolve_profile

    try:
        if source is not None and model is not None:
            raise EdgeRuntimeError("give either an artifact (-m MODEL) or a checkpoint directory, not both")
        result = plan_memory(source or _resolve_model(model), resolve_profile(profile), context, kv=kv,
                             kv_recent=kv_recent, kv_sliding=kv_sliding, adapter=adapter)
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    speed = plan_estimate(result)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "estimate": speed.to_dict()}, indent=1))
    else:
        typer.echo(f"{format_plan(result)}\n\n{format_estimates([speed])}")
    if not result.fits:
        raise typer.Exit(2)


SERVER_EXTRA = "the server needs the `server` extra: pip install 'edge-runtime[server]'"


@_command(app, "edge-runtime serve -m e2b-q4.art --profile pi4-4gb",
          "EDGE_RUNTIME_API_KEY=KEY edge-runtime serve -m e2b-q4.art --host 0.0.0.0",
          "edge-runtime serve -m e2b.art --no-prompt-cache --log-level warning")
def serve(
    model: str | None = MODEL,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this device only)."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="EDGE_RUNTIME_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on /v1 and /metrics."),
    queue: int = typer.Option(8, "--queue", min=0, help="Requests that may wait while one generates; more get 429."),
    max_body: int = typer.Option(1 << 20, "--max-body", min=1, help="Largest request body in bytes."),
    max_messages: int = typer.Option(256, "--max-messages", min=1, help="Most messages in one chat request."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1,
                                          help="Most tokens one request may ask for (default: the context)."),
    prompt_cache: bool = typer.Option(True, "--prompt-cache/--no-prompt-cache",
                                      help="Reuse the cached prefix of each prompt (off: every answer is the same "
                                           "whatever ran before, at the cost of running whole prompts)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level: warning hides the access log."),
    profile: str = PROFILE,
    context: int | None = CONTEXT,
    threads: int | None = THREADS,
    low_memory: bool = LOW_MEMORY,
    kv: str | None = PROFILE_KV,
    kv_recent: int | None = KV_RECENT,
    kv_sliding: str | None = KV_SLIDING,
    adapter: list[str] = typer.Option([], "--adapter", help="A PEFT LoRA adapter for an artifact exported with "
                                      "--lora-slots: DIR attaches it to every request, NAME=DIR offers it to requests "
                                      "that name it in their \"adapter\" field (repeatable)."),
) -> None:
    """Serve OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) and a chat page at /, offline."""
    try:
        from edge_runtime.server import runner
    except ImportError as exc:
        raise _fail(EdgeRuntimeError(f"{SERVER_EXTRA} ({exc})")) from None
    from edge_runtime.server.app import ServerSettings
    from edge_runtime.server.listen_address import check_port, is_loopback
    from edge_runtime.server.request_schema import Limits

    try:
        check_port(host, port)
        default, named = _served_adapters(adapter)
        m = _load(model, profile, context, threads, kv, kv_recent, kv_sliding, low_memory, default)
        settings = ServerSettings(api_key=api_key, queue_depth=queue, cache_prompt=prompt_cache, adapters=named,
                                  limits=Limits(max_body_bytes=max_body, max_messages=max_messages,
                                                max_tokens=max_tokens))
        for path in named.values():  # each one checked now, in one line, rather than at its first request
            m.read_adapter(path)
    except (EdgeRuntimeError, OSError) as exc:
        raise _fail(exc) from None
    if api_key is None and not is_loopback(host):
        err.print(f"warning: listening on {host} without --api-key: anyone on the network can use the model")
    err.print(f"{m.name}: context {m.context_length}, KV {m.kv_format.name}; serving http://{host}:{port}/")
    runner.serve(m, settings, host, port, log_level)


@_command(app, "edge-runtime service -m /opt/edge-runtime/e2b.art --profile pi4-4gb",
          "sudo edge-runtime service -m /opt/edge-runtime/e2b.art --profile pi4-4gb "
          "-o /etc/systemd/system/edge-runtime.service")
def service(
    model: str = typer.Option(..., "-m", "--model", help="Artifact directory or model name the service serves."),
    profile: str = typer.Option(..., "--profile", help="Device profile: its memory share becomes MemoryMax."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the service listens on."),
    port: int = typer.Option(8080, "--port", help="TCP port."),
    user: str | None = typer.Option(None, "--user", help="Run as this user (default: a transient DynamicUser)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the unit here (default: print it)."),
) -> None:
    """A systemd unit for a kiosk: restart on failure, the profile's memory limit, no internet access."""
    from edge_runtime.profiles import resolve_profile
    from edge_runtime.server.systemd_unit import render_unit

    try:
        if profile == "none":
            raise EdgeRuntimeError("service needs a device profile: its memory share becomes the unit's MemoryMax; "
                                   "pass --profile NAME (see `edge-runtime profiles list`) or auto")
        text = render_unit(_resolve_model(model), resolve_profile(profile), host=host, port=port, user=user)
    except EdgeRuntimeError as exc:
        raise _fail(exc) from None
    if output is None:
        typer.echo(text, nl=False)
        return
    partial = output.with_name(output.name + ".partial")
    try:
        partial.write_text(text)
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise _fail(EdgeRuntimeError(f"cannot write {output}: {exc.strerror}")) from None
    err.print(f"wrote {output}; then: systemctl daemon-reload && systemctl enable --now {output.stem}")


def main() -> None:
    """The `edge-runtime` command: click's usage errors become the project's one line on stderr, exit code 1."""
    try:
        code = app(prog_name="edge-runtime", standalone_mode=False)  # the same name however it was started
    except typer.TyperException as exc:
        context = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help is what was asked for
            typer.echo(exc.format_message())
            sys.exit(0)
        message = exc.format_message().rstrip(".")
        where = f" (see {context.command_path} --help)" if context is not None else ""
        err.print(f"error: {message[:1].lower()}{message[1:]}{where}")
        sys.exit(1)
    except typer.Abort:
        err.print("error: aborted")
        sys.exit(1)
    sys.exit(code or 0)
