"""Chat templates: the bundled (Gemma 4's canonical template) and built-in Gemma 4 formats, exactly, and the one-line
errors for broken templates and malformed messages."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from edge_runtime.bundled import BUNDLED_CHECKPOINT
from edge_runtime.chat_template import GEMMA4_ORIGIN, GEMMA4_TEMPLATE, ChatTemplate
from edge_runtime.errors import EdgeRuntimeError

BUNDLED_NAMES = {"tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json",
                 "generation_config": "generation_config.json", "chat_template": "chat_template.jinja"}
CONVERSATION = [
    {"role": "system", "content": "  Be brief.\n"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! "},
    {"role": "user", "content": "Name a colour."},
]


def manifest(**names: str | None) -> SimpleNamespace:
    """ChatTemplate.for_artifact reads only `manifest.tokenizer`."""
    return SimpleNamespace(tokenizer=names)


@pytest.fixture(scope="module")
def bundled() -> ChatTemplate:
    return ChatTemplate.for_artifact(BUNDLED_CHECKPOINT, manifest(**BUNDLED_NAMES))


@pytest.fixture(scope="module")
def gemma4() -> ChatTemplate:
    return ChatTemplate(GEMMA4_TEMPLATE, origin=GEMMA4_ORIGIN)


def test_bundled_template_is_gemma4s_canonical_one():
    canonical = BUNDLED_CHECKPOINT.parent.parent / "chat_templates" / "gemma4.jinja"
    assert (BUNDLED_CHECKPOINT / "chat_template.jinja").read_bytes() == canonical.read_bytes()


def test_bundled_template_system_and_user(bundled):
    assert bundled.origin == str(BUNDLED_CHECKPOINT / "chat_template.jinja")
    assert bundled.render(CONVERSATION[:2]) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")
    assert bundled.render(CONVERSATION[1:2], add_generation_prompt=False) == "<bos><|turn>user\nHi<turn|>\n"


def test_bundled_template_multi_turn(bundled):
    assert bundled.render(CONVERSATION) == (
        "<bos><|turn>system\nBe brief.<turn|>\n"
        "<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n"
        "<|turn>user\nName a colour.<turn|>\n"
        "<|turn>model\n")


def test_templates_render_as_transformers_does(bundled, gemma4):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(BUNDLED_CHECKPOINT))
    for messages in (CONVERSATION, CONVERSATION[1:], CONVERSATION[1:3]):
        for prompt in (True, False):
            assert bundled.render(messages, prompt) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt)
            assert gemma4.render(messages, prompt) == hf.apply_chat_template(
                messages, chat_template=GEMMA4_TEMPLATE, tokenize=False, add_generation_prompt=prompt)


def test_the_templates_own_errors_become_one_line():
    alternate = ("{% for m in messages %}{% if (m['role'] == 'user') != loop.index0 is even %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                 "{% endif %}{% endfor %}")
    with pytest.raises(EdgeRuntimeError) as info:
        ChatTemplate(alternate, origin="t").render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert str(info.value) == "chat template t: Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(EdgeRuntimeError, match=r"^chat template t: ZeroDivisionError: division by zero$"):
        ChatTemplate("{{ 1 / 0 }}", origin="t").render([{"role": "user", "content": "a"}])
    with pytest.raises(EdgeRuntimeError, match=r"^chat template t: access to attribute 'append' .* is unsafe\.$"):
        ChatTemplate("{{ messages.append(1) }}", origin="t").render([{"role": "user", "content": "a"}])


def test_gemma4_fallback_exact(gemma4):
    assert gemma4.render(CONVERSATION) == (
        "<bos><|turn>system\nBe brief.<turn|>\n"
        "<|turn>user\nHi<turn|>\n"
        "<|turn>model\nHello!<turn|>\n"
        "<|turn>user\nName a colour.<turn|>\n"
        "<|turn>model\n")
    assert gemma4.render(CONVERSATION[1:3], add_generation_prompt=False) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n")


def test_artifact_without_template_uses_gemma4(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": {"content": "<B>"}, "eos_token": "<E>"}')
    template = ChatTemplate.for_artifact(tmp_path, manifest(tokenizer_config="tokenizer_config.json",
                                                            chat_template=None))
    assert template.origin == GEMMA4_ORIGIN
    assert (template.bos_token, template.eos_token) == ("<B>", "<E>")
    assert template.render([{"role": "user", "content": "Hi"}]) == "<B><|turn>user\nHi<turn|>\n<|turn>model\n"
    bare = ChatTemplate.for_artifact(tmp_path, manifest())
    assert bare.render([{"role": "user", "content": "Hi"}]).startswith("<bos><|turn>user\n")


def test_bos_and_eos_come_from_the_tokenizer_config(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ bos_token }}|{{ eos_token }}")
    (tmp_path / "c.json").write_text('{"bos_token": null}')
    template = ChatTemplate.for_artifact(tmp_path, manifest(tokenizer_config="c.json", chat_template="t.jinja"))
    assert template.render([{"role": "user", "content": "x"}]) == "|<eos>"
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(EdgeRuntimeError, match=r"c\.json: not valid JSON"):
        ChatTemplate.for_artifact(tmp_path, manifest(tokenizer_config="c.json", chat_template="t.jinja"))


def test_end_of_turn_marker(bundled, gemma4):
    assert bundled.end_of_turn() == "<turn|>"
    assert gemma4.end_of_turn() == "<turn|>"
    assert ChatTemplate("<start_of_turn>{{ messages }}<end_of_turn>").end_of_turn() == "<end_of_turn>"
    assert ChatTemplate("{{ messages }}").end_of_turn() is None


@pytest.mark.parametrize("source,message", [
    ("{{ bos_token }}\n{% if %}",
     "chat template t.jinja, line 2: Expected an expression, got 'end of statement block'; fix the template or re-export"),
    ("a\nb\n{{ x }\n", "chat template t.jinja, line 3: unexpected '}'; fix the template or re-export"),
])
def test_syntax_error_names_the_line(source, message):
    with pytest.raises(EdgeRuntimeError) as info:
        ChatTemplate(source, origin="t.jinja")
    assert str(info.value) == message


def test_an_unclosed_block_is_one_line():
    with pytest.raises(EdgeRuntimeError) as info:
        ChatTemplate("{% for m in messages %}\n{{ m }}", origin="t.jinja")
    assert "\n" not in str(info.value)
    assert re.fullmatch(r"chat template t\.jinja, line 2: Unexpected end of template\..*'for'; "
                        r"fix the template or re-export", str(info.value))


def test_transformers_template_extras():
    source = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
              "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}{{ strftime_now('%Y') | length }}")
    assert ChatTemplate(source).render([{"role": "user", "content": "<b>é"}, {"role": "user", "content": "x"}]) == (
        '{"role": "user", "content": "<b>é"}4')


def test_content_parts_are_joined(gemma4):
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    assert gemma4.render([{"role": "user", "content": parts}]) == (
        "<bos><|turn>user\nfirst\nsecond<turn|>\n<|turn>model\n")


@pytest.mark.parametrize("messages,message", [
    ("hello", "messages must be a list of {'role': ..., 'content': ...} objects, got str"),
    ({"role": "user", "content": "a"}, "messages must be a list of {'role': ..., 'content': ...} objects, got dict"),
    ([], "messages is empty: give at least one message"),
    (["hi"], "messages[0]: must be an object with 'role' and 'content', got str"),
    ([{"content": "a"}], "messages[0]: has no 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
     "messages[1]: role 'tool' is not supported; use system, user or assistant"),
    ([{"role": "user"}], "messages[0]: has no 'content'"),
    ([{"role": "user", "content": None}],
     "messages[0].content: must be a string or a list of {'type': 'text', 'text': ...} parts, got NoneType"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}]}],
     "messages[0].content[1]: part type 'image_url' is not supported; only text parts are (this runtime is text-only)"),
    ([{"role": "user", "content": ["a"]}],
     "messages[0].content[0]: part type str is not supported; only text parts are (this runtime is text-only)"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}],
     "messages[0].content[0]: a text part needs a string 'text'"),
])
def test_bad_messages(gemma4, messages, message):
    with pytest.raises(EdgeRuntimeError) as info:
        gemma4.render(messages)
    assert str(info.value) == message
