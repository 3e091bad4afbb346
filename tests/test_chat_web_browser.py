"""
The chat page in a real headless Chromium, against a live chat_web server with a tiny GPT.

A user types a message, clicks Send and watches the reply stream in (we sample the page while it is
streaming, and count the SSE events it got); a second turn works (the page sends the history);
a message over the per-message limit shows the server's error and is put back into the text box;
New chat clears the conversation. A screenshot of the finished conversation is saved and its path
printed: <pytest tmp dir>/chat_web.png, also copied to $NANOCHAT_BASE_DIR/report/chat_web.png when
that variable is set.

The browser is driven over the Chrome DevTools Protocol through --remote-debugging-pipe (JSON messages
ending in NUL on file descriptors 3 and 4): only the standard library, no websocket or playwright.
Chromium comes from $MC_CHROMIUM, else `chromium` / `chromium-browser` / `google-chrome` on PATH. If there
is none the test skips, unless MC_INSTALL_CHROMIUM=1, which runs dev/install_chromium.sh first.

    .venv/bin/python -m pytest tests/test_chat_web_browser.py -s     # -s shows the screenshot path live
"""

import base64
import json
import os
import shutil
import subprocess
import threading
import time

import pytest

from scripts.chat_web import Worker, create_app
from tests.test_chat_web import serve, tiny_model, tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEIGHT = 1000, 720
FIRST, SECOND = "Hello! Who are you?", "Tell me a short story about the blue vault."


def find_chromium():
    """Path of a Chromium/Chrome binary, installing one if MC_INSTALL_CHROMIUM=1; None if there is none."""
    def lookup():
        for exe in (os.environ.get("MC_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
            path = exe and shutil.which(exe)
            if path:
                return path
        return None

    if lookup() is None and os.environ.get("MC_INSTALL_CHROMIUM") == "1":
        subprocess.run(["bash", os.path.join(REPO, "dev", "install_chromium.sh")], check=True, timeout=900)
    return lookup()


class CDP:
    """A headless Chromium and a Chrome DevTools Protocol connection to it over a pipe pair.
    send(method, params, session) -> result; a reader thread matches replies to requests by id."""

    def __init__(self, exe, profile_dir, log_path):
        to_chrome_r, self.to_chrome = os.pipe()      # Chromium reads commands on its fd 3
        self.from_chrome, from_chrome_w = os.pipe()  # and writes replies/events on its fd 4
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
                 "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile_dir}",
                 f"--window-size={WIDTH},{HEIGHT}", "--remote-debugging-pipe", "about:blank"]
        # bash moves the pipe ends to fds 3 and 4, then becomes Chromium (exec keeps the pid)
        script = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(["bash", "-c", script, exe, *flags], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id, self.replies, self.cond = 0, {}, threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        buf = b""
        while True:
            data = os.read(self.from_chrome, 1 << 16)
            if not data:
                break
            buf += data
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self.cond:
                        self.replies[msg["id"]] = msg
                        self.cond.notify_all()

    def send(self, method, params=None, session=None, timeout=15):
        with self.cond:
            self.next_id += 1
            mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        with self.cond:
            ok = self.cond.wait_for(lambda: mid in self.replies or self.proc.poll() is not None, timeout)
            reply = self.replies.pop(mid, None)
        if reply is None:
            raise RuntimeError(f"no reply to {method} within {timeout}s (chromium "
                               f"{'exited' if self.proc.poll() is not None else 'hung'}; ok={ok})")
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for fd in (self.to_chrome, self.from_chrome):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()


class Page:
    """One tab: evaluate JS, type, click, wait, screenshot."""

    def __init__(self, cdp):
        self.cdp = cdp
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})

    def call(self, method, params=None, timeout=15):
        return self.cdp.send(method, params, session=self.session, timeout=timeout)

    def js(self, expression):
        out = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in out:
            raise RuntimeError(f"page JS failed: {expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def wait_for(self, expression, timeout=20, what=None):
        deadline = time.time() + timeout
        while not self.js(expression):
            if time.time() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            time.sleep(0.02)

    def type_into(self, selector, text):
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", {"text": text})

    def click(self, selector):
        """A real mouse click at the centre of the element."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      f" return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left",
                                                   "clickCount": 1})

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


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
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium found (looked at $MC_CHROMIUM, chromium, chromium-browser, google-chrome): "
                    "run `bash dev/install_chromium.sh`, or set MC_INSTALL_CHROMIUM=1 to let this test do it")
    from nanochat.engine import Engine

    tokenizer = tiny_tokenizer()
    engine = PacedEngine(Engine(tiny_model(tokenizer), tokenizer))
    app = create_app([Worker(engine, tokenizer, "cpu")], model_id="nanochat-tiny-test",
                     defaults={"max_tokens": 40})
    with serve(app) as url:
        cdp = CDP(exe, tmp_path / "profile", tmp_path / "chromium.log")
        try:
            page = Page(cdp)
            page.call("Page.navigate", {"url": url + "/"})
            page.wait_for("document.readyState === 'complete' && "
                          "document.getElementById('model').textContent === 'nanochat-tiny-test'", what="page load")
            page.js("for (const id of ['temperature', 'top_k', 'max_tokens']) document.getElementById(id).value = "
                    "{temperature: 0.9, top_k: 40, max_tokens: 40}[id]")

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
            page.screenshot(shot)
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
            cdp.close()

    paths = [str(shot)]
    base = os.environ.get("NANOCHAT_BASE_DIR")
    if base:
        os.makedirs(os.path.join(base, "report"), exist_ok=True)
        paths.append(shutil.copyfile(shot, os.path.join(base, "report", "chat_web.png")))
    with capsys.disabled():
        print(f"\nchat UI screenshot: {' and '.join(paths)}")
