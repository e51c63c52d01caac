"""Train the small Gemma-4 "E"-architecture model that ships inside edge-runtime.

Why: the runtime needs a real model that is small enough to commit (the default for
`edge-runtime run "prompt"` without `-m`), and quantization quality needs a model whose
perplexity means something. A randomly initialised checkpoint exercises the code but its
perplexity is flat; this script trains one, from text that ships with Python itself, in
about 20 minutes on two CPU cores, and measures it against n-gram baselines. Being the default,
it also speaks Gemma 4's chat format (turns, tool declarations, tool calls and responses, thought
channels, JSON replies), so that everything built on that format runs on it.

The model is a `transformers` `Gemma4ForCausalLM` using every feature of the E2B/E4B text
decoder: Per-Layer Embeddings, KV sharing across the last layers (one sliding and one full
producer), double-wide MLPs on the shared layers, sliding and full attention with different
head dims (proportional RoPE on full layers), one KV head, and final logit soft-capping.

Data (no download; Python 3.11's own files, hashed in the report):
  * `pydoc_data.topics.topics`: the language-reference topics `help()` shows (~465 KB).
  * docstrings (module, class, function; >= 80 characters) parsed with `ast` from the
    standard library's `.py` files, without importing them; test packages and
    site-packages are excluded (~1.45 MB after de-duplication).
  * synthetic conversations (tools/tiny_chat_data.py, deterministic from the seed) rendered by
    Gemma 4's canonical chat template (edge_runtime/chat_templates/gemma4.jinja, copied into the
    checkpoint as it is) through transformers: kiosk tool use, JSON replies, thoughts, multi-turn,
    and questions on the training pydoc topics answered with one of their paragraphs.
Split: the held-out set is every 8th pydoc topic in name order starting with the third
(`HELDOUT_RULE`), ~49 KB. Because topics overlap (e.g. `specialnames` contains
`sequence-types`), every paragraph of a held-out topic is removed from the training text,
as is any paragraph repeated within it. The held-out text is never trained on, not even
by the tokenizer (which sees the plain training text only), nor quoted by a conversation, and
is written beside the checkpoint as `heldout.txt`; perplexity is measured on it alone.
Packing: every document starts with <bos> and ends with <eos>. A `--chat-share` of the training
windows start at a conversation (its system turn and tool declarations in view), the others at a
random point of the plain text after a <bos>, as the held-out text is scored.

Regenerate the bundled model (from the repository root; the defaults are what it was trained with):
    python tools/train_tiny.py --out edge_runtime/bundled/gemma4-tiny --steps 720 --seed 0

`--family gemma3n` trains a small `Gemma3nForCausalLM` the same way: the test model of the Gemma 3n family
(tests/data/gemma3n-tiny, not shipped), on which its quantized formats are held to the bundled model's bounds,
since random weights amplify quantization noise layer after layer and say little. It uses AltUp (4 streams),
LAuReL, sparse MLP activations on the first two layers, PLE, KV sharing over both layer types. The committed
tests/data/gemma3n-tiny predates Gemma 4's format here: it was trained by this script as it was before (six special
tokens, Gemma 2/3's `<start_of_turn>` template, plain text only; `git show ce33f09:tools/train_tiny.py`) with
    python tools/train_tiny.py --family gemma3n --out tests/data/gemma3n-tiny --steps 1000 --batch-size 8 \
        --seq-len 256 --seed 0 --dtype bfloat16 --threads 1
and is kept as it is; the same command today gives a Gemma 3n model with Gemma 4's tokenizer, template and chat data.

`--lora-out DIR` fine-tunes the bundled model instead, with a PEFT LoRA adapter, on a text of another kind that also
ships with Python and that pretraining never saw: IDLE's change logs (idlelib/NEWS.txt and NEWS2x.txt, "gh-12345:
Fix ..." entries), every 8th entry held out (written to DIR/heldout.txt). It reports held-out perplexity before and
after (transformers + PEFT) and through edge-runtime in each of `--lora-weights` (the base exported; the base exported
with `--adapter DIR`; the base exported with `--lora-slots` and the adapter attached at load, as `perplexity
--adapter` does), and a greedy continuation before and after, into DIR/lora_report.json beside the adapter.
`all-linear` (the default) trains the PLE projections too, `projections` the seven attention and MLP ones:
    python tools/train_tiny.py --lora-out /tmp/idle-news-lora --steps 240 --batch-size 8 --seq-len 128 --lr 1e-3 \
        --threads 1
    python tools/train_tiny.py --lora-out /tmp/idle-news-lora-proj --lora-targets projections --steps 240 \
        --batch-size 8 --seq-len 128 --lr 1e-3 --threads 1
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics as PYDOC_TOPICS

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

import tiny_chat_data
from edge_runtime.lora_slots import PROJECTIONS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "edge_runtime" / "bundled" / "gemma4-tiny"
CHAT_TEMPLATE = REPO / "edge_runtime" / "chat_templates" / "gemma4.jinja"  # copied into the checkpoint as it is

# Gemma's first four ids, then Gemma 4's chat-format markers (turns, tool declarations, calls and responses, the
# string quote, the thinking switch and the thought channel). The runtime and the chat template find the markers by
# their text, never by id; only this script (training windows, config and generation_config) uses the ids.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>",
                  "<|turn>", "<turn|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>",
                  "<|tool_response>", "<tool_response|>", '<|"|>', "<|think|>", "<|channel>", "<channel|>"]
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(4)
END_OF_TURN_ID = SPECIAL_TOKENS.index("<turn|>")

HELDOUT_RULE = "pydoc topics whose index in sorted(topics) is 2 mod 8"
HELDOUT_EVERY, HELDOUT_OFFSET = 8, 2
MIN_DOCSTRING_CHARS = 80
EXCLUDED_STDLIB_PARTS = {"site-packages", "dist-packages", "__pycache__"}

SLIDING, FULL = "sliding_attention", "full_attention"
MODEL_CONFIG = dict(
    hidden_size=192,
    intermediate_size=288,  # doubled (576) on the KV-shared layers by use_double_wide_mlp
    num_hidden_layers=6,
    layer_types=[SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL],
    num_kv_shared_layers=2,  # layers 4 (sliding) and 5 (full) reuse the K/V of layers 2 and 3
    use_double_wide_mlp=True,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    global_head_dim=64,  # full-attention layers; transformers turns it into per_layer_config
    hidden_size_per_layer_input=32,
    sliding_window=128,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)

MODEL_CONFIG_3N = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=6,
    layer_types=[SLIDING, SLIDING, SLIDING, FULL, SLIDING, FULL],
    num_kv_shared_layers=2,  # layers 4 (sliding) and 5 (full) reuse the K/V of layers 2 and 3
    activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0],
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=32,
    hidden_size_per_layer_input=16,
    laurel_rank=16,
    altup_num_inputs=4,
    sliding_window=64,
    final_logit_softcapping=30.0,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
)
FAMILIES = {"gemma4": (Gemma4ForCausalLM, Gemma4TextConfig, MODEL_CONFIG),
            "gemma3n": (Gemma3nForCausalLM, Gemma3nTextConfig, MODEL_CONFIG_3N)}

@dataclass
class Corpus:
    train_docs: list[str]
    topic_texts: dict[str, str]  # training pydoc topics by name, held-out paragraphs removed: what chat answers quote
    heldout_text: str
    description: dict


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def _stdlib_docstring_docs() -> tuple[list[str], int]:
    """One document per stdlib module: its long docstrings in source order. Returns (docs, files read)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, files = [], 0
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if EXCLUDED_STDLIB_PARTS & set(parts) or any(p.startswith(("test", "config-")) for p in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # a few deliberately broken fixtures
            continue
        files += 1
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                              ast.AsyncFunctionDef))]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))
        strings = [d for n in nodes if (d := ast.get_docstring(n)) and len(d) >= MIN_DOCSTRING_CHARS]
        if strings:
            docs.append("\n\n".join(strings))
    return docs, files


