"""Runtime behaviour beyond parity: sampling, streaming, per-token PLE reads, cache sizes, input errors."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.kv_formats import ROLLBACK_TOKENS
from edge_runtime.sampling import Sampler, SamplingParams

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def model(artifacts):
    return edge_runtime.load(artifacts["shared-mqa-wide"])


def test_seeded_sampling_is_reproducible(model):
    a = model.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=3)
    b = model.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=3)
    others = {model.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=s) for s in range(4, 8)}
    assert a == b
    assert len(others | {a}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = model.generate(PROMPT, max_new_tokens=15, temperature=0)
    assert model.generate(PROMPT, max_new_tokens=15, temperature=1.5, top_k=1, seed=0) == greedy
    assert model.generate(PROMPT, max_new_tokens=15, temperature=1.0, top_k=0, top_p=1e-9, seed=0) == greedy


def test_sampler_respects_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    top2 = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=1.0), seed=0)
    assert {top2(logits) for _ in range(200)} == {0, 1}
    nucleus = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.85), seed=0)
    assert {nucleus(logits) for _ in range(300)} == {0, 1, 2}
    counts = np.bincount([Sampler(SamplingParams(1.0, 0, 1.0), seed=s)(logits) for s in range(2000)], minlength=4)
    np.testing.assert_allclose(counts / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)


@pytest.mark.parametrize("params,message", [
    (dict(temperature=-1), "temperature=-1: must be >= 0"),
    (dict(top_k=-2), "top_k=-2: must be >= 0"),
    (dict(top_p=0.0), "top_p=0.0: must be in (0, 1]"),
])
def test_bad_sampling_parameters(model, params, message):
    with pytest.raises(EdgeRuntimeError, match=message.replace("(", r"\(").replace("]", r"\]")):
        model.generate(PROMPT, max_new_tokens=2, **params)


def test_stream_pieces_join_to_generate(model):
    pieces = list(model.stream(PROMPT, max_new_tokens=25, temperature=0))
    assert "".join(pieces) == model.generate(PROMPT, max_new_tokens=25, temperature=0)
    greedy = list(model.generate_tokens(model.encode(PROMPT), max_new_tokens=25, temperature=0))
    assert model.stats.generated_tokens == len(greedy) > 0
    assert model.stats.prompt_tokens == len(model.encode(PROMPT))


def test_encode_adds_one_bos_and_decode_round_trips(model):
    ids = model.encode(PROMPT)
    assert ids[0] == 2 and ids.count(2) == 1
    assert model.decode(ids) == PROMPT


def test_ple_rows_are_read_per_processed_token(model, monkeypatch):
    """The store is asked for exactly the rows of the tokens each step processes, never the table."""
    seen: list[list[int]] = []
    original = model.engine.ple.rows

    def spy(ids):
        seen.append(list(np.asarray(ids)))
        return original(ids)

    monkeypatch.setattr(model.engine.ple, "rows", spy)
    prompt = model.encode(PROMPT)
    model.reset()  # else the prompt's cached prefix (from earlier tests) is not read again
    tokens = list(model.generate_tokens(prompt, max_new_tokens=6, temperature=0))
    assert seen[0] == prompt
    assert seen[1:] == [[t] for t in tokens[:-1]]


def test_sliding_layers_keep_only_their_window(model):
    spec = model.spec
    ids = np.arange(3, 3 + 5 * spec.sliding_window)
    model.logits(ids, mode="decode")
    for layer in spec.cache_layers():
        store = model.engine.cache.stores[layer]
        (slots,) = {len(array) for s in (*store.keys, *store.values) for array in s.data.values()}
        if spec.layer_types[layer] == "sliding_attention":
            assert slots == spec.sliding_window + ROLLBACK_TOKENS
        else:
            assert slots >= len(ids)


def test_prompt_longer_than_context_is_refused(artifacts):
    small = edge_runtime.load(artifacts["shared-gqa"], context_length=16)
    with pytest.raises(EdgeRuntimeError, match="the prompt has 20 tokens but the context holds 16"):
        small.logits(np.arange(3, 23))
    with pytest.raises(EdgeRuntimeError, match="context_length=9999: must be between 1 and the model's 256"):
        edge_runtime.load(artifacts["shared-gqa"], context_length=9999)


def test_generation_stops_at_context_end(artifacts):
    """With 12 positions and a 7-token prompt, positions 7..11 are fed back: 6 tokens at most."""
    prompt = list(range(3, 10))
    unbounded = list(edge_runtime.load(artifacts["shared-gqa"]).generate_tokens(prompt, 50, temperature=0))
    small = edge_runtime.load(artifacts["shared-gqa"], context_length=12)
    assert list(small.generate_tokens(prompt, max_new_tokens=50, temperature=0)) == unbounded[:6]


def test_bad_token_ids_and_mode(model):
    with pytest.raises(EdgeRuntimeError, match="outside the model's vocabulary of 512"):
        model.logits([2, 600])
    with pytest.raises(EdgeRuntimeError, match="mode='fast': must be 'prefill' or 'decode'"):
        model.logits([2, 5], mode="fast")


def test_logits_in_chunks_are_the_logits_a_chunk_at_a_time(artifacts):
    model = edge_runtime.load(artifacts["shared-gqa"], kv="fp32", prefill_chunk=8)
    ids = np.arange(3, 3 + 20)
    chunks, vocab = list(model.logits_in_chunks(ids)), model.spec.vocab_size
    assert [c.shape for c in chunks] == [(8, vocab), (8, vocab), (4, vocab)]
    np.testing.assert_array_equal(np.concatenate(chunks), model.logits(ids))
    assert [c.shape for c in model.logits_in_chunks(ids[:3], mode="decode")] == [(1, vocab)] * 3
    with pytest.raises(EdgeRuntimeError, match="^mode='fast': must be 'prefill' or 'decode'$"):
        model.logits_in_chunks(ids, mode="fast")  # on the call, not at the first chunk
    with pytest.raises(EdgeRuntimeError, match="^no tokens given$"):
        model.logits_in_chunks([])


def test_the_model_reports_what_its_cache_holds(artifacts):
    """What bench, chat's /stats and the server read, through Model rather than its engine."""
    model = edge_runtime.load(artifacts["shared-gqa"], kv="fp16")
    assert (model.context_used, model.kv_cache_bytes, model.kv_read_bytes) == (0, 0, 0)
    model.feed(np.arange(3, 3 + 20))
    assert model.context_used == 20 and model.kv_read_bytes > 0 and model.kv_cache_bytes >= model.kv_read_bytes
    model.feed([7])
    assert model.context_used == 21
    prompt = list(range(3, 10))
    tokens = list(model.generate_tokens(prompt, max_new_tokens=4, temperature=0,
                                        stop_token_ids=range(model.spec.vocab_size)))
    assert (tokens, model.stats.finish_reason, model.context_used) == ([], "stop", len(prompt))
    model.reset()
    assert model.context_used == 0 and model.kv_read_bytes == 0


