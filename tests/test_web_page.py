"""The chat web page in headless Chromium: upload and paste an image, ask, and watch the answer stream in."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil

import pytest

from checkpoints import write_tiny_checkpoint
from smolvlm.api import load
from smolvlm.serve import app as server_app
from smolvlm.serve.app import ServerSettings, create_app
from test_server import random_image, serving

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def paced_events(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The server waits `seconds` after each streamed event, so that every event reaches the page in a read of its own
    (a tiny model can produce its whole answer before the browser's first read, which would then hold every delta)."""
    events = server_app._sse

    async def paced(*args, **kwargs):
        async for event in events(*args, **kwargs):
            yield event
            await asyncio.sleep(seconds)

    monkeypatch.setattr(server_app, "_sse", paced)


def test_upload_paste_ask_and_stream(tmp_path, monkeypatch):
    paced_events(monkeypatch, 0.05)
    vlm = load(write_tiny_checkpoint(tmp_path / "tiny"), device="cpu")
    image, pasted = random_image(5), random_image(6, (50, 50))
    question = "What is in this picture?"
    expected = vlm.generate([{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "image", "image": pasted},
                                                          {"type": "text", "text": question}]}], max_new_tokens=64)  # fmt: skip
    assert len(expected) > 2
    with serving(create_app(vlm, ServerSettings(model_name="tiny-web", default_max_tokens=64))) as url, \
            sync_playwright() as pw:  # fmt: skip
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model-name').textContent === 'tiny-web'")
            assert "vision-language" in page.text_content("#model-meta")
            assert page.input_value("#max-tokens") == "64"
            page.set_input_files("#file", files=[{"name": "a.png", "mimeType": "image/png", "buffer": _png(image)}])
            page.wait_for_selector("#attachments img")
            page.evaluate(
                """async (b64) => {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    const data = new DataTransfer();
                    data.items.add(new File([bytes], "pasted.png", { type: "image/png" }));
                    document.getElementById("prompt").dispatchEvent(
                        new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
                }""",
                base64.b64encode(_png(pasted)).decode(),
            )
            page.wait_for_function("document.querySelectorAll('#attachments img').length === 2")
            # record the answer's text each time the page changes it while it streams
            page.evaluate(
                """() => {
                    window.seen = [];
                    new MutationObserver(() => {
                        const text = document.querySelector(".message.assistant .text");
                        if (text) window.seen.push(text.textContent);
                    }).observe(document.getElementById("messages"), { subtree: true, childList: true });
                }"""
            )
            page.fill("#prompt", question)
            page.click("#send")
            page.wait_for_selector(".message.assistant.done", timeout=60_000)
            answer = page.text_content(".message.assistant .text")
            assert answer == expected
            partial = [t for t in page.evaluate("window.seen") if 0 < len(t) < len(answer)]
            assert partial and all(answer.startswith(t) for t in partial)  # shown piece by piece, not in one block
            assert len(page.query_selector_all(".message.user img")) == 2
            assert "completion tokens" in page.text_content(".message.assistant .usage")
            assert not page.query_selector(".message.error")
        finally:
            browser.close()
