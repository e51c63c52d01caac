"""Chat on the bundled (trained) model: conversations that reuse the KV cache, OpenAI shapes, stops, the lock."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edge_runtime
from edge_runtime import GenerationStats
from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.chat_template import ChatTemplate
from edge_runtime.errors import ContextLengthError, EdgeRuntimeError
from edge_runtime.reply_parser import parse_reply

BUNDLED_TEMPLATE = (BUNDLED_CHECKPOINT / "chat_template.jinja").read_text()

REPLY = 10  # tokens: replies of the bundled model past that run into runs of spaces it tokenizes oddly
QUESTIONS = ["Tell me about the sea.", "And the river?", "Thank you."]


@pytest.fixture(scope="module")
def model(bundled):
    return edge_runtime.load(bundled[0], kv="fp32")


def counted_forward(model, monkeypatch) -> list[int]:
    """Tokens run through the model per forward call, counted at the engine rather than read from stats."""
    calls: list[int] = []
    original = model.engine.forward

    def forward(ids, all_logits):
        calls.append(len(ids))
        return original(ids, all_logits)

    monkeypatch.setattr(model.engine, "forward", forward)
    return calls


# The bundled template trims each reply, as Gemma's templates do; this one keeps replies exactly as generated.
UNTRIMMED = BUNDLED_TEMPLATE.replace("{{- ns.result | trim -}}", "{{- ns.result -}}")
assert UNTRIMMED != BUNDLED_TEMPLATE


@pytest.mark.parametrize("template", ["bundled", "untrimmed"])
def test_three_turns_equal_a_fresh_prefill_and_reuse_the_cache(model, monkeypatch, template):
    """Each turn runs only what follows the cached transcript; its reply equals a fresh prefill's (greedy)."""
    fresh = edge_runtime.load(model.path, kv="fp32")
    if template == "untrimmed":
        for m in (model, fresh):
            monkeypatch.setattr(m, "chat_template", ChatTemplate(UNTRIMMED, origin="untrimmed test template"))
    model.reset()
    conversation = model.conversation(system="Answer in one sentence.")
    calls = counted_forward(model, monkeypatch)
    replies, prompts, reused, generated = [], [], [], []
    for question in QUESTIONS:
        before = list(model.engine.tokens)
        prompt = model.chat_prompt_ids([*conversation.messages, {"role": "user", "content": question}])
        calls.clear()
        replies.append(conversation.say(question, max_new_tokens=REPLY, temperature=0))
        stats = conversation.stats
        decode_steps = max(stats.generated_tokens - 1, 0)  # one token each, after the prefill calls
        prefill = sum(calls[: len(calls) - decode_steps])
        common = next((i for i, (a, b) in enumerate(zip(before, prompt)) if a != b), min(len(before), len(prompt)))
        assert stats.prompt_tokens == len(prompt)
        assert stats.cached_tokens == common and stats.processed_tokens == len(prompt) - common == prefill
        prompts.append(prompt)
        reused.append(common)
        generated.append(stats.generated_tokens)
    print(template, "prompt lengths", [len(p) for p in prompts], "reused", reused, "generated", generated)
    assert reused[0] == 0
    for turn in (1, 2):
        # The whole previous prompt is reused. Where the template keeps replies as generated, so is everything
        # the cache held: the reply's tokens but the last (sampled, never run), i.e. only new tokens run.
        # (Gemma's templates trim replies, and this model's start with a newline: from there it runs again.)
        held = len(prompts[turn - 1]) + generated[turn - 1] - 1
        assert reused[turn] == held if template == "untrimmed" else reused[turn] >= len(prompts[turn - 1])
    for turn, prompt in enumerate(prompts):
        fresh.reset()
        tokens = list(fresh.generate_tokens(prompt, max_new_tokens=REPLY, temperature=0,
                                            stop_token_ids=fresh.reply_stop_ids, constraint=fresh.constraint_for()))
        assert fresh.stats.cached_tokens == 0
        assert parse_reply(fresh.tokenizer.decode(tokens, skip_special_tokens=False))["content"] == replies[turn]
        assert fresh.chat(conversation.messages[: 2 + 2 * turn], max_new_tokens=REPLY, temperature=0) == replies[turn]


