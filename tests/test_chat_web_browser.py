"""
The chat page in a real headless Chromium, against a live chat_web server with a tiny GPT.

A user types a message, clicks Send and watches the reply stream in (we sample the page while it is
streaming, and count the SSE events it got); a second turn works (the page sends the history);
a message over the per-message limit shows the server's error and is put back into the text box;
New chat clears the conversation. A screenshot of the finished conversation is saved and its path
printed: <pytest tmp dir>/chat_web.png, also copied to $NANOCHAT_BASE_DIR/report/chat_web.png when
that variable is set.

The browser is driven by Selenium (the `dev` extra) through chromedriver. Chromium comes from $MC_CHROMIUM,
else `chromium` / `chromium-browser` / `google-chrome` on PATH; chromedriver from $MC_CHROMEDRIVER, else
`chromedriver` on PATH (Debian's `chromium-driver` matches its `chromium`). `bash dev/test.sh` installs both
first (dev/install_chromium.sh). When they (or selenium) are missing the test FAILS, so CI cannot pass
without having run it; MC_ALLOW_NO_BROWSER=1 turns that into a skip (a laptop without apt).

    .venv/bin/python -m pytest tests/test_chat_web_browser.py -s     # -s shows the screenshot path live
"""

import json
import os
import shutil
import time

import pytest

from scripts.chat_web import Worker, create_app
from tests.test_chat_web import serve, tiny_model, tiny_tokenizer

WIDTH, HEIGHT = 1000, 720
FIRST, SECOND = "Hello! Who are you?", "Tell me a short story about the blue vault."


def unavailable(reason):
    """No browser here: a failure, or a skip when MC_ALLOW_NO_BROWSER=1 says that is fine on this machine."""
    if os.environ.get("MC_ALLOW_NO_BROWSER") == "1":
        pytest.skip(f"{reason} (MC_ALLOW_NO_BROWSER=1)")
    pytest.fail(f"{reason}: run `bash dev/install_chromium.sh` (Debian/apt; dev/test.sh does it), or point "
                f"MC_CHROMIUM / MC_CHROMEDRIVER at a browser and its driver, or set MC_ALLOW_NO_BROWSER=1 to "
                f"skip this test", pytrace=False)


