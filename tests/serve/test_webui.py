"""`zhtune webui`: the Gradio page streams replies through gradio_client, keeps multi-turn history, and
works in a real headless Chromium (type a message, see the streamed reply, stop, clear; screenshot
saved under .ci/artifacts/, which git ignores)."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'zhtune[webui]')")

from zhtune import tiny  # noqa: E402
from zhtune.infer.engine import GenParams  # noqa: E402
from zhtune.infer.resolve import load_engine  # noqa: E402
from zhtune.serve.webui import build_app, to_messages  # noqa: E402

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ARTIFACTS = Path(__file__).resolve().parents[2] / ".ci" / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def webui(tmp_path_factory, base_tokenizer_dir):
    """A long-context tiny model (answers can run long enough to stop) served on a free port."""
    model = tiny.build_tiny_model(tmp_path_factory.mktemp("webui") / "model", vocab_size=1000, seed=0,
                                  tokenizer_dir=base_tokenizer_dir, max_position=16384)
    engine = load_engine(str(model))
    app = build_app(engine, defaults=GenParams(max_new_tokens=4000, temperature=0.0, repetition_penalty=1.0))
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield engine, f"http://127.0.0.1:{port}/"
    app.close()
    engine.close()


def _greedy(engine, messages, n):
    p = GenParams(max_new_tokens=n, temperature=0, repetition_penalty=1.0, top_p=0.9, top_k=40)
    return "".join(d.text for d in engine.stream(messages, p))


def test_gradio_client_streams_and_keeps_history(webui):
    from gradio_client import Client

    engine, url = webui
    client = Client(url, verbose=False)
    job = client.submit("你好", [], "", 300, 0, 0.9, 40, 1.0, api_name="/chat")
    _, history = job.result(timeout=180)
    assert len(job.outputs()) >= 3                      # updates while it generated: it streamed
    first = _greedy(engine, [{"role": "user", "content": "你好"}], 300)
    assert to_messages(history, "")[-1] == {"role": "assistant", "content": first}
    job = client.submit("再说一遍 again", history, "你是助手。", 12, 0, 0.9, 40, 1.0, api_name="/chat")
    _, history = job.result(timeout=120)
    conv = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": first}, {"role": "user", "content": "再说一遍 again"}]
    assert to_messages(history, "你是助手。") == conv + [{"role": "assistant", "content": _greedy(engine, conv, 12)}]


def test_bad_values_are_errors_not_crashes(webui):
    from gradio_client import Client

    from zhtune.serve.webui import respond_fn

    engine, url = webui
    with pytest.raises(Exception, match="maximum"):     # the slider's own bound, checked by Gradio
        Client(url, verbose=False).predict("hi", [], "", 12, 9.0, 0.9, 40, 1.0, api_name="/chat")
    with pytest.raises(gr.Error, match="temperature"):  # our GenParams check names the field
        list(respond_fn(engine)("hi", [], "", 12, -1.0, 0.9, 40, 1.0))
    # a conversation longer than the context drops its oldest turns instead of failing
    long_turn = [{"role": "user", "content": "词 " * 9000}, {"role": "assistant", "content": "好"}]
    *_, (_, history) = respond_fn(engine)("hi", long_turn, "", 4, 0.0, 0.9, 40, 1.0)
    assert to_messages(history, "")[-2] == {"role": "user", "content": "hi"}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_real_browser_send_stream_stop_clear(webui, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    engine, url = webui
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                    headless=True, args=flags)
        try:
            page = ctx.new_page()
            page.goto(url, wait_until="networkidle", timeout=60_000)
            assert "对话 Conversation" in page.content() and "停止 Stop" in page.content()
            assert "生成设置 Generation settings" in page.content()
            page.locator("#zhtune-message textarea").fill("你好，北京")
            page.locator("#zhtune-message textarea").press("Enter")
            bot = page.locator("#zhtune-chatbot .message.bot, #zhtune-chatbot [data-testid='bot']").last
            page.wait_for_function(
                "() => { const b = document.querySelectorAll('#zhtune-chatbot [data-testid=\"bot\"]');"
                " return b.length && b[b.length - 1].innerText.trim().length > 20 }", timeout=60_000)
            first = bot.inner_text()
            page.wait_for_timeout(700)
            assert len(bot.inner_text()) > len(first)       # still streaming
            assert "你好，北京" in page.locator("#zhtune-chatbot").inner_text()
            page.get_by_role("button", name="停止 Stop").click()
            deadline = time.time() + 15
            while engine.active and time.time() < deadline:   # the generation itself was cancelled
                time.sleep(0.1)
            assert engine.active == 0
            stopped = bot.inner_text()
            page.wait_for_timeout(700)
            assert bot.inner_text() == stopped and len(stopped) > 20    # the partial answer stays
            assert "Error" not in page.locator("#zhtune-chatbot").inner_text()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "webui.png"), full_page=True)
            page.get_by_role("button", name="清空 Clear").click()
            page.wait_for_function(
                "() => document.querySelectorAll('#zhtune-chatbot [data-testid=\"bot\"]').length === 0",
                timeout=10_000)
        except BaseException:
            if ctx.pages:   # what the page looked like when it failed (the screenshot may fail too)
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                ctx.pages[-1].screenshot(path=str(ARTIFACTS / "webui-failure.png"), timeout=10_000)
            raise
        finally:
            ctx.close()
