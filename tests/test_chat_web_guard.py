"""
Load shedding and the front door of scripts/chat_web.py (nanochat/web_pool.py, nanochat/web_guard.py),
the deterministic core of scripts/web_fuzz.py, in a few seconds on CPU:
- a client that abandons a non-streamed reply, or leaves while queued, frees the worker within 1 s;
- a full waiting line is a 503 with Retry-After; --request_timeout ends a reply with finish_reason
  "timeout", and a request that cannot get a worker in time is a 503;
- a body over the limit is refused while it is read (413, the sender stopped early), or up front from
  its Content-Length; text/plain and forms are 415; malformed JSON (deep nesting, NaN, 1e400, lone
  surrogates) and tiny temperatures are 400s;
- --api_key: 401 without 'Bearer <key>', the page and /health stay open, the openai client works;
- Host names other than loopback / the bind address / --allowed_hosts are refused, and so are
  cross-site Origins.
"""

import asyncio
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from nanochat import web_guard as wg
from nanochat.web_pool import QueueFull, QueueTimeout, WorkerPool
from scripts.chat_web import Worker, create_app
from tests.test_chat_web import HELLO, LOCAL, ScriptedEngine, SlowEngine, serve, sse_events, tiny_tokenizer

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def slow_worker(tokenizer):
    """A worker whose reply would take 10 s (1000 tokens, 10 ms each) unless something stops it."""
    engine = SlowEngine(tokenizer.encode(" word") * 1000)
    return Worker(engine, tokenizer, "cpu", name="slow"), engine


def wait_free(url, limit=5.0, headers=None):
    """Seconds until /health reports the worker free again (fails after `limit`)."""
    t0 = time.perf_counter()
    while httpx.get(url + "/health", timeout=10, headers=headers).json()["available"] != 1:
        assert time.perf_counter() - t0 < limit, "the worker was not released"
        time.sleep(0.01)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- load shedding (live server)
def test_abandoned_requests_free_the_worker_within_a_second(tokenizer):
    worker, engine = slow_worker(tokenizer)
    with serve(create_app([worker], max_queue=4)) as url:
        body = {"messages": HELLO, "max_tokens": 1000}
        with pytest.raises(httpx.ReadTimeout):  # a non-streamed 10 s reply, abandoned after 0.3 s
            httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
        assert wait_free(url) < 1.0
        assert engine.yielded < 200, "generation went on after the client left"
        # a request abandoned while it waits in line never reaches the model
        with httpx.stream("POST", url + "/chat/completions", json=body, timeout=10) as r:
            assert r.status_code == 200  # holds the worker
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
        assert wait_free(url) < 1.0
        calls = engine.yielded
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert engine.yielded - calls == 3, "the abandoned queued request was generated after all"


def test_full_queue_is_503_with_retry_after(tokenizer):
    worker, _ = slow_worker(tokenizer)
    with serve(create_app([worker], max_queue=0)) as url:
        with httpx.stream("POST", url + "/chat/completions", json={"messages": HELLO, "max_tokens": 1000},
                          timeout=10) as r:
            assert r.status_code == 200
            busy = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO}, timeout=10)
            assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1
            assert busy.json()["error"]["code"] == "queue_full" and "retry" in busy.json()["error"]["message"]
        wait_free(url)
        assert httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                          timeout=10).status_code == 200