def find_browser():
    """(chromium path, chromedriver path); fails or skips (see unavailable) when either is missing."""
    def first(*names):
        for name in names:
            path = name and shutil.which(name)
            if path:
                return path
        return None

    chromium = first(os.environ.get("MC_CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
    driver = first(os.environ.get("MC_CHROMEDRIVER"), "chromedriver")
    if chromium is None:
        unavailable("no Chromium found (looked at $MC_CHROMIUM, chromium, chromium-browser, google-chrome)")
    if driver is None:
        unavailable("no chromedriver found (looked at $MC_CHROMEDRIVER, chromedriver)")
    return chromium, driver


def start_browser(chromium, driver, log_path):
    """A headless Chromium with a WIDTH x HEIGHT viewport, under Selenium's Chrome driver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (./mc_setup --dev installs it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--window-size={WIDTH},{HEIGHT}"):
        opts.add_argument(flag)
    # an explicit driver path: Selenium Manager (which would look for one online) never runs
    browser = webdriver.Chrome(options=opts, service=Service(executable_path=driver, log_output=str(log_path)))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
    return browser


class Page:
    """The open tab: evaluate JS, type, click, wait."""

    def __init__(self, browser):
        self.browser = browser

    def js(self, expression):
        """The value of a JS expression in the page."""
        return self.browser.execute_script(f"return {expression};")

    def wait_for(self, expression, timeout=20, what=None):
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            WebDriverWait(self.browser, timeout, poll_frequency=0.02).until(lambda _: self.js(expression))
        except TimeoutException:
            raise AssertionError(f"timed out waiting for {what or expression}") from None

    def type_into(self, selector, text):
        """Real key events for a short text; a long one is inserted like a paste (8,000 keystrokes are slow)."""
        from selenium.webdriver.common.by import By

        box = self.browser.find_element(By.CSS_SELECTOR, selector)
        if len(text) <= 200:
            box.send_keys(text)
        else:
            box.click()
            self.browser.execute_cdp_cmd("Input.insertText", {"text": text})

    def click(self, selector):
        """A real mouse click at the centre of the element (WebDriver's element click)."""
        from selenium.webdriver.common.by import By

        self.browser.find_element(By.CSS_SELECTOR, selector).click()


class PacedEngine:
    """The real Engine, slowed to 25 ms per token so the page is seen mid-stream."""

    def __init__(self, engine, delay=0.025):
        self.engine, self.model, self.delay = engine, engine.model, delay

    def generate(self, *args, **kwargs):
        for item in self.engine.generate(*args, **kwargs):
            time.sleep(self.delay)
            yield item


STATE = """JSON.stringify({state: document.body.dataset.state,
  replies: [...document.querySelectorAll('.msg.assistant')].map(m => ({text: m.querySelector('.body').textContent,
                                                                      chunks: Number(m.dataset.chunks)})),
  users: [...document.querySelectorAll('.msg.user .body')].map(b => b.textContent),
  errors: [...document.querySelectorAll('.error')].map(e => e.textContent)})"""


def open_chat(browser, url, model_id, what="page load"):
    """The chat page at url, loaded, once it shows model_id (fetched from /health)."""
    page = Page(browser)
    browser.get(url + "/")
    page.wait_for(f"document.readyState === 'complete' && document.getElementById('model').textContent === "
                  f"'{model_id}'", what=what)
    return page


def send_and_watch(page, text):
    """Type + click Send; sample the page until the reply is done. -> (final state, mid-stream samples)."""
    page.type_into("#input", text)
    page.click("#send")
    samples, deadline = [], time.time() + 30
    while True:
        s = json.loads(page.js(STATE))
        samples.append(s)
        if s["state"] == "idle" and s["replies"] and len(samples) > 1:
            return s, [x for x in samples if x["state"] == "streaming" and x["replies"] and x["replies"][-1]["text"]]
        assert time.time() < deadline, f"the reply did not finish: {s}"
        time.sleep(0.02)


def test_chat_ui_in_headless_chromium(tmp_path, capsys):
    chromium, driver = find_browser()
    from nanochat.engine import Engine

    tokenizer = tiny_tokenizer()
    engine = PacedEngine(Engine(tiny_model(tokenizer), tokenizer))
    app = create_app([Worker(engine, tokenizer, "cpu")], model_id="nanochat-tiny-test",
                     defaults={"max_tokens": 40})
    with serve(app) as url:
        browser = start_browser(chromium, driver, tmp_path / "chromedriver.log")
        try:
            page = open_chat(browser, url, "nanochat-tiny-test")
            page.js("Object.entries({temperature: 0.9, top_k: 40, max_tokens: 40})"
                    ".forEach(([id, value]) => document.getElementById(id).value = value)")

            # turn 1: the reply streams in (seen growing while the page is in the streaming state)
            state, midway = send_and_watch(page, FIRST)
            assert state["users"] == [FIRST] and not state["errors"], state
            reply = state["replies"][0]
            assert reply["text"].strip() and reply["chunks"] > 1, reply
            assert midway, "never saw a partial reply while streaming"
            assert all(reply["text"].startswith(s["replies"][-1]["text"]) for s in midway)
            assert len(midway[0]["replies"][-1]["text"]) < len(reply["text"])

            # turn 2: the history goes along (the server would reject a broken role order)
            state, _ = send_and_watch(page, SECOND)
            assert state["users"] == [FIRST, SECOND] and len(state["replies"]) == 2 and not state["errors"], state
            assert state["replies"][1]["text"].strip()
            shot = tmp_path / "chat_web.png"
            assert browser.save_screenshot(str(shot))
            assert shot.stat().st_size > 5000

            # an over-long message: the server's 400 is shown and the text goes back into the box
            page.type_into("#input", "y" * 8001)
            page.click("#send")
            page.wait_for("document.querySelectorAll('.error').length === 1", what="the error message")
            state = json.loads(page.js(STATE))
            assert "limit is 8000" in state["errors"][0] and state["users"] == [FIRST, SECOND], state
            assert page.js("document.getElementById('input').value.length") == 8001

            # New chat clears everything
            page.click("#new-chat")
            state = json.loads(page.js(STATE))
            assert state["users"] == [] and state["replies"] == [] and state["errors"] == []
            assert page.js("document.querySelector('.empty') !== null && document.getElementById('input').value === ''")
        finally:
            browser.quit()

    paths = [str(shot)]
    base = os.environ.get("NANOCHAT_BASE_DIR")
    if base:
        os.makedirs(os.path.join(base, "report"), exist_ok=True)
        paths.append(shutil.copyfile(shot, os.path.join(base, "report", "chat_web.png")))
    with capsys.disabled():
        print(f"\nchat UI screenshot: {' and '.join(paths)}")


def test_chat_ui_with_an_api_key(tmp_path):
    """A server started with --api_key: the first send gets the 401, the page shows the API key box and puts
    the message back; with the key typed in, the reply streams; after a reload the key is remembered."""
    chromium, driver = find_browser()
    from nanochat.engine import Engine

    tokenizer = tiny_tokenizer()
    app = create_app([Worker(Engine(tiny_model(tokenizer), tokenizer), tokenizer, "cpu")], model_id="keyed",
                     defaults={"max_tokens": 8}, api_key="sk-browser-test")
    with serve(app) as url:
        browser = start_browser(chromium, driver, tmp_path / "chromedriver.log")
        try:
            page = open_chat(browser, url, "keyed", what="page load (/health needs no key)")
            assert page.js("document.getElementById('api_key_label').hidden") is True
            page.type_into("#input", FIRST)
            page.click("#send")
            page.wait_for("document.querySelectorAll('.error').length === 1", what="the 401 message")
            state = json.loads(page.js(STATE))
            assert "API key" in state["errors"][0] and state["users"] == [], state
            assert page.js("document.getElementById('api_key_label').hidden") is False
            assert page.js("document.getElementById('input').value") == FIRST
            page.type_into("#api_key", "sk-browser-test")
            page.js("document.getElementById('api_key').dispatchEvent(new Event('change'))")
            page.js("document.getElementById('input').value = ''")
            state, _ = send_and_watch(page, FIRST)
            assert state["users"] == [FIRST] and state["replies"][0]["text"].strip(), state
            browser.refresh()
            page.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent "
                          "=== 'keyed'", what="reload")
            assert page.js("document.getElementById('api_key').value") == "sk-browser-test"
            assert page.js("document.getElementById('api_key_label').hidden") is False
        finally:
            browser.quit()
