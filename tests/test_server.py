"""The kiosk server over real sockets: the openai client against it, faults, the queue, and load.

The server runs in this process (uvicorn on a thread) around the bundled trained model, so that tests can
slow the model down to hold a generation open while they fill the queue or walk away mid-stream.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Self

import httpx
import openai
import pytest
import uvicorn

import edge_runtime
from conftest import free_port
from edge_runtime.server.app import ServerSettings, create_app
from edge_runtime.server.request_schema import Limits

QUESTION = [{"role": "user", "content": "Tell me about the sea"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather now in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"]}}}]


class LiveServer:
    """An app on a real port, with its handlers' state (queue, metrics) at hand."""

    def __init__(self, model, settings: ServerSettings):
        self.app = create_app(model, settings)
        self.api = self.app.state.api
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=60, **kwargs)

    def healthy(self) -> bool:
        health = httpx.get(f"{self.url}/health", timeout=10)
        return health.status_code == 200 and health.json()["status"] == "ok"

    def wait(self, condition, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} is not in /metrics")


@pytest.fixture(scope="module")
def model(bundled):
    return edge_runtime.load(bundled[0], kv="fp32")


@pytest.fixture(scope="module")
def server(model) -> Iterator[LiveServer]:
    with LiveServer(model, ServerSettings(queue_depth=16, limits=Limits(max_body_bytes=4096, max_messages=8))) as s:
        yield s


@contextmanager
def slowed(model, seconds: float = 0.01):
    """Every forward pass takes at least `seconds` longer, so a generation stays open long enough to watch."""
    forward = model.engine.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.engine.forward = slow
    try:
        yield
    finally:
        model.engine.forward = forward


def test_openai_client_chat_plain_and_streamed(server, model):
    client = server.client()
    expected = model.create_chat_completion(QUESTION, max_tokens=12, temperature=0)
    reply = client.chat.completions.create(model=model.name, messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens == expected["usage"]["prompt_tokens"]

    stream = client.chat.completions.create(model=model.name, messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == reply.usage.total_tokens


def _streamed_message(stream) -> tuple[dict, str]:
    """A streamed reply put together as OpenAI's docs show: content, reasoning and each call's arguments joined."""
    message: dict = {"role": "assistant", "content": "", "tool_calls": {}}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        message["content"] += delta.content or ""
        for part in delta.tool_calls or []:
            call = message["tool_calls"].setdefault(part.index, {"id": None, "type": "function",
                                                                 "function": {"name": "", "arguments": ""}})
            call["id"] = part.id or call["id"]
            if part.function:
                call["function"]["name"] += part.function.name or ""
                call["function"]["arguments"] += part.function.arguments or ""
    message["tool_calls"] = [message["tool_calls"][i] for i in sorted(message["tool_calls"])]
    return message, finish


def test_openai_client_tools_round_trip_plain_and_streamed(server, model):
    """A call, the tool's result, the answer: what a kiosk app does with OpenAI's client, both ways."""
    client = server.client()
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    options = dict(model=model.name, tools=TOOLS, max_tokens=60, temperature=1.0, seed=4, parallel_tool_calls=False)
    reply = client.chat.completions.create(messages=ask, tool_choice="required", **options)
    assert reply.choices[0].finish_reason == "tool_calls"
    call = reply.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    streamed, finish = _streamed_message(client.chat.completions.create(
        messages=ask, tool_choice="required", stream=True, **options))
    assert finish == "tool_calls"
    assert [c["function"] for c in streamed["tool_calls"]] == [
        {"name": c.function.name, "arguments": c.function.arguments} for c in reply.choices[0].message.tool_calls]

    history = [*ask, reply.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    answer = client.chat.completions.create(messages=history, **{**options, "temperature": 0, "max_tokens": 16})
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.tool_calls is None or answer.choices[0].finish_reason == "tool_calls"
    streamed, finish = _streamed_message(client.chat.completions.create(
        messages=history, stream=True, **{**options, "temperature": 0, "max_tokens": 16}))
    assert (streamed["content"] or None, finish) == (answer.choices[0].message.content or None,
                                                      answer.choices[0].finish_reason)


def test_json_schema_and_thinking_reach_the_model_through_the_server(server, model):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    client = server.client()
    reply = client.chat.completions.create(
        model=model.name, messages=[{"role": "user", "content": "Which city? Answer in JSON."}], max_tokens=40,
        temperature=1.0, seed=2, response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    if reply.choices[0].finish_reason == "stop":
        assert set(json.loads(reply.choices[0].message.content)) == {"city"}
    thought = server.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24, "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": True}})
    assert thought.status_code == 200
    expected = model.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=24, temperature=0,
                                            chat_template_kwargs={"enable_thinking": True})
    assert thought.json()["choices"][0]["message"] == expected["choices"][0]["message"]