def test_a_second_conversation_on_the_same_model_still_answers_correctly(model):
    first, second = model.conversation(), model.conversation()
    a1 = first.say(QUESTIONS[0], max_new_tokens=12, temperature=0)
    b1 = second.say("Who are you?", max_new_tokens=12, temperature=0)
    a2 = first.say(QUESTIONS[1], max_new_tokens=12, temperature=0)
    assert model.stats.cached_tokens < len(model.chat_prompt_ids(first.messages[:2]))  # second's turn evicted it
    fresh = edge_runtime.load(model.path, kv="fp32")
    assert fresh.chat(first.messages[:3], max_new_tokens=12, temperature=0) == a2
    assert fresh.chat(second.messages[:1], max_new_tokens=12, temperature=0) == b1
    assert a1 == first.messages[1]["content"]


def test_chat_completion_has_the_openai_shape(model):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    result = model.create_chat_completion(messages, max_tokens=16, temperature=0)
    assert set(result) == {"id", "object", "created", "model", "choices", "usage"}
    assert result["object"] == "chat.completion" and result["id"].startswith("chatcmpl-")
    (choice,) = result["choices"]
    assert choice["message"]["role"] == "assistant" and choice["index"] == 0
    assert choice["finish_reason"] in ("stop", "length")
    usage = result["usage"]
    assert usage["prompt_tokens"] == len(model.chat_prompt_ids(messages))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    chunks = list(model.create_chat_completion(messages, max_tokens=16, temperature=0, stream=True,
                                               include_usage=True))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == choice["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage


def test_max_tokens_and_stop_strings(model):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    full = model.create_chat_completion(messages, max_tokens=24, temperature=0, repetition_penalty=1.0)
    text = full["choices"][0]["message"]["content"]
    short = model.create_chat_completion(messages, max_tokens=3, temperature=0, repetition_penalty=1.0)
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
    assert text.startswith(short["choices"][0]["message"]["content"])
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    stopped = model.create_chat_completion(messages, max_tokens=24, temperature=0, stop=[stop, "\u00a7never"])
    assert stopped["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    streamed = model.create_chat_completion(messages, max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == text[: text.index(stop)]


def test_text_completion_shape(model):
    result = model.create_completion("The sea", max_tokens=5, temperature=0)
    assert result["object"] == "text_completion" and result["choices"][0]["finish_reason"] == "length"
    assert result["choices"][0]["text"] == model.generate("The sea", max_new_tokens=5, temperature=0)
    chunks = list(model.create_completion("The sea", max_tokens=5, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == result["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_with_min_p_and_penalty_is_reproducible(model):
    messages = [{"role": "user", "content": "Tell me a story."}]
    options = dict(max_new_tokens=20, temperature=1.0, min_p=0.05, repetition_penalty=1.3)
    assert model.chat(messages, seed=3, **options) == model.chat(messages, seed=3, **options)


def test_threads_sharing_a_model_get_sequential_answers(model):
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    expected = [model.chat(p, max_new_tokens=10, temperature=0) for p in prompts]
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        results[i] = model.chat(prompts[i % 3], max_new_tokens=10, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == expected * 2


@pytest.mark.parametrize("messages,message", [
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"content": "hi"}], "messages\\[0\\]: has no 'role'"),
])
def test_bad_messages_are_one_line_errors(model, messages, message):
    with pytest.raises(EdgeRuntimeError, match=message) as caught:
        model.create_chat_completion(messages)
    assert "\n" not in str(caught.value)


def test_the_templates_own_error_is_one_line(model, monkeypatch):
    """Gemma 4's template accepts any order of roles; a template that refuses one is still reported in a line."""
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must "
                          "alternate user/assistant/user/assistant/...') }}{% endif %}", origin="strict template")
    monkeypatch.setattr(model, "chat_template", strict)
    with pytest.raises(EdgeRuntimeError) as caught:
        model.create_chat_completion([{"role": "assistant", "content": "hi"}])
    assert str(caught.value) == ("chat template strict template: Conversation roles must alternate "
                                 "user/assistant/user/assistant/...")


def test_bad_options_fail_before_generating(model):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(EdgeRuntimeError, match="max_tokens=0: must be a positive integer"):
        model.create_chat_completion(messages, max_tokens=0)
    with pytest.raises(EdgeRuntimeError, match="min_p"):
        model.create_chat_completion(messages, min_p=1.5, stream=True)
    long = [{"role": "user", "content": "word " * 600}]
    with pytest.raises(EdgeRuntimeError, match=r"the prompt has \d+ tokens but the context holds 512"):
        model.create_chat_completion(long)


def test_cache_is_cut_back_when_a_prompt_diverges(model):
    ids = model.encode("The river runs down to the sea and the sea is wide")
    model.reset()
    model.feed(ids)
    other = ids[:-3] + model.encode(" mountain high", )[1:]
    expected = edge_runtime.load(model.path, kv="fp32").logits(other)[-1]
    assert model.engine.reuse(other) == len(ids) - 3
    got = model.feed(other[len(ids) - 3:])[-1]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_old_turns_are_dropped_when_the_context_is_full(bundled):
    small = edge_runtime.load(bundled[0], kv="fp32", context_length=96)
    conversation = small.conversation(system="Be brief.")
    for question in QUESTIONS * 2:
        reply = conversation.say(question, max_new_tokens=12, temperature=0)
        assert small.stats.prompt_tokens + 12 <= 96 or small.stats.finish_reason == "length"
        assert conversation.messages[-1]["role"] == "assistant" and conversation.messages[-1]["content"] == reply
    assert conversation.dropped_turns > 0
    assert conversation.messages[0] == {"role": "system", "content": "Be brief."}
    kept = conversation.messages[:-2]
    fresh = edge_runtime.load(bundled[0], kv="fp32")
    assert fresh.chat([*kept, conversation.messages[-2]], max_new_tokens=12, temperature=0) == reply


def test_an_interrupted_step_does_not_poison_the_next_prompt(model, monkeypatch):
    """Ctrl-C can land between the cache commit and the token list update: the cache then holds positions the
    token list does not; cutting back by position (KVCache.truncate) still leaves exactly the reused prefix."""
    ids = model.encode("The river runs down to the sea")
    expected = list(model.generate_tokens(ids, max_new_tokens=6, temperature=0))
    original = model.engine.cache.commit

    def commit_then_interrupt(new_kv, positions):
        original(new_kv, positions)
        raise KeyboardInterrupt

    monkeypatch.setattr(model.engine.cache, "commit", commit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        model.feed(model.encode(" and back again"))
    monkeypatch.undo()
    assert model.engine.cache.length > len(model.engine.tokens)
    assert list(model.generate_tokens(ids, max_new_tokens=6, temperature=0)) == expected
    assert model.stats.cached_tokens == len(ids) - 1


def test_a_message_longer_than_the_context_is_refused_and_the_conversation_kept(bundled):
    """It used to drop every earlier turn first (to make room), then raise: the conversation was gone."""
    small = edge_runtime.load(bundled[0], kv="fp32", context_length=128)
    conversation = small.conversation(system="Be brief.")
    first = conversation.say(QUESTIONS[0], max_new_tokens=8, temperature=0)
    second = conversation.say(QUESTIONS[1], max_new_tokens=8, temperature=0)
    kept, stats = list(conversation.messages), conversation.stats
    long = "word " * 120
    alone = len(small.chat_prompt_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": long}]))
    with pytest.raises(ContextLengthError) as refused:
        conversation.say(long, max_new_tokens=8, temperature=0)
    assert str(refused.value) == (f"the message takes {alone} tokens (with the system prompt and the chat template's "
                                  "markers) but the context holds 128; it was not added to the conversation: shorten "
                                  "it, or load the model with a longer context")
    assert conversation.messages == kept and conversation.dropped_turns == 0 and conversation.stats is stats
    assert [m["content"] for m in kept[2::2]] == [first, second]
    third = conversation.say(QUESTIONS[2], max_new_tokens=8, temperature=0)
    assert conversation.stats.cached_tokens > 0
    fresh = edge_runtime.load(bundled[0], kv="fp32", context_length=128)
    assert fresh.chat([*kept, {"role": "user", "content": QUESTIONS[2]}], max_new_tokens=8, temperature=0) == third


def test_conversation_stats_are_its_last_turn_and_cleared_by_reset(model):
    """They used to be the model's, so after reset (or another conversation's turn) they told of something else."""
    conversation, other = model.conversation(), model.conversation()
    assert conversation.stats == GenerationStats()
    conversation.say(QUESTIONS[0], max_new_tokens=6, temperature=0)
    turn = conversation.stats
    assert turn.prompt_tokens == len(model.chat_prompt_ids(conversation.messages[:1])) and turn.generated_tokens > 0
    other.say(QUESTIONS[1], max_new_tokens=6, temperature=0)
    assert conversation.stats is turn and model.stats is not turn
    conversation.reset()
    assert conversation.stats == GenerationStats()
