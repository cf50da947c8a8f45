"""The playground page at / in a real browser: type a message, watch streamed text arrive.

    .venv/bin/pytest -q tests/test_playground.py

Starts `python -m app` as a subprocess on 127.0.0.1 with the tiny random checkpoint, then drives
Debian's Chromium (/usr/bin/chromium; `.ci/run` installs it) with Playwright. Playwright never
downloads a browser here: it launches the system binary through `executable_path`. A screenshot
lands in test-artifacts/playground.png. The browser test skips (with the reason) only when
/usr/bin/chromium is absent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-extensions", "--disable-sync",
                 "--no-first-run", "--mute-audio"]

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is absent: `apt-get install -y chromium` (.ci/run does it) to run the browser test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m app` on a free loopback port, serving the tiny checkpoint; yields its base URL."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEEDLING_")}
    env.update(SEEDLING_HOME=str(tmp_path_factory.mktemp("seedling_home")), SEEDLING_LOG_LEVEL="warning",
               SEEDLING_MAX_NUM_SEQS="4")
    log = (tmp_path_factory.mktemp("server_log") / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port),
                             "--checkpoint", str(tiny_checkpoint)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"server did not become ready (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_playground_is_served_at_root(server: str) -> None:
    page = httpx.get(f"{server}/", timeout=10)
    assert page.status_code == 200 and "Seedling playground" in page.text
    for asset, kind in (("app.js", "javascript"), ("style.css", "css")):
        r = httpx.get(f"{server}/{asset}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset


@needs_chromium
def test_chat_streams_in_headless_chromium(server: str) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server}/")
            page.wait_for_function("document.getElementById('ready').textContent === 'ready'", timeout=30_000)

            # record every text the assistant bubble shows while the answer streams in
            page.evaluate("""() => {
                window.__seen = [];
                new MutationObserver(() => {
                    const m = document.querySelector('#transcript .msg.assistant');
                    if (m && m.textContent && window.__seen.at(-1) !== m.textContent) window.__seen.push(m.textContent);
                }).observe(document.getElementById('transcript'),
                           {childList: true, subtree: true, characterData: true});
            }""")
            page.fill("#chat-max-tokens", "24")
            # Greedy (the page's default). Random weights then repeat one token (often "\n"); sampling
            # could draw ids in 400..511 (model vocab 512 > tokenizer's 400), which today kills the
            # engine (Tokenizer.token_bytes IndexError) - reported; TODO: temperature 1 once fixed.
            page.fill("#chat-temperature", "0")
            page.fill("#chat-input", "Hello! Tell me a story.")
            page.press("#chat-input", "Enter")
            page.wait_for_selector("#transcript .msg.user", timeout=10_000)
            page.wait_for_function("document.querySelector('#transcript .msg.assistant:not(.streaming)') !== null",
                                   timeout=60_000)
            seen: list[str] = page.evaluate("window.__seen")
            final = page.evaluate("document.querySelector('#transcript .msg.assistant').textContent")
            stats = page.inner_text("#chat-stats")

            # the classify form: probabilities for every label
            page.fill("#classify-text", "What a lovely day, I am so happy.")
            page.fill("#classify-labels", "positive, negative")
            page.click("#classify-form button[type=submit]")
            page.wait_for_function("document.getElementById('classify-stats').textContent.includes('ms')",
                                   timeout=30_000)
            classify = page.inner_text("#classify-out")

            # the extract form: an object valid for the schema (the grammar holds even random weights to it)
            # (a small schema: the tiny model's context is 256 tokens of a 400-token vocabulary)
            page.fill("#extract-text", "Order 42 broke.")
            page.fill("#extract-schema", '{"type": "object", "properties": {"ok": {"type": "boolean"}, '
                                         '"n": {"enum": [1, 2]}}, "required": ["ok", "n"]}')
            page.click("#extract-form button[type=submit]")
            page.wait_for_function("document.getElementById('extract-stats').textContent.includes('ms')"
                                   " || document.getElementById('extract-out').className.includes('error')",
                                   timeout=30_000)
            extracted = page.inner_text("#extract-out")
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        finally:
            browser.close()

    assert not errors, f"JavaScript errors on the page: {errors}"
    assert final and "error:" not in final, final
    # streamed: the bubble grew through several partial texts before the final one
    assert len(seen) >= 2 and all(final.startswith(s) for s in seen), seen
    assert "first token" in stats and "+ 24 completion" in stats, stats
    assert "label:" in classify and "positive" in classify and "negative" in classify, classify
    assert "error" not in extracted, extracted
    data = json.loads(extracted)
    assert isinstance(data["ok"], bool) and data["n"] in (1, 2), extracted
    assert (ARTIFACTS / "playground.png").stat().st_size > 10_000