def test_openai_client_completions_plain_and_streamed(server, model):
    client = server.client()
    expected = model.create_completion("The sea", max_tokens=10, temperature=0)["choices"][0]["text"]
    reply = client.completions.create(model=model.name, prompt="The sea", max_tokens=10, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    assert reply.usage.completion_tokens == 10
    stream = client.completions.create(model=model.name, prompt="The sea", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_openai_client_lists_the_model(server, model):
    client = server.client()
    assert [m.id for m in client.models.list()] == [model.name]
    assert client.models.retrieve(model.name).id == model.name
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.models.retrieve("gpt-4")


def test_stop_strings_and_sampling_options_reach_the_model(server, model):
    full = server.client().chat.completions.create(model="any", messages=QUESTION, max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    stop = text.strip().split()[1]
    stopped = server.client().chat.completions.create(model="any", messages=QUESTION, max_tokens=20, temperature=0,
                                                      stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].message.content
    seeded = [server.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8, "temperature": 1.0,
                                                         "seed": 5, "top_k": 40, "min_p": 0.05}).json()
              for _ in range(2)]
    assert seeded[0]["choices"] == seeded[1]["choices"]


def test_cache_prompt_false_runs_the_whole_prompt(server):
    body = {"prompt": "The sea is wide and deep", "max_tokens": 2, "temperature": 0}
    cached = "edge_runtime_cached_prompt_tokens_total"
    server.post("/v1/completions", json=body)
    before = server.metric(cached)
    prompt_tokens = server.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"]
    reused = server.metric(cached) - before
    assert reused == prompt_tokens - 1  # all but the last prompt token, which runs again for its logits
    server.post("/v1/completions", json={**body, "cache_prompt": False})
    assert server.metric(cached) - before == reused


BAD_BODIES = [
    (b'{"messages": [', 400, None, "the request body is not valid JSON"),
    (b"\xff\xfe", 400, None, "the request body is not valid JSON"),
    (b"[1, 2]", 400, None, "the request body must be a JSON object, got list"),
    (json.dumps({"messages": "hi"}), 400, "messages", "messages must be a list"),
    (json.dumps({"messages": [{"role": "user"}]}), 400, "messages[0].content", "messages[0]: has no 'content'"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), 400, "messages[0].role",
     "role 'robot' is not supported"),
    (json.dumps({}), 400, "messages", "messages is required"),
    (json.dumps({"messages": QUESTION * 9}), 400, "messages", "9 messages is more than this server allows (8)"),
    (json.dumps({"messages": QUESTION, "temperature": "hot"}), 400, "temperature", "temperature must be a number"),
    (json.dumps({"messages": QUESTION, "max_tokens": True}), 400, "max_tokens", "max_tokens must be an integer"),
    (json.dumps({"messages": QUESTION, "max_tokens": 0}), 400, "max_tokens", "max_tokens must be at least 1"),
    (json.dumps({"messages": QUESTION, "stream": "yes"}), 400, "stream", "stream must be true or false"),
    (json.dumps({"messages": QUESTION, "stop": [1]}), 400, "stop", "stop must be a string or a list of strings"),
    (json.dumps({"messages": QUESTION, "n": 2}), 400, "n", "n must be 1"),
    (json.dumps({"messages": QUESTION, "tools": {"type": "function"}}), 400, "tools", "tools must be a list, got dict"),
    (json.dumps({"messages": QUESTION, "tools": [{"type": "function"}]}), 400, "tools[0].function",
     "tools[0].function"),
    (json.dumps({"messages": QUESTION, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}),
     400, "tool_choice.function.name", "'fly'"),
    (json.dumps({"messages": QUESTION, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string", "format": "uuid"}}}}}]}),
     400, "tools[0].function.parameters", "format"),
    (json.dumps({"messages": QUESTION, "response_format": {"type": "xml"}}), 400, "response_format.type", "xml"),
    (json.dumps({"messages": QUESTION, "chat_template_kwargs": ["enable_thinking"]}), 400, "chat_template_kwargs",
     "chat_template_kwargs must be an object"),
    (json.dumps({"messages": [*QUESTION, {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]}), 400,
     "messages[1].tool_call_id", "a tool result with no tool call before it"),
    (json.dumps({"messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "fly", "arguments": "{}"}}]}], "tools": TOOLS}), 400,
     "messages[1].tool_calls[0].function.name", "'fly' is not one of the declared tools (get_weather)"),
    (json.dumps({"messages": QUESTION, "presence_penalty": 1}), 400, "presence_penalty", "use repetition_penalty"),
    (json.dumps({"messages": QUESTION, "stream_options": {"include_usage": True}}), 400, "stream_options",
     "only allowed when stream is true"),
    (json.dumps({"messages": QUESTION, "top_p": 7}), 400, None, "top_p"),
    (json.dumps({"messages": QUESTION, "cache_prompt": "no"}), 400, "cache_prompt", "cache_prompt must be true or"),
    (json.dumps({"messages": QUESTION * 8, "x": "a" * 4000}), 413, None, "the request body is 4"),
    # JSON's \ud800 escape decodes to a lone surrogate, which no tokenizer takes
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400, "messages[0].content",
     "messages[0].content: character 1 is a lone surrogate (U+D800), which is not text"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', 400,
     "messages[0].content[0].text", "messages[0].content[0].text: character 0 is a lone surrogate (U+DFFF)"),
]


def test_chat_fields_sent_to_completions_are_refused_by_name(server):
    for name, value in [("tools", TOOLS), ("response_format", {"type": "json_object"})]:
        response = server.post("/v1/completions", json={"prompt": "x", name: value})
        assert response.status_code == 400
        assert response.json()["error"] == {"message": f"{name} is only taken by /v1/chat/completions",
                                            "type": "invalid_request_error", "param": name, "code": None}


def test_a_lone_surrogate_in_a_completion_prompt_is_a_400_naming_the_field(server):
    response = server.post("/v1/completions", content=b'{"prompt": "The list \\ud800 is"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt"
    assert error["message"].startswith("prompt: character 9 is a lone surrogate (U+D800), which is not text; ")
    assert server.healthy()


@pytest.mark.parametrize(("body", "status", "param", "message"), BAD_BODIES)
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(server, body, status, param, message):
    response = server.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert server.healthy()


def test_a_body_sent_without_length_is_cut_off_at_the_limit(server):
    def chunks():
        yield b'{"messages": ['
        for _ in range(100):
            yield b'{"role": "user", "content": "' + b"a" * 100 + b'"},'
        yield b"]}"

    response = server.post("/v1/chat/completions", content=chunks())
    assert response.status_code == 413
    assert "over 4096 bytes" in response.json()["error"]["message"]
    assert server.healthy()


def test_a_prompt_over_the_context_is_refused_with_its_length(server, model):
    words = " ".join(["sea"] * 600)
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="any", prompt=words, max_tokens=4)
    error = caught.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"but the context holds {model.context_length}" in error["message"]
    assert server.healthy()


def test_unknown_paths_and_methods_get_json_errors(server):
    assert httpx.get(f"{server.url}/v1/embeddings").json()["error"]["code"] == "not_found"
    response = httpx.get(f"{server.url}/v1/chat/completions")
    assert response.status_code == 405 and "GET is not allowed" in response.json()["error"]["message"]


def test_the_api_key_guards_the_api_but_not_the_page_or_health(model):
    with LiveServer(model, ServerSettings(api_key="s3cret")) as s:
        with pytest.raises(openai.AuthenticationError, match="missing or wrong API key"):
            s.client(api_key="wrong").models.list()
        assert httpx.get(f"{s.url}/metrics").status_code == 401
        assert httpx.post(f"{s.url}/v1/completions", json={"prompt": "x"}).status_code == 401
        assert [m.id for m in s.client(api_key="s3cret").models.list()] == [model.name]
        assert httpx.get(f"{s.url}/").status_code == 200 and httpx.get(f"{s.url}/static/kiosk.js").status_code == 200
        assert s.healthy()


def test_a_client_leaving_mid_stream_stops_its_generation(server, model):
    cancelled = server.metric("edge_runtime_cancelled_generations_total")
    with slowed(model), httpx.Client(timeout=30) as http:
        body = {"messages": QUESTION, "max_tokens": 400, "temperature": 0, "stream": True}
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data:")
                if events == 3:
                    break
        left = time.monotonic()
        server.wait(lambda: not server.api.queue.busy, "the generation to stop", timeout=5)
    assert time.monotonic() - left < 2  # 400 slowed tokens would take over 4 s
    assert model.stats.generated_tokens < 100
    assert server.metric("edge_runtime_cancelled_generations_total") == cancelled + 1
    assert server.healthy()


def test_a_client_leaving_before_a_plain_answer_stops_its_generation(server, model):
    cancelled = server.metric("edge_runtime_cancelled_generations_total")
    with slowed(model):
        leaver = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        request = json.dumps({"prompt": "The sea", "max_tokens": 400, "temperature": 0}).encode()
        leaver.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(request), request))
        server.wait(lambda: server.api.queue.busy, "the generation to start")
        leaver.close()
        left = time.monotonic()
        server.wait(lambda: not server.api.queue.busy, "the generation to stop", timeout=5)
    assert time.monotonic() - left < 2 and model.stats.generated_tokens < 100
    assert server.metric("edge_runtime_cancelled_generations_total") == cancelled + 1
    assert server.healthy()


def test_a_client_leaving_during_a_long_prompt_stops_it_between_prefill_chunks(bundled):
    model = edge_runtime.load(bundled[0], kv="fp32", prefill_chunk=16)
    prompt = " ".join(["the sea and the light"] * 60)
    n = len(model.encode(prompt))
    assert 300 < n < model.context_length
    with LiveServer(model, ServerSettings()) as s, slowed(model, 0.05):
        leaver = socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])))
        request = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
        leaver.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(request), request))
        s.wait(lambda: model.context_used >= 32, "two prefill chunks")
        leaver.close()
        left = time.monotonic()
        s.wait(lambda: not s.api.queue.busy, "the prefill to stop", timeout=5)
        assert time.monotonic() - left < 0.5  # the whole prompt would take over 1 s more
        assert model.context_used < n - 16 and model.stats.generated_tokens == 0
        assert s.metric("edge_runtime_cancelled_generations_total") == 1
        assert s.healthy()