def build_corpus() -> Corpus:
    names = sorted(PYDOC_TOPICS)
    heldout_names = [n for i, n in enumerate(names) if i % HELDOUT_EVERY == HELDOUT_OFFSET]
    heldout_text = "\n\n".join(PYDOC_TOPICS[n].strip("\n") for n in heldout_names) + "\n"

    seen = set(_paragraphs(heldout_text))
    dropped = 0

    def dedup(text: str) -> str:
        nonlocal dropped
        kept = []
        for para in _paragraphs(text):
            if para in seen:
                dropped += 1
            else:
                seen.add(para)
                kept.append(para)
        return "\n\n".join(kept)

    topic_texts = {n: dedup(PYDOC_TOPICS[n]) for n in names if n not in heldout_names}
    topic_docs = list(topic_texts.values())
    docstring_docs, files = _stdlib_docstring_docs()
    docstring_docs = [dedup(d) for d in docstring_docs]
    train_docs = [d for d in topic_docs + docstring_docs if d]
    train_chars = sum(len(d) for d in train_docs)

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    description = {
        "python": sys.version.split()[0],
        "sources": [
            f"pydoc_data.topics.topics: {len(names)} topics, {sum(map(len, PYDOC_TOPICS.values()))} chars",
            (f"docstrings (>= {MIN_DOCSTRING_CHARS} chars of modules, classes, functions) parsed with ast from "
             f"{files} stdlib .py files (excluding test packages and site-packages)"),
        ],
        "heldout": {
            "rule": HELDOUT_RULE,
            "topics": heldout_names,
            "chars": len(heldout_text),
            "sha256": sha(heldout_text),
            "note": "whole topics joined by blank lines; their paragraphs are removed from the training text",
        },
        "train": {
            "documents": len(train_docs),
            "pydoc_topic_documents": sum(1 for d in topic_docs if d),
            "docstring_documents": sum(1 for d in docstring_docs if d),
            "chars": train_chars,
            "duplicate_or_heldout_paragraphs_dropped": dropped,
            "sha256": sha("\x00".join(train_docs)),
        },
    }
    return Corpus(train_docs, topic_texts, heldout_text, description)


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (lossless round trip) with Gemma's special-token ids and a <bos>-prepending post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"{name} got id {tok.token_to_id(name)}, expected {i}"
    return tok