def test_request_timeout_cuts_the_reply_and_the_wait(tokenizer):
    worker, _ = slow_worker(tokenizer)
    with serve(create_app([worker], request_timeout=0.4)) as url:
        t0 = time.perf_counter()
        out = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1000}, timeout=10)
        assert out.status_code == 200 and time.perf_counter() - t0 < 2.0
        assert out.json()["choices"][0]["finish_reason"] == "timeout"
        assert 1 <= out.json()["usage"]["completion_tokens"] < 1000
        events = sse_events(httpx.post(url + "/chat/completions", json={"messages": HELLO, "max_tokens": 1000},
                                       timeout=10).text)
        assert events[-1]["done"] is True and events[-1]["finish_reason"] == "timeout"
        results = []
        with httpx.stream("POST", url + "/chat/completions", json={"messages": HELLO, "max_tokens": 1000},
                          timeout=10) as r:
            assert r.status_code == 200  # holds the worker for its 0.4 s
            threading.Thread(target=lambda: results.append(httpx.post(
                url + "/v1/chat/completions", json={"messages": HELLO}, timeout=10))).start()
            time.sleep(0.1)
            r.read()
        deadline = time.time() + 5
        while not results:
            assert time.time() < deadline
            time.sleep(0.01)
        # the waiter may get the worker with no time left (0 tokens, "timeout") or run out in line (503)
        late = results[0]
        assert late.status_code in (200, 503)
        if late.status_code == 503:
            assert late.json()["error"]["code"] == "timeout" and "retry-after" in late.headers


def test_body_over_the_limit_is_refused_while_reading(tokenizer):
    worker = Worker(ScriptedEngine(tokenizer.encode(" hi") * 3), tokenizer, "cpu")
    with serve(create_app([worker])) as url:
        sent = [0]

        def body(total=200_000_000, chunk=1 << 16):
            block = b" " * chunk
            while sent[0] < total:
                sent[0] += chunk
                yield block

        r = httpx.post(url + "/v1/chat/completions", content=body(), timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        assert sent[0] < 50_000_000, f"the server read {sent[0]} bytes of a refused body"
        sent[0] = 0
        r = httpx.post(url + "/v1/chat/completions", content=body(), timeout=30,
                       headers={"content-type": "application/json", "content-length": "200000000"})
        assert r.status_code == 413 and sent[0] < 50_000_000
        assert httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2},
                          timeout=10).status_code == 200


# ----------------------------------------------------------------------------- bodies
@pytest.fixture(scope="module")
def client(tokenizer):
    app = create_app([Worker(ScriptedEngine(tokenizer.encode(" hi") * 3), tokenizer, "cpu")])
    with TestClient(app, base_url=LOCAL) as c:
        yield c


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None, "application/jsonx"])
def test_non_json_content_types_are_415(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/v1/chat/completions", content=json.dumps({"messages": HELLO}).encode(), headers=headers)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    ok = client.post("/v1/chat/completions", content=json.dumps({"messages": HELLO}).encode(),
                     headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


BAD_JSON = [
    ('{"messages": ' + "[" * 40 + "]" * 40 + "}", "nested more than 32"),
    ("[" * 100_000, "nested more than 32"),
    ('{"messages": [], "x": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}", "nested more than 32"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', "temperature must be in"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e-45}', "temperature must be 0"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": 0.001}', "temperature must be 0"),
    ('{"messages": [{"role": "user", "content": "hi"}], "seed": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e300}', "max_tokens must be an integer"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    (b'{"messages": "\xff\xfe"}', "not valid JSON"),
]


@pytest.mark.parametrize("raw,needle", BAD_JSON, ids=range(len(BAD_JSON)))
def test_malformed_json_is_400(client, raw, needle):
    for path in ("/chat/completions", "/v1/chat/completions"):
        r = client.post(path, content=raw if isinstance(raw, bytes) else raw.encode(),
                        headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert needle in (err if isinstance(err, str) else err["message"])


# ----------------------------------------------------------------------------- API key
def test_api_key(tokenizer):
    app = create_app([Worker(ScriptedEngine(tokenizer.encode(" hi") * 3), tokenizer, "cpu")], api_key=KEY)
    with TestClient(app, base_url=LOCAL) as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                        {"authorization": f"Basic {KEY}"}, {"authorization": f"Bearer {KEY}x"}):
            r = c.post("/v1/chat/completions", json={"messages": HELLO}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models", headers=headers).status_code == 401
        assert c.post("/chat/completions", json={"messages": HELLO}).status_code == 401
        assert c.get("/").status_code == 200 and c.get("/health").status_code == 200  # the page asks for the key
        auth = {"authorization": f"Bearer {KEY}"}
        assert c.post("/v1/chat/completions", json={"messages": HELLO}, headers=auth).status_code == 200
        assert c.post("/chat/completions", json={"messages": HELLO}, headers=auth).status_code == 200
    with serve(app) as url:
        from openai import AuthenticationError, OpenAI

        out = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=10).chat.completions.create(
            model="x", messages=HELLO, max_tokens=2)
        assert out.usage.completion_tokens == 2
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0, timeout=10).models.list()