def test_a_full_queue_answers_429_and_a_client_leaving_the_queue_gives_up_its_place(model):
    with LiveServer(model, ServerSettings(queue_depth=1)) as s, slowed(model), httpx.Client(timeout=30) as http:
        body = {"messages": QUESTION, "max_tokens": 300, "temperature": 0, "stream": True}
        with http.stream("POST", f"{s.url}/v1/chat/completions", json=body) as first:
            lines = first.iter_lines()  # kept: a dropped line iterator closes the connection
            next(lines)
            s.wait(lambda: s.api.queue.busy, "the first generation")
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(s.post, "/v1/completions", json={"prompt": "The sea", "max_tokens": 2})
                s.wait(lambda: s.api.queue.waiting == 1, "the second request to queue")
                full = s.post("/v1/completions", json={"prompt": "The sea", "max_tokens": 2})
                assert full.status_code == 429
                assert int(full.headers["Retry-After"]) >= 1
                assert full.json()["error"]["code"] == "queue_full"
                assert s.healthy() and s.metric("edge_runtime_queue_depth") == 1
        assert waiting.result().status_code == 200  # the first stream was closed: its turn passed on
        assert waiting.result().json()["usage"]["completion_tokens"] == 2

        with http.stream("POST", f"{s.url}/v1/chat/completions", json=body) as holder:
            lines = holder.iter_lines()
            next(lines)
            leaver = socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])))
            request = json.dumps({"prompt": "The sea", "max_tokens": 2}).encode()
            leaver.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(request), request))
            s.wait(lambda: s.api.queue.waiting == 1, "the leaver to queue")
            leaver.close()
            s.wait(lambda: s.api.queue.waiting == 0, "the leaver's place to be freed")
        assert s.healthy()


def test_ten_clients_times_five_requests_equal_sequential_greedy_answers(server):
    prompts = [f"Question {c}.{r}: what is the sea like in the {word}?"
               for c in range(10) for r, word in enumerate(("north", "south", "east", "west", "morning"))]

    def ask(prompt: str) -> str:
        reply = server.client().chat.completions.create(
            model="any", messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(10) as pool:
        concurrent = list(pool.map(ask, prompts))
    sequential = [ask(p) for p in prompts]
    assert concurrent == sequential
    assert len(set(sequential)) > 1
    assert server.healthy()