def chat_documents(tok: Tokenizer, corpus: Corpus, args: argparse.Namespace) -> list[str]:
    """Conversations rendered by the chat template through transformers, about as many tokens as the chat windows
    will read, each short enough to fit one window."""
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_str()), bos_token="<bos>",
                                 eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                 chat_template=CHAT_TEMPLATE.read_text())

    def render(messages: list[dict], **options: object) -> str:
        return hf.apply_chat_template(messages, tokenize=False, **options)

    def count(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    budget = round(args.chat_share * args.steps * args.batch_size * args.seq_len)
    return tiny_chat_data.render_conversations(args.seed, corpus.topic_texts, render, count, budget, args.seq_len - 1)


def make_config(family: str, vocab_size: int, seq_len: int) -> Gemma4TextConfig | Gemma3nTextConfig:
    _, config_class, model_config = FAMILIES[family]
    config = config_class(
        vocab_size=vocab_size,
        vocab_size_per_layer_input=vocab_size,
        max_position_embeddings=seq_len,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=[EOS_ID, END_OF_TURN_ID],
        **model_config,
    )
    config._attn_implementation = "eager"
    return config


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Streams:
    """The training tokens: plain text (every document `<bos> ... <eos>`) and rendered conversations (each starting
    with the template's `<bos>`, ending with `<eos>`), and where the conversations start. Every token of a
    conversation is learnt, the prompt's too: tool declarations and responses are written in the calls' syntax, and
    this small model learns the format better with them than from its own turns alone (masking the rest, with 30%
    of the windows chat, gave 1 well-formed call and 6 JSON objects in 100 samples, tools/chat_format_check.py;
    learning every token with 25% gave 4 and 14)."""

    plain: torch.Tensor
    chat: torch.Tensor
    chat_starts: torch.Tensor


def pack(docs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents one after another, each closed by <eos>, and the offset each starts at."""
    starts = np.cumsum([0, *(len(d) + 1 for d in docs[:-1])])
    return torch.tensor([t for doc in docs for t in (*doc, EOS_ID)], dtype=torch.long), torch.from_numpy(starts)


def batch_rows(streams: Streams, args: argparse.Namespace, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` windows of `seq_len` tokens: a `chat_share` of them start at a conversation (so that its system
    turn and tool declarations are in view), the others at a random point of the plain text after a <bos>, as the
    held-out text is scored."""
    rows = []
    chat = torch.rand(args.batch_size, generator=generator) < args.chat_share
    for is_chat in chat.tolist():
        if is_chat:
            start = int(streams.chat_starts[torch.randint(len(streams.chat_starts), (1,), generator=generator)])
            rows.append(streams.chat[start:start + args.seq_len])
        else:
            offset = int(torch.randint(0, len(streams.plain) - args.seq_len + 1, (1,), generator=generator))
            rows.append(torch.cat([torch.tensor([BOS_ID]), streams.plain[offset:offset + args.seq_len - 1]]))
    return torch.stack(rows)


def train(model: PreTrainedModel, streams: Streams, args: argparse.Namespace) -> tuple[float, float]:
    """Train on `batch_rows` windows. Returns (final smoothed loss, seconds)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    smoothed = float("nan")
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        batch = batch_rows(streams, args, generator)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}/{args.steps}  loss {loss.item():.3f}  smoothed {smoothed:.3f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed:6.0f}s", flush=True)
    model.eval()
    return smoothed, time.perf_counter() - start


@torch.no_grad()
def heldout_perplexity(model: PreTrainedModel, ids: list[int], seq_len: int) -> tuple[float, int]:
    """exp(mean NLL) over every held-out token, in non-overlapping windows of <bos> + (seq_len - 1) tokens."""
    model.eval()
    span, total, count = seq_len - 1, 0.0, 0
    for start in range(0, len(ids), span):
        window = torch.tensor([[BOS_ID, *ids[start:start + span]]])
        logits = model(input_ids=window).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    return math.exp(total / count), count


def ngram_perplexities(train_ids: list[list[int]], heldout: list[int], vocab_size: int, span: int,
                       discount: float = 0.75) -> tuple[float, float]:
    """Unigram (add-one) and interpolated absolute-discounting bigram perplexities on the held-out tokens.

    Both are estimated from the training documents only; the bigram backs off to the add-one unigram, and the
    held-out tokens are cut into the model's windows of `span` tokens, each scored after <bos> as the model is.
    """
    unigram = np.ones(vocab_size)
    bigrams: Counter[tuple[int, int]] = Counter()
    for doc in train_ids:
        unigram += np.bincount(doc, minlength=vocab_size)
        bigrams.update(zip([BOS_ID, *doc[:-1]], doc))
    unigram /= unigram.sum()
    context_count: Counter[int] = Counter()
    context_types: Counter[int] = Counter()
    for (a, _), c in bigrams.items():
        context_count[a] += c
        context_types[a] += 1

    uni_nll = bi_nll = 0.0
    previous = BOS_ID
    for i, token in enumerate(heldout):
        if i % span == 0:
            previous = BOS_ID
        uni_nll -= math.log(unigram[token])
        n = context_count[previous]
        if n:
            backoff = discount * context_types[previous] / n
            p = max(bigrams[(previous, token)] - discount, 0) / n + backoff * unigram[token]
        else:
            p = unigram[token]
        bi_nll -= math.log(p)
        previous = token
    return math.exp(uni_nll / len(heldout)), math.exp(bi_nll / len(heldout))


def write_tokenizer(out: Path, tok: Tokenizer, max_positions: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": SPECIAL_TOKENS[4:],
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_positions,
        "padding_side": "left",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_bundle(out: Path, model: PreTrainedModel, tok: Tokenizer, corpus: Corpus, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    write_tokenizer(out, tok, model.config.max_position_embeddings)
    files = {
        "generation_config.json": {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_OF_TURN_ID],
                                   "pad_token_id": PAD_ID},
        "train_report.json": report,
    }
    for name, data in files.items():
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    shutil.copyfile(CHAT_TEMPLATE, out / "chat_template.jinja")
    (out / "heldout.txt").write_text(corpus.heldout_text)


def verify(out: Path, model_class: type[PreTrainedModel], heldout_ids: list[int], seq_len: int, expected_ppl: float,
           prompt: str, chat_prompt: str) -> dict:
    """Reload the written checkpoint the way users will and check keys, perplexity and greedy samples: of plain text,
    and of a chat reply with get_weather declared, up to the end of the turn or a call's <|tool_response>."""
    model, info = model_class.from_pretrained(out, attn_implementation="eager", output_loading_info=True,
                                              dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"reload problems: {bad}"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = (out / "heldout.txt").read_text()
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text, "tokenizer does not round-trip"
    assert tok.encode(prompt).ids[0] == BOS_ID, "post-processor does not prepend <bos>"
    ppl, _ = heldout_perplexity(model, heldout_ids, seq_len)
    assert abs(ppl - expected_ppl) < 1e-3 * expected_ppl, f"reloaded ppl {ppl} != saved {expected_ppl}"
    ids = torch.tensor([tok.encode(prompt).ids])
    generated = model.generate(ids, max_new_tokens=40, do_sample=False)[0, ids.shape[1]:].tolist()
    hf = AutoTokenizer.from_pretrained(out)
    chat_text = hf.apply_chat_template([{"role": "user", "content": chat_prompt}], tokenize=False,
                                       tools=[tiny_chat_data.TOOLS["get_weather"]], add_generation_prompt=True)
    chat_ids = torch.tensor([tok.encode(chat_text, add_special_tokens=False).ids])
    stops = [EOS_ID, END_OF_TURN_ID, tok.token_to_id("<|tool_response>")]
    reply = model.generate(chat_ids, max_new_tokens=80, do_sample=False, eos_token_id=stops)[0, chat_ids.shape[1]:]
    return {"reloaded_heldout_ppl": round(ppl, 3), "prompt": prompt,
            "greedy_continuation": tok.decode(generated), "chat_prompt": chat_text,
            "greedy_chat_reply": tok.decode(reply.tolist(), skip_special_tokens=False)}


LORA_TEXTS = ("idlelib/NEWS.txt", "idlelib/NEWS2x.txt")  # not .py files, so in no pretraining document
LORA_HELDOUT_EVERY = 8
LORA_PROMPT = "gh-"
# --lora-targets: every linear layer (the PLE projections too), or the attention and MLP projections alone (the
# targets Unsloth's examples give); `export --lora-slots RANK` slots both.
LORA_TARGETS: dict[str, str | list[str]] = {"all-linear": "all-linear", "projections": list(PROJECTIONS)}


def lora_corpus() -> tuple[str, str, dict]:
    """IDLE's change-log entries (paragraphs), every LORA_HELDOUT_EVERY-th held out: (train text, held-out text,
    description)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / name).read_text() for name in LORA_TEXTS]
    entries = [p for text in texts for p in _paragraphs(text)]
    heldout = [p for i, p in enumerate(entries) if i % LORA_HELDOUT_EVERY == LORA_HELDOUT_EVERY - 1]
    train_part = [p for i, p in enumerate(entries) if i % LORA_HELDOUT_EVERY != LORA_HELDOUT_EVERY - 1]
    join = "\n\n".join
    description = {"sources": [f"<stdlib>/{name}" for name in LORA_TEXTS],
                   "split": f"paragraphs (change-log entries); every {LORA_HELDOUT_EVERY}th held out",
                   "train_chars": len(join(train_part)), "heldout_chars": len(join(heldout)),
                   "sha256": {name: hashlib.sha256(t.encode()).hexdigest() for name, t in zip(LORA_TEXTS, texts)}}
    return join(train_part), join(heldout), description


@torch.no_grad()
def greedy(model: PreTrainedModel, tok: Tokenizer, prompt: str, tokens: int = 40) -> str:
    ids = torch.tensor([[BOS_ID, *tok.encode(prompt, add_special_tokens=False).ids]])
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=PAD_ID)
    return prompt + tok.decode(out[0, ids.shape[1]:].tolist())


def lora_artifact_perplexities(adapter: Path, heldout_ids: list[int], seq_len: int, weights: list[str],
                               slots: int) -> dict[str, dict[str, float]]:
    """Held-out perplexity through edge-runtime, per weight format: the base exported, the base exported with
    `--adapter` (merged), and the base exported with `--lora-slots SLOTS` and the adapter attached at load
    (`perplexity --adapter`), with no adapter too. Windows as heldout_perplexity's; fp32 KV cache."""
    from edge_runtime.bundled import BUNDLED_CHECKPOINT
    from edge_runtime.export import export_checkpoint
    from edge_runtime.model import load
    from edge_runtime.perplexity import evaluate

    def perplexity(artifact: Path, attached: Path | None = None) -> float:
        model = load(artifact, kv="fp32", adapter=attached)
        return round(evaluate(model, heldout_ids, context=seq_len).perplexity, 3)

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        def export(fmt: str, name: str, **options: object) -> Path:
            return export_checkpoint(BUNDLED_CHECKPOINT, Path(tmp) / f"{fmt}-{name}", weights=fmt, **options)

        for fmt in weights:
            row = {"base": perplexity(export(fmt, "base")),
                   "merged": perplexity(export(fmt, "merged", adapters=[adapter]))}
            slotted = export(fmt, "slots", lora_slots=str(slots))
            row["slots_no_adapter"] = perplexity(slotted)
            row["attached"] = perplexity(slotted, adapter)
            figures[fmt] = row
            print(f"edge-runtime {fmt}: {row}", flush=True)
    return figures


def lora_finetune(args: argparse.Namespace) -> dict:
    """Fine-tune the bundled model with LoRA on IDLE's change logs; the adapter and its report go to args.lora_out,
    with the held-out text as heldout.txt (for `edge-runtime perplexity --text-file`)."""
    from peft import LoraConfig, get_peft_model

    from edge_runtime.bundled import BUNDLED_CHECKPOINT

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()
    train_text, heldout_text, description = lora_corpus()
    tok = Tokenizer.from_file(str(BUNDLED_CHECKPOINT / "tokenizer.json"))
    plain = torch.tensor(tok.encode(train_text, add_special_tokens=False).ids, dtype=torch.long)
    heldout_ids = tok.encode(heldout_text, add_special_tokens=False).ids
    model = Gemma4ForCausalLM.from_pretrained(BUNDLED_CHECKPOINT, dtype=torch.float32)
    before_ppl, scored = heldout_perplexity(model, heldout_ids, args.seq_len)
    before_sample = greedy(model, tok, LORA_PROMPT)
    print(f"tokens: train {len(plain)}  held-out {scored}; held-out perplexity before {before_ppl:.2f}", flush=True)
    targets = LORA_TARGETS[args.lora_targets]
    config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    no_chat = torch.zeros(0, dtype=torch.long)  # plain text only: every window starts after a <bos>
    train_args = argparse.Namespace(**{**vars(args), "chat_share": 0.0})
    train_loss, train_seconds = train(peft_model, Streams(plain, no_chat, no_chat), train_args)
    after_ppl, _ = heldout_perplexity(peft_model, heldout_ids, args.seq_len)
    after_sample = greedy(peft_model, tok, LORA_PROMPT)
    print(f"held-out perplexity after {after_ppl:.2f}", flush=True)
    peft_model.save_pretrained(args.lora_out)
    (args.lora_out / "heldout.txt").write_text(heldout_text)

    artifact_ppl = lora_artifact_perplexities(args.lora_out, heldout_ids, args.seq_len,
                                              args.lora_weights.split(","), args.lora_r)
    report = {
        "base": "the bundled model (edge_runtime/bundled/gemma4-tiny)",
        "adapter": {"r": args.lora_r, "lora_alpha": 2 * args.lora_r, "target_modules": targets,
                    "trainable_parameters": trainable},
        "data": description,
        "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "lr": f"peak {args.lr}, cosine to 10%", "seed": args.seed, "threads": args.threads,
                     "train_seconds": round(train_seconds, 1), "final_train_loss_ema": round(train_loss, 4)},
        "heldout_ppl": {"method": f"{scored} held-out tokens, non-overlapping windows of <bos> + {args.seq_len - 1}",
                        "before": round(before_ppl, 3), "after": round(after_ppl, 3),
                        "edge_runtime": artifact_ppl},
        "greedy": {"before": before_sample, "after": after_sample},
    }
    (args.lora_out / "lora_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"greedy before: {before_sample!r}\ngreedy after:  {after_sample!r}\nwrote {args.lora_out}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="gemma4")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (replaced)")
    parser.add_argument("--steps", type=int, default=720, help="optimizer steps (~0.6 s each on 2 idle cores)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512, help="training window; also max_position_embeddings")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine to 10%%)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--chat-share", type=float, default=0.25,
                        help="share of the training windows that start at a rendered conversation")
    parser.add_argument("--prompt", default="The list", help="prompt of the greedy sample in the report")
    parser.add_argument("--chat-prompt", default="What is the weather in Oslo?",
                        help="user message of the greedy chat sample in the report (get_weather declared)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype the checkpoint is saved in (training is float32; held-out perplexity is measured "
                             "on the saved weights)")
    parser.add_argument("--lora-out", type=Path, default=None,
                        help="fine-tune the bundled model with LoRA on IDLE's change logs; write the adapter here")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank of --lora-out (alpha is twice it)")
    parser.add_argument("--lora-targets", choices=sorted(LORA_TARGETS), default="all-linear",
                        help="modules --lora-out trains (projections: those --lora-slots slots, so the adapter is "
                             "also measured attached at load)")
    parser.add_argument("--lora-weights", default="fp32,int8,int4",
                        help="weight formats --lora-out measures the adapter's artifacts in, comma-separated")
    args = parser.parse_args()
    if args.lora_out is not None:
        lora_finetune(args)
        return

    wall_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()

    corpus = build_corpus()
    print(json.dumps(corpus.description, indent=2))
    tok = train_tokenizer(corpus.train_docs, args.vocab_size)
    train_ids = [e.ids for e in tok.encode_batch(corpus.train_docs, add_special_tokens=False)]
    heldout_ids = tok.encode(corpus.heldout_text, add_special_tokens=False).ids
    assert tok.decode(heldout_ids) == corpus.heldout_text, "tokenizer does not round-trip the held-out text"
    chat_docs = chat_documents(tok, corpus, args)
    chat_ids = [e.ids for e in tok.encode_batch(chat_docs, add_special_tokens=False)]
    assert all(ids[0] == BOS_ID for ids in chat_ids), "a rendered conversation does not start with <bos>"
    plain, _ = pack([[BOS_ID, *ids] for ids in train_ids])
    chat, chat_starts = pack(chat_ids)
    streams = Streams(plain, chat, chat_starts[chat_starts <= len(chat) - args.seq_len])
    print(f"tokens: plain {len(plain)}  chat {len(chat)} ({len(chat_docs)} conversations)  "
          f"held-out {len(heldout_ids)}", flush=True)

    model_class, _, model_config = FAMILIES[args.family]
    model = model_class(make_config(args.family, tok.get_vocab_size(), args.seq_len))
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params}", flush=True)
    train_loss, train_seconds = train(model, streams, args)
    if args.dtype == "bfloat16":  # the saved values, as float32: what the reload and the tests compute with
        model = model.to(torch.bfloat16).to(torch.float32)

    ppl, scored = heldout_perplexity(model, heldout_ids, args.seq_len)
    unigram_ppl, bigram_ppl = ngram_perplexities(train_ids, heldout_ids, tok.get_vocab_size(), args.seq_len - 1)
    print(f"held-out perplexity: model {ppl:.2f}  bigram {bigram_ppl:.2f}  unigram {unigram_ppl:.2f}", flush=True)

    config = model.config
    report = {
        "model": f"{model_class.__name__} (transformers "
                 f"{__import__('transformers').__version__}, torch {torch.__version__}), {args.dtype}",
        "config": {**model_config, "vocab_size": config.vocab_size,
                   "vocab_size_per_layer_input": config.vocab_size_per_layer_input,
                   "max_position_embeddings": config.max_position_embeddings,
                   "rope_parameters": config.rope_parameters, "kv_sharing_modes": config.kv_sharing_modes},
        "parameters": params,
        "training": {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "tokens_seen": args.steps * args.batch_size * args.seq_len, "chat_share": args.chat_share,
                     "plain_epochs": round(args.steps * args.batch_size * (1 - args.chat_share) * (args.seq_len - 1)
                                           / len(plain), 2),
                     "optimizer": f"AdamW(betas=(0.9, 0.95), weight_decay={args.weight_decay} on matrices)",
                     "lr": f"peak {args.lr}, linear warm-up {max(1, args.steps // 20)} steps, cosine to 10%",
                     "grad_clip": 1.0, "seed": args.seed, "threads": args.threads,
                     "train_seconds": round(train_seconds, 1), "final_train_loss_ema": round(train_loss, 4)},
        "tokenizer": {"type": "byte-level BPE (tokenizers), trained on the training split only",
                      "vocab_size": tok.get_vocab_size(),
                      "special_tokens": {name: i for i, name in enumerate(SPECIAL_TOKENS)}},
        "data": {**corpus.description, "plain_tokens": len(plain), "heldout_tokens": len(heldout_ids),
                 "chat": {"conversations": len(chat_docs), "tokens": len(chat),
                          "sha256": hashlib.sha256("\x00".join(chat_docs).encode()).hexdigest(),
                          "source": "tools/tiny_chat_data.py, rendered by the chat template through transformers, "
                                    f"seed {args.seed}"}},
        "heldout_eval": {
            "method": f"token-level perplexity over all {scored} held-out tokens, non-overlapping windows of "
                      f"<bos> + {args.seq_len - 1} tokens (heldout.txt encoded without special tokens)",
            "model_ppl": round(ppl, 3),
            "unigram_ppl": round(unigram_ppl, 3),
            "unigram_method": "training-split token frequencies, add-one smoothing",
            "bigram_ppl": round(bigram_ppl, 3),
            "bigram_method": "interpolated absolute discounting (d=0.75) over the add-one unigram, training split",
        },
    }
    write_bundle(args.out, model.to(getattr(torch, args.dtype)), tok, corpus, report)
    checks = verify(args.out, model_class, heldout_ids, args.seq_len, ppl, args.prompt, args.chat_prompt)
    report["verification"] = checks
    report["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    (args.out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"reloaded: ppl {checks['reloaded_heldout_ppl']}  "
          f"sample {args.prompt!r} -> {checks['greedy_continuation']!r}\n"
          f"chat {args.chat_prompt!r} -> {checks['greedy_chat_reply']!r}")
    print(f"wrote {args.out} ({size / 1e6:.2f} MB) in {report['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
