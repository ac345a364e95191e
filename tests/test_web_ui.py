"""The chat page of `gptoss serve`, in a real browser: headless Chromium (Debian's) driven by
Playwright, against servers on the demo model and on a random tiny checkpoint. Screenshots of
each state go to test-artifacts/ui/ (the README's screenshot is one of them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving import serving

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"
KEY = "ui-test-key"

playwright_api = pytest.importorskip("playwright.sync_api")  # a test dependency (pip install -e ".[test]")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), as .ci/run does")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-demo")
    with serving(["--kv-cache-size", "16384", "--log-level", "warning"], folder / "server.log") as server:
        yield server


def page_of(browser, url: str, width: int = 1100):
    context = browser.new_context(viewport={"width": width, "height": 800})
    page = context.new_page()
    page.goto(url + "/")
    return page


def ask(page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.keyboard.press("Enter")


def test_the_page_answers_with_reasoning_above_the_answer(browser, demo_server):
    page = page_of(browser, demo_server.url)
    page.get_by_label("Temperature").fill("0")
    ask(page, "What is 482 + 391?")
    answer = page.locator(".msg.assistant .answer").last
    answer.filter(has_text="873").wait_for(timeout=60_000)
    page.get_by_label("Send").wait_for(timeout=60_000)  # the reply is complete
    reasoning = page.locator(".msg.assistant details.reasoning").last
    assert reasoning.is_visible() and "Reasoning" in reasoning.locator("summary").inner_text()
    reasoning.locator("summary").click()
    assert "482" in reasoning.locator(".text").inner_text()
    box_reasoning, box_answer = reasoning.bounding_box(), answer.bounding_box()
    assert box_reasoning["y"] < box_answer["y"]  # reasoning above the answer
    page.screenshot(path=str(ARTIFACTS / "answer.png"), full_page=True)

    # Kept in the browser: after a reload the conversation is listed and opens again.
    page.reload()
    page.get_by_role("listitem").filter(has_text="What is 482 + 391?").first.click()
    page.locator(".msg.assistant .answer").filter(has_text="873").first.wait_for(timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "reloaded.png"), full_page=True)

    # Markdown and code blocks, as the page renders answers.
    html = page.evaluate("markdown('Some **bold** and `code`.\\n\\n```python\\nprint(1 < 2)\\n```')")
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    assert "<pre><code>print(1 &lt; 2)</code></pre>" in html

    # Phone width: still usable.
    phone = page_of(browser, demo_server.url, width=380)
    assert phone.get_by_label("Message").is_visible() and phone.get_by_label("Send").is_visible()
    phone.screenshot(path=str(ARTIFACTS / "phone.png"))


def test_stop_aborts_a_long_generation(browser, tiny_checkpoint, tmp_path):
    """A random model writes until the context is full: Esc stops it, and the server is free again."""
    with serving([str(tiny_checkpoint), "--log-level", "warning"], tmp_path / "server.log") as server:
        page = page_of(browser, server.url)
        ask(page, "Write forever")
        page.get_by_label("Stop").wait_for(timeout=30_000)
        answer = page.locator(".msg.assistant").last
        page.wait_for_timeout(1500)
        page.keyboard.press("Escape")
        page.locator(".msg.assistant .status").last.filter(has_text="stopped").wait_for(timeout=10_000)
        page.get_by_label("Send").wait_for(timeout=10_000)
        length = len(answer.inner_text())
        page.wait_for_timeout(1000)
        assert len(answer.inner_text()) == length  # nothing more arrives
        page.screenshot(path=str(ARTIFACTS / "stopped.png"), full_page=True)
        import httpx

        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["running"] == 0  # the request was cancelled on the server too


def test_a_server_with_an_api_key_asks_for_it(browser, tmp_path):
    with serving(["--api-key", KEY, "--log-level", "warning"], tmp_path / "server.log") as server:
        page = page_of(browser, server.url)
        page.get_by_role("dialog", name="API key").wait_for(timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "api-key.png"))
        page.get_by_role("textbox", name="API key").fill(KEY)
        page.get_by_role("button", name="Use key").click()
        page.get_by_role("dialog", name="API key").wait_for(state="hidden", timeout=10_000)
        page.get_by_label("Temperature").fill("0")
        ask(page, "What is 12 + 30?")
        page.locator(".msg.assistant .answer").filter(has_text="42").wait_for(timeout=60_000)


def test_a_server_that_is_down_shows_an_error(browser, tmp_path):
    with serving(["--log-level", "warning"], tmp_path / "server.log") as server:
        page = page_of(browser, server.url)
        page.locator("#model").filter(has_text="gpt-oss-demo").wait_for(timeout=10_000)
        server.proc.terminate()
        server.proc.wait(timeout=30)
        ask(page, "What is 1 + 1?")
        alert = page.get_by_role("alert")
        alert.wait_for(timeout=10_000)
        assert "Cannot reach the gptoss server" in alert.inner_text()
        page.screenshot(path=str(ARTIFACTS / "server-down.png"), full_page=True)
