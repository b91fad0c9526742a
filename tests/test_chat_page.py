"""The chat page at / of the server, in headless Chromium (Debian's package, driven by Playwright): with the API key
typed in, it streams the default model's answer ("Paris"), shows the model and its speed, stops a long answer (the
server aborts it: a 499 in /metrics and every KV page freed) and keeps the conversation across a reload. Without
Chromium the browser test is skipped, except in CI (CI=true), where it fails naming the package to install."""

from __future__ import annotations

import os
import re
import shutil
import time

import httpx
import pytest

from serving.api_server import ServerConfig
from test_server import Server

KEY = "sk-page-key"
OPTIONS = dict(token_buckets=(1, 16, 64), seq_buckets=(1, 4), max_num_seqs=4, max_model_len=1024, show_progress=False)


@pytest.fixture(scope="module")
def page_server():
    from jaxinfer.engine import Engine

    s = Server(lambda: Engine(None, **OPTIONS), ServerConfig(model_name="SmolLM2-135M-Instruct", api_key=KEY))
    s.call(s.engine.wait_ready())
    yield s
    s.close()


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and (m.group(1) or "") == want:
            return float(m.group(2))
    return 0.0


def test_page_and_its_files_are_served_with_a_strict_policy(page_server):
    r = httpx.get(page_server.url + "/", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/static/chat.js">' in r.text and "<script>" not in r.text  # no inline script
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    for f, kind in (("chat.js", "javascript"), ("chat.css", "text/css")):
        r = httpx.get(f"{page_server.url}/static/{f}", timeout=30)
        assert r.status_code == 200 and kind in r.headers["content-type"] and r.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(page_server.url + "/static/../api_server.py", timeout=30).status_code in (403, 404)
    assert httpx.get(page_server.url + "/v1/models", timeout=30).status_code == 401  # the page opens nothing up


def test_no_chat_page_flag():
    from serving.api_server import build_app
    from serving.async_engine import AsyncEngine

    def routes(**kw):
        return {r.resource.canonical for r in build_app(AsyncEngine(lambda: None), ServerConfig(**kw)).router.routes()}

    assert "/" in routes() and "/static" in routes()
    routes = routes(chat_page=False)
    assert "/" not in routes and not any(c.startswith("/static") for c in routes) and "/v1/chat/completions" in routes


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is needed for the chat page's browser test: apt-get install -y chromium")
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    return path


def test_chat_page_in_headless_chromium(page_server):
    from playwright import sync_api

    chromium = _chromium()
    url = page_server.url
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url + "/")
        expect = sync_api.expect
        expect(page.locator("#model")).to_have_text("API key needed (settings)")
        page.fill("#api_key", KEY)
        page.dispatch_event("#api_key", "change")
        expect(page.locator("#model")).to_have_text("SmolLM2-135M-Instruct")
        page.fill("#temperature", "0")
        page.fill("#input", "What is the capital of France?")
        page.press("#input", "Enter")
        answer = page.locator(".msg.assistant").last
        expect(answer).to_contain_text("Paris", timeout=120_000)
        expect(page.locator("#status")).to_contain_text("tokens, first after", timeout=120_000)
        expect(page.locator("#speed")).to_have_text(re.compile(r"^\d+(\.\d)? tok/s$"))
        if os.environ.get("JAXINFER_CHAT_SCREENSHOT"):  # the README's picture
            page.screenshot(path=os.environ["JAXINFER_CHAT_SCREENSHOT"])

        aborted = metric(url, "jaxinfer_requests_total", route="/v1/chat/completions", status="499")
        page.fill("#max_tokens", "900")
        page.fill("#input", "Write a very long story about a dragon who learns to cook, in many chapters.")
        page.press("#input", "Enter")
        expect(page.locator("#stop")).to_be_enabled()
        long = page.locator(".msg.assistant").last
        expect(long).to_have_text(re.compile(r"^[\s\S]{40,}$"), timeout=120_000)  # streaming: stop it mid-answer
        page.click("#stop")
        expect(page.locator("#status")).to_have_text("stopped")
        expect(page.locator("#send")).to_be_enabled()
        stopped_at = len(long.text_content())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the server saw the client leave and freed the request's pages
            if (metric(url, "jaxinfer_requests_total", route="/v1/chat/completions", status="499") == aborted + 1
                    and metric(url, "jaxinfer_kv_pages_used") == 0 and metric(url, "jaxinfer_running_requests") == 0):
                break
            time.sleep(0.2)
        else:
            pytest.fail(httpx.get(url + "/metrics").text[-3000:])
        assert len(long.text_content()) == stopped_at  # nothing arrives after stop

        page.reload()  # the conversation stays in the page (the browser's storage)
        expect(page.locator(".msg")).to_have_count(4)
        expect(page.locator(".msg.assistant").first).to_contain_text("Paris")
        page.click("#clear")
        expect(page.locator(".msg")).to_have_count(0)
        browser.close()
