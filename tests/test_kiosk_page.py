"""The kiosk chat page in a real browser (Debian's chromium driven by Playwright) against the real server: it
streams replies, Stop works, nothing leaves the device, it fits small touch screens, and it copes with what a
public kiosk meets (markup typed in, an overlong chat, idle visitors, an API key, a busy server)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, sync_playwright

from conftest import serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
QUESTION = "What does the list type do?"
API_KEY = "kiosk-test-key"
LAST_REPLY = ".msg.assistant:last-of-type"
IDLE = "document.body.dataset.state === 'idle'"


@pytest.fixture(scope="module")
def server(bundled, tmp_path_factory) -> Iterator[str]:
    with serving(bundled, tmp_path_factory.mktemp("kiosk-server") / "stderr.txt") as (_, url):
        yield url


@pytest.fixture(scope="module")
def locked_server(bundled, tmp_path_factory) -> Iterator[str]:
    """A server that wants an API key and lets no request wait: a second one at once gets 429."""
    log = tmp_path_factory.mktemp("kiosk-locked-server") / "stderr.txt"
    with serving(bundled, log, "--api-key", API_KEY, "--queue", "0") as (_, url):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing; the kiosk page tests need it: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def requests() -> list[Request]:
    return []


@pytest.fixture
def page(browser, requests) -> Iterator[Page]:
    """A fresh context (no stored key, no cache); every request it makes is appended to `requests`."""
    context = browser.new_context(viewport={"width": 800, "height": 480})
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.on("request", lambda request: requests.append(request))
    yield page
    context.close()


def ask(page: Page, text: str) -> str:
    """Type `text`, press Enter, wait for the reply to end; its text."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.wait_for_selector(f"{LAST_REPLY}[data-finish]")
    page.wait_for_function(IDLE)
    return page.text_content(f"{LAST_REPLY} .text")


def answered(page: Page) -> bool:
    """The last reply ran to its end. Its text may be empty: the bundled model sometimes spends a short budget on a
    thought, which the page shows only when thinking was asked for."""
    return page.get_attribute(LAST_REPLY, "data-finish") in ("stop", "length")


def chat_bodies(requests: list[Request]) -> list[dict]:
    return [json.loads(r.post_data) for r in requests if r.url.endswith("/v1/chat/completions")]


def direct_reply(server: str, body: dict) -> dict:
    """The same request made without the page, not streamed: the choice the page's stream must add up to."""
    response = httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": False}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_reply_streams_in_and_matches_the_api(page, requests, server):
    """Greedy decoding makes the streamed text checkable: it must equal the non-streamed reply exactly."""
    page.goto(f"{server}/?temperature=0&max_tokens=100")
    model = httpx.get(f"{server}/v1/models").json()["data"][0]["id"]
    page.wait_for_function("name => document.getElementById('model').textContent === name", arg=model)
    page.evaluate("""() => {
        window.replyLengths = [];
        new MutationObserver(() => {
            const reply = document.querySelector('.msg.assistant .text');
            if (reply) window.replyLengths.push(reply.textContent.length);
        }).observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});
    }""")
    text = ask(page, QUESTION)
    lengths = page.evaluate("window.replyLengths")
    assert lengths == sorted(lengths) and len({n for n in lengths if n}) >= 5, lengths
    assert page.is_enabled("#send") and page.is_hidden("#stop")
    [body] = chat_bodies(requests)
    assert body == {"messages": [{"role": "user", "content": QUESTION}], "stream": True, "temperature": 0,
                    "max_tokens": 100}
    expected = direct_reply(server, body)
    assert text and text == expected["message"]["content"]
    assert page.get_attribute(LAST_REPLY, "data-finish") == expected["finish_reason"]


def test_with_think_the_thought_is_shown_collapsed_above_the_reply(page, requests, server):
    """?think=1 asks for Gemma 4's thinking; the thought streams into a closed <details>, the answer as usual."""
    page.goto(f"{server}/?temperature=0&max_tokens=120&think=1")
    text = ask(page, "Is it warm in Oslo today?")
    [body] = chat_bodies(requests)
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    expected = direct_reply(server, body)
    assert expected["message"].get("reasoning_content"), "the bundled model thinks when asked to"
    thought = page.locator(f"{LAST_REPLY} details.thought")
    assert thought.count() == 1 and thought.get_attribute("open") is None
    assert thought.locator("div").text_content() == expected["message"]["reasoning_content"]
    assert text == (expected["message"]["content"] or "")


def test_every_request_stays_on_the_server(page, requests, server):
    """A kiosk is offline: no CDN, font, analytics or other origin may be asked for anything."""
    page.goto(f"{server}/?max_tokens=16&system=Answer+briefly.")
    ask(page, "Hello")
    assert answered(page)
    urls = [r.url for r in requests]
    assert {f"{server}/static/kiosk.css", f"{server}/static/kiosk.js", f"{server}/v1/chat/completions"} <= set(urls)
    assert all(url.startswith(f"{server}/") for url in urls), urls
    [body] = chat_bodies(requests)
    assert body["max_tokens"] == 16 and body["messages"][0] == {"role": "system", "content": "Answer briefly."}


def test_text_is_shown_as_text_never_as_markup(page, server):
    """Messages go in as text nodes: markup typed at a public kiosk must not become part of the page."""
    markup = '<img src="x" onerror="window.injected = 1"><b>bold</b>'
    page.goto(f"{server}/?max_tokens=8")
    ask(page, markup)
    assert page.text_content(".msg.user .text") == markup
    assert page.locator("#transcript img, #transcript b").count() == 0
    assert page.evaluate("window.injected") is None