def test_threads_are_what_each_model_runs_on(artifacts):
    """Each model's sessions have their own pools (engine.py: they stop spinning when a run returns), so models with
    different thread counts share a process; a model loaded without a count runs on up to 4."""
    first = edge_runtime.load(artifacts["shared-gqa"])
    assert 1 <= first.threads <= 4
    other = edge_runtime.load(artifacts["shared-gqa"], threads=first.threads + 1)
    assert other.threads == first.threads + 1
    np.testing.assert_allclose(other.logits([2, 7, 9]), first.logits([2, 7, 9]), rtol=0, atol=1e-5)


def test_generation_config_sets_defaults(checkpoints, tmp_path):
    import json
    import shutil

    from edge_runtime.export import export_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints["shared-gqa"], ckpt)
    config = json.loads((ckpt / "generation_config.json").read_text())
    (ckpt / "generation_config.json").write_text(json.dumps({**config, "do_sample": False, "top_k": 7}))
    model = edge_runtime.load(export_checkpoint(ckpt, tmp_path / "a"))
    assert model.default_sampling == SamplingParams(temperature=0.0, top_k=7, top_p=0.95)
    assert model.eos_token_ids == {1, 5}
    assert model.generate(PROMPT, max_new_tokens=10) == model.generate(PROMPT, max_new_tokens=10, temperature=0)


def test_stream_decoder_holds_split_characters_and_flushes_the_rest(model):
    """A multi-byte character split over tokens is emitted whole; one cut off by the end is still flushed."""
    from edge_runtime.tokenizer import StreamDecoder

    tok = model.tokenizer
    text = "naïve café ☕"
    ids = tok.encode(text, add_bos=False)
    byte_tokens = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert byte_tokens, "the test text should contain characters split across byte-level tokens"
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) + decoder.flush() == text
    cut = ids[:-1]  # ends inside the 3-byte "☕"
    decoder = StreamDecoder(tok)
    streamed = "".join(decoder.push(i) for i in cut) + decoder.flush()
    assert streamed == tok.decode(cut) and streamed.endswith("\ufffd")


def test_low_memory_changes_chunking_not_results(artifacts):
    default = edge_runtime.load(artifacts["shared-gqa"], kv="fp32")
    low = edge_runtime.load(artifacts["shared-gqa"], low_memory=True, kv="fp32")
    assert (default.prefill_chunk, low.prefill_chunk) == (256, 64)
    assert edge_runtime.load(artifacts["shared-gqa"], low_memory=True, prefill_chunk=8).prefill_chunk == 8
    ids = default.encode("a prompt that is long enough to span several of the low-memory prefill chunks " * 2)
    np.testing.assert_allclose(low.logits(ids), default.logits(ids), atol=1e-4)  # the parity tolerance


@pytest.mark.parametrize("threads", [0, -2, 1.5])
@pytest.mark.parametrize("profile", [None, "pi5-8gb"])
def test_threads_below_one_are_refused_not_taken_as_the_default(artifacts, threads, profile):
    with pytest.raises(EdgeRuntimeError, match=rf"^threads={threads}: must be a whole number of at least 1 "):
        edge_runtime.load(artifacts["shared-gqa"], threads=threads, profile=profile)


@pytest.mark.parametrize("call", ["encode", "generate", "stream", "create_completion"])
def test_a_lone_surrogate_is_refused_with_its_index(model, call):
    """A str that is not Unicode (JSON's \\ud800, a surrogateescape'd byte) used to reach the tokenizer:
    TypeError: TextInputSequence must be str."""
    with pytest.raises(EdgeRuntimeError, match=r"^the text: character 1 is a lone surrogate \(U\+D800\), which is "
                                               r"not text; pass valid Unicode"):
        getattr(model, call)("a\ud800b")


def test_a_lone_surrogate_in_a_chat_message_names_the_message(bundled):
    model = edge_runtime.load(bundled[0])
    messages = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "What is \udcff?"}]
    with pytest.raises(EdgeRuntimeError, match=r"^messages\[2\]\.content: character 8 is a lone surrogate "
                                               r"\(U\+DCFF\)"):
        model.chat(messages)
    conversation = model.conversation(system="Be brief.\ud800")
    with pytest.raises(EdgeRuntimeError, match=r"^messages\[0\]\.content: character 9 is a lone surrogate"):
        conversation.say("Hi.")
    assert conversation.turns == []