def test_page_has_an_api_key_box(client):
    page = client.get("/").text
    assert 'id="api_key"' in page and "Authorization" in page


# ----------------------------------------------------------------------------- Host / Origin
def test_host_and_origin_checks(tokenizer):
    app = create_app([Worker(ScriptedEngine(tokenizer.encode(" hi") * 3), tokenizer, "cpu")])
    with TestClient(app) as c:  # TestClient's own Host is "testserver"
        for host in ("testserver", "evil.example", "evil.example:8000", "127.0.0.2", "localhost.evil.example", ""):
            r = c.get("/health", headers={"host": host})
            assert r.status_code == 400 and r.json()["code"] == "host_not_allowed", host
            assert c.post("/v1/chat/completions", json={"messages": HELLO}, headers={"host": host}).status_code == 400
        for host in ("localhost", "localhost:8000", "LOCALHOST.", "127.0.0.1:1", "[::1]:8000"):
            assert c.get("/health", headers={"host": host}).status_code == 200, host
        same = {"host": "127.0.0.1:8000"}
        for origin in ("http://127.0.0.1:8000", "http://localhost:3000"):
            r = c.post("/v1/chat/completions", json={"messages": HELLO}, headers={**same, "origin": origin})
            assert r.status_code == 200, origin
        for origin in ("https://evil.example", "null", "http://[::1", "http://127.0.0.1.evil.example"):
            r = c.post("/v1/chat/completions", json={"messages": HELLO}, headers={**same, "origin": origin})
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", origin
    hosts = wg.allowed_hosts("0.0.0.0", ["chat.example", "10.0.0.5"])
    app = create_app([Worker(ScriptedEngine(tokenizer.encode(" hi") * 3), tokenizer, "cpu")], allowed_hosts=hosts)
    with TestClient(app, base_url="http://chat.example:8000") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"host": "10.0.0.5"}).status_code == 200
        assert c.get("/health", headers={"host": "0.0.0.0"}).status_code == 400


def test_allowed_hosts_and_host_names():
    assert wg.host_name("LocalHost.:8000") == "localhost" and wg.host_name("[::1]:80") == "::1"
    assert wg.host_name("a:b") is None and wg.host_name("[::1]x") is None and wg.host_name("") is None
    assert wg.allowed_hosts() == wg.LOCAL_HOSTS
    assert wg.allowed_hosts("0.0.0.0") == wg.LOCAL_HOSTS and wg.allowed_hosts("::") == wg.LOCAL_HOSTS
    assert wg.allowed_hosts("box.lan", ["fe80::1", " "]) == wg.LOCAL_HOSTS | {"box.lan", "fe80::1"}
    assert wg.allowed_hosts("127.0.0.1", ["*"]) is None
    with pytest.raises(ValueError):
        wg.allowed_hosts("127.0.0.1", ["a b:x"])


# ----------------------------------------------------------------------------- the pool alone
def test_worker_pool_bounds_and_never_loses_a_worker():
    async def scenario():
        pool = WorkerPool(["w"], max_waiting=1)
        w = await pool.acquire()
        waiter = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await pool.acquire()
        with pytest.raises(QueueTimeout):  # the line is full, but a timeout is checked before the bound
            pool.max_waiting = 2
            await pool.acquire(timeout=0.01)
        pool.release(w)      # handed to the waiter ...
        waiter.cancel()      # ... which is cancelled before it runs: the worker must come back
        await asyncio.gather(waiter, return_exceptions=True)
        assert pool.available() == 1 and pool.waiting() == 0
        assert await pool.acquire() == "w"

    asyncio.run(scenario())