@pytest.mark.parametrize("width,height", [(480, 320), (800, 480), (320, 568)])
def test_fits_small_touch_screens(page, server, tmp_path, width, height):
    """Raspberry Pi displays and a phone in portrait: input and Send on screen, thumb-sized, no sideways scroll,
    even with an unbreakable word in the transcript."""
    page.set_viewport_size({"width": width, "height": height})
    page.goto(f"{server}/?max_tokens=24&temperature=0")
    ask(page, "Explain " + "supercalifragilistic" * 6)
    shot = tmp_path / f"kiosk-{width}x{height}.png"
    png = page.screenshot(path=shot)
    for selector in ("#prompt", "#send"):
        box = page.locator(selector).bounding_box()
        assert page.is_visible(selector) and box, (selector, shot)
        assert box["x"] >= 0 and box["y"] >= 0, (selector, box, shot)
        assert box["x"] + box["width"] <= width and box["y"] + box["height"] <= height, (selector, box, shot)
        assert box["height"] >= 48, (selector, box, shot)
    assert page.evaluate("document.documentElement.scrollWidth") <= page.evaluate("innerWidth"), shot
    assert page.evaluate("(t => t.scrollWidth <= t.clientWidth)(document.getElementById('transcript'))"), shot
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (width, height), shot


def test_stop_keeps_what_arrived_and_the_chat_goes_on(page, requests, server):
    """Stop aborts the fetch mid-reply; the partial reply stays, is sent back as history, and the next turn works."""
    page.goto(f"{server}/?temperature=0")
    page.fill("#prompt", QUESTION)
    page.click("#send")
    page.wait_for_function(f"document.querySelector('{LAST_REPLY} .text')?.textContent.length > 0")
    page.click("#stop")
    page.wait_for_function(IDLE)
    partial = page.text_content(f"{LAST_REPLY} .text")
    assert page.get_attribute(LAST_REPLY, "data-finish") == "aborted"
    assert page.text_content("#status") == "Stopped."
    assert page.is_enabled("#send") and page.is_hidden("#stop")
    full = direct_reply(server, chat_bodies(requests)[0])["message"]["content"]
    assert partial and full.startswith(partial) and len(partial) < len(full), (partial, full)
    ask(page, "Thanks")
    assert answered(page)
    assert chat_bodies(requests)[1]["messages"][:2] == [{"role": "user", "content": QUESTION},
                                                    {"role": "assistant", "content": partial}]


def test_too_long_a_conversation_offers_a_new_chat(page, requests, server):
    """The server's 400 is shown as it words it; the new chat it offers keeps the unsent text to try again."""
    page.goto(server)
    too_long = "word " * 600
    page.fill("#prompt", too_long)
    page.press("#prompt", "Enter")
    page.wait_for_selector("#status-new-chat:visible")
    response = httpx.post(f"{server}/v1/chat/completions", json=chat_bodies(requests)[0])
    assert response.status_code == 400
    assert page.text_content("#status") == response.json()["error"]["message"]
    page.click("#status-new-chat")
    assert page.locator("#transcript > *").count() == 0 and page.text_content("#status") == ""
    assert page.input_value("#prompt") == too_long.strip()
    assert page.evaluate("document.activeElement.id") == "prompt"


def test_idle_kiosk_forgets_the_conversation(page, server):
    """A public kiosk must not show the last visitor's chat to the next one."""
    page.goto(f"{server}/?idle=1&max_tokens=48")
    ask(page, "My name is Ada.")
    assert answered(page)
    page.fill("#prompt", "half-typed")
    page.wait_for_function("document.getElementById('transcript').childElementCount === 0", timeout=5_000)
    assert page.input_value("#prompt") == ""


def test_asks_for_the_api_key_and_keeps_it(page, requests, locked_server):
    """A kiosk started with --api-key: the page itself loads without one, asks once, then every call carries it."""
    page.goto(f"{locked_server}/?max_tokens=48")
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#prompt", "Hello")
    page.press("#prompt", "Enter")
    page.wait_for_function(IDLE)
    assert page.input_value("#prompt") == "Hello", "a refused message goes back into the input"
    page.fill("#key", API_KEY)
    page.press("#key", "Enter")
    page.wait_for_selector(f"{LAST_REPLY}[data-finish]")
    assert answered(page) and page.is_hidden("#key-form")
    assert page.evaluate("localStorage.getItem('edge-runtime.api-key')") == API_KEY
    assert requests[-1].headers["authorization"] == f"Bearer {API_KEY}"


def test_busy_server_is_retried_after_its_retry_after(page, requests, locked_server):
    """While another client generates, the page is told 429; it counts down Retry-After and then gets its turn."""
    page.add_init_script(f"localStorage.setItem('edge-runtime.api-key', '{API_KEY}')")
    page.goto(f"{locked_server}/?max_tokens=48")
    body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True, "temperature": 0, "max_tokens": 400}
    with httpx.stream("POST", f"{locked_server}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as other:
        lines = other.iter_lines()  # kept: a dropped iterator would close the stream and free the server
        next(lines)
        page.fill("#prompt", "Hello")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('busy, retrying in')")
    page.wait_for_selector(f"{LAST_REPLY}[data-finish]")
    assert answered(page)
    assert len(chat_bodies(requests)) >= 2
