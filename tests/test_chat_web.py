"""
scripts/chat_web.py against a tiny real GPT + tokenizer (CPU, seconds):
- the nanochat SSE endpoint (text equals what the Engine generates with the same seed), every request
  limit's 4xx, a too-long conversation -> 400 (and the worker is free afterwards), UTF-8 streaming;
- the OpenAI-compatible API: /v1/models, /v1/chat/completions plain and streaming, error shape;
- a live uvicorn server on a free local port: the official `openai` client (plain + stream), raw httpx
  SSE like curl, concurrent requests on one worker, and a client that hangs up mid-stream;
- loading a worker from a saved checkpoint, and CLI range checks;
- --mc: MCEngine workers answer conversations longer than the context, the same reply for the same request,
  and a vanilla checkpoint under --mc is refused with the fix.
"""

import contextlib
import itertools
import json
import os
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from mc.infer.engine import MCEngine
from nanochat.engine import ContextTooLongError, Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.synthetic import synthetic_texts
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer
from scripts import chat_web
from scripts.chat_web import Utf8StreamDecoder, Worker, create_app

SEQ_LEN = 256
MODEL_ID = "tiny-test-model"
HELLO = [{"role": "user", "content": "Where does Marta Quill live?"}]
LOCAL = "http://localhost"  # the server answers loopback Host names only (DNS rebinding); TestClient's is "testserver"


# ----------------------------------------------------------------------------- fixtures
def tiny_tokenizer():
    """A 512-id BPE tokenizer trained on ten synthetic documents (~0.1 s)."""
    return RustBPETokenizer.train_from_iterator(itertools.islice(synthetic_texts(), 10), 512, pad_vocab=True)


def tiny_model(tokenizer, seed=0):
    """A 2-layer, 32-wide GPT whose untrained head is made to write printable text: big random logits
    for tokens that decode to printable characters, 0 for the rest (special tokens, control and partial
    UTF-8 bytes), so replies are visible gibberish that runs to max_tokens instead of stopping at once."""
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                    n_kv_head=2, n_embd=32)
    m = GPT(cfg)
    m.init_weights()
    n_bpe = tokenizer.get_vocab_size() - len(SPECIAL_TOKENS) - tokenizer.num_reserved

    def printable(i):
        try:
            return i < n_bpe and tokenizer.enc.decode_single_token_bytes(i).decode("utf-8").isprintable()
        except UnicodeDecodeError:
            return False

    hidden = [i for i in range(cfg.vocab_size) if not printable(i)]
    with torch.no_grad():
        m.lm_head.weight.normal_(0.0, 3.0)
        m.lm_head.weight[hidden] = 0.0
    return m.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def worker(model, tokenizer):
    return Worker(Engine(model, tokenizer), tokenizer, "cpu", name="cpu")


@pytest.fixture(scope="module")
def client(worker):
    app = create_app([worker], model_id=MODEL_ID, defaults={"max_tokens": 24, "temperature": 0.8, "top_k": 50})
    with TestClient(app, base_url=LOCAL) as c:
        yield c


def sse_events(text):
    """'data: ...' payloads of an SSE body, in order (JSON-decoded except [DONE])."""
    out = []
    for block in text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def engine_reply(worker, messages, max_tokens, temperature, top_k, seed):
    """What the Engine generates directly for this conversation (stop tokens cut)."""
    tok = worker.tokenizer
    stops = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    ids = []
    prompt = tok.render_for_completion({"messages": messages})
    for column, _ in worker.engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                            top_k=top_k, seed=seed):
        if column[0] in stops:
            break
        ids.append(column[0])
    return tok.decode(ids[:max_tokens])


# ----------------------------------------------------------------------------- page + nanochat endpoint
def test_index_and_health(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    page = r.text
    assert "<textarea" in page and 'id="send"' in page and 'id="new-chat"' in page
    assert "http://" not in page and "https://" not in page, "the UI must not load anything from the network"
    h = client.get("/health").json()
    assert h == {"status": "ok", "model": MODEL_ID, "workers": 1, "available": 1}


def test_stream_matches_engine(client, worker):
    body = {"messages": HELLO, "max_tokens": 20, "temperature": 1.0, "top_k": 50, "seed": 7}
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1]["done"] is True and all("token" in e for e in events[:-1])
    text = "".join(e["token"] for e in events[:-1])
    assert text == engine_reply(worker, HELLO, 20, 1.0, 50, 7)
    usage = events[-1]["usage"]
    assert 1 <= usage["completion_tokens"] <= 20 and events[-1]["finish_reason"] in ("stop", "length")
    assert usage["prompt_tokens"] == len(worker.tokenizer.render_for_completion({"messages": HELLO}))
    again = sse_events(client.post("/chat/completions", json=body).text)
    assert "".join(e.get("token", "") for e in again) == text, "same seed, same reply"


def test_multi_turn_and_system_message(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]
    events = sse_events(client.post("/chat/completions", json={"messages": msgs, "max_tokens": 3}).text)
    assert events[-1]["done"] is True and events[-1]["usage"]["completion_tokens"] <= 3


def _msgs(n_chars, n=1):
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": "x" * n_chars} for i in range(n)]


BAD_REQUESTS = [
    ({"messages": []}, "empty"),
    ({}, "'messages' must be a list"),
    ({"messages": "hi"}, "'messages' must be a list"),
    ({"messages": _msgs(1, 501)}, "too many messages"),
    ({"messages": _msgs(8001)}, "limit is 8000"),
    ({"messages": _msgs(7000, 5)}, "limit is 32000"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role must be one of"),
    ({"messages": [{"content": "hi"}]}, "role must be one of"),
    ({"messages": ["hi"]}, "must be an object"),
    ({"messages": [{"role": "user", "content": "   "}]}, "is empty"),
    ({"messages": [{"role": "user", "content": 5}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "last message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "system", "content": "c"}, {"role": "user", "content": "d"}]}, "system message"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens must be in [1, 4096]"),
    ({"messages": HELLO, "max_tokens": 4097}, "max_tokens must be in [1, 4096]"),
    ({"messages": HELLO, "max_tokens": "10"}, "max_tokens must be an integer"),
    ({"messages": HELLO, "max_tokens": 2.5}, "max_tokens must be an integer"),
    ({"messages": HELLO, "temperature": -0.1}, "temperature must be in [0.0, 2.0]"),
    ({"messages": HELLO, "temperature": 2.01}, "temperature must be in [0.0, 2.0]"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature must be a number"),
    ({"messages": HELLO, "temperature": True}, "temperature must be a number"),
    ({"messages": HELLO, "top_k": 0}, "top_k must be in [1, 200]"),
    ({"messages": HELLO, "top_k": 201}, "top_k must be in [1, 200]"),
    ({"messages": HELLO, "seed": "x"}, "seed must be an integer"),
    ([1, 2], "JSON object"),
]


@pytest.mark.parametrize("body,needle", BAD_REQUESTS, ids=[n for _, n in BAD_REQUESTS])
def test_limits_are_clear_400s(client, body, needle):
    r = client.post("/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    r = client.post("/v1/chat/completions", json=body if not isinstance(body, dict) else {"model": MODEL_ID, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error" and set(err) == {
        "message", "type", "param", "code"}


def test_malformed_and_oversized_bodies(client):
    r = client.post("/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/chat/completions", content=b"x" * (chat_web.MAX_BODY_BYTES + 1))
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "stream": "yes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_limit_edges_are_accepted(client):
    for extra in ({"max_tokens": 1}, {"temperature": 0}, {"temperature": 2}, {"top_k": 1}, {"top_k": 200}):
        r = client.post("/chat/completions", json={"messages": HELLO, "max_tokens": 2, **extra})
        assert r.status_code == 200 and sse_events(r.text)[-1]["done"] is True, extra
    r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_completion_tokens": 1})
    assert r.json()["usage"]["completion_tokens"] == 1


def test_context_too_long_is_400_and_frees_the_worker(client):
    words = " ".join(f"word{i}" for i in range(600))  # far more than SEQ_LEN tokens, under the char limits
    for path in ("/chat/completions", "/v1/chat/completions"):
        r = client.post(path, json={"messages": [{"role": "user", "content": words}]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        message = err if isinstance(err, str) else err["message"]
        assert "too long for the model's context" in message and "new chat" in message
        code = r.json()["code"] if isinstance(err, str) else err["code"]
        assert code == "context_length_exceeded"
    assert client.get("/health").json()["available"] == 1
    r = client.post("/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    assert r.status_code == 200 and sse_events(r.text)[-1]["done"] is True


def test_reply_is_cut_where_the_context_ends(client, tokenizer):
    words = []
    while len(tokenizer.render_for_completion({"messages": [{"role": "user", "content": " ".join(words)}]})) \
            < SEQ_LEN - 5:
        words.append(f"w{len(words)}")
    msgs = [{"role": "user", "content": " ".join(words)}]
    room = SEQ_LEN - len(tokenizer.render_for_completion({"messages": msgs}))
    assert 1 <= room <= 5
    out = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 100}).json()
    assert out["usage"]["completion_tokens"] <= room and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["total_tokens"] <= SEQ_LEN


class TooLongEngine:
    def generate(self, tokens, **kwargs):
        raise ContextTooLongError(f"prompt of {len(tokens)} tokens does not fit (engine rule)")


def test_engine_context_error_is_400(tokenizer):
    with TestClient(create_app([Worker(TooLongEngine(), tokenizer, "cpu")]), base_url=LOCAL) as c:
        r = c.post("/v1/chat/completions", json={"messages": HELLO})
        assert r.status_code == 400 and "engine rule" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert c.get("/health").json()["available"] == 1


# ----------------------------------------------------------------------------- UTF-8
UNICODE_TEXT = "naïve café 😀 日本語 Ωμέγα"


def test_utf8_decoder_never_splits_characters(tokenizer):
    ids = tokenizer.encode(UNICODE_TEXT)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the test needs tokens that split characters"
    dec = Utf8StreamDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == UNICODE_TEXT
    assert not any("\ufffd" in p for p in pieces)
    dec = Utf8StreamDecoder(tokenizer)  # a cut-off character is still flushed at the end (as U+FFFD)
    assert dec.push(tokenizer.encode("😀")[0]) == "" and dec.flush() == "\ufffd"


class ScriptedEngine:
    """Yields a fixed token list in the Engine's (token_column, token_masks) shape."""

    def __init__(self, ids):
        self.ids = ids

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        for i in self.ids[:max_tokens]:
            yield [i], [1]


def test_utf8_streaming_end_to_end(tokenizer):
    ids = tokenizer.encode(UNICODE_TEXT) + [tokenizer.encode_special("<|assistant_end|>")]
    app = create_app([Worker(ScriptedEngine(ids), tokenizer, "cpu")], model_id=MODEL_ID)
    with TestClient(app, base_url=LOCAL) as c:
        raw = c.post("/chat/completions", json={"messages": HELLO, "max_tokens": 200}).content
        events = sse_events(raw.decode("utf-8"))  # strict: raises on any broken byte sequence
        pieces = [e["token"] for e in events[:-1]]
        assert "".join(pieces) == UNICODE_TEXT and not any("\ufffd" in p for p in pieces)
        assert events[-1]["finish_reason"] == "stop" and events[-1]["usage"]["completion_tokens"] == len(ids)
        chunks = sse_events(c.post("/v1/chat/completions", json={"messages": HELLO, "stream": True}).text)
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1]) == UNICODE_TEXT
        out = c.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}).json()
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 3


# ----------------------------------------------------------------------------- OpenAI-compatible API
def test_v1_models(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == [MODEL_ID]


def test_v1_chat_completion(client, worker):
    body = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 12, "temperature": 0.7, "seed": 3}
    out = client.post("/v1/chat/completions", json=body).json()
    assert out["object"] == "chat.completion" and out["model"] == MODEL_ID and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == engine_reply(worker, HELLO, 12, 0.7, 50, 3)
    assert choice["finish_reason"] in ("stop", "length")
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 1 <= u["completion_tokens"] <= 12


def test_v1_chat_completion_stream(client):
    body = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 12, "stream": True, "seed": 3,
            "temperature": 0.7, "stream_options": {"include_usage": True}}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL_ID for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert text == plain["choices"][0]["message"]["content"]


# ----------------------------------------------------------------------------- live server
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(app):
    """Run `app` under uvicorn on a free 127.0.0.1 port in a daemon thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 15
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def live_url(worker):
    with serve(create_app([worker], model_id=MODEL_ID, defaults={"max_tokens": 16})) as url:
        yield url


def test_openai_client_against_live_server(live_url):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=live_url + "/v1", api_key="unused", timeout=20, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    out = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=0.5, seed=1)
    assert isinstance(out.choices[0].message.content, str) and out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=8, temperature=0.5, seed=1,
                                            stream=True)
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text == out.choices[0].message.content and finish == out.choices[0].finish_reason
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=HELLO, temperature=5)
    assert "temperature must be in" in str(e.value)


def test_raw_http_stream_like_curl(live_url):
    body = {"messages": HELLO, "max_tokens": 10, "temperature": 0}
    events = []
    with httpx.stream("POST", live_url + "/chat/completions", json=body, timeout=20) as r:
        assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["done"] is True and all("token" in e for e in events[:-1])
    assert httpx.get(live_url + "/", timeout=10).text.startswith("<!DOCTYPE html>")


def test_concurrent_requests_share_one_worker(live_url):
    results = []

    def one(i):
        r = httpx.post(live_url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 8})
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [200] * 4
    assert httpx.get(live_url + "/health", timeout=10).json()["available"] == 1


class SlowEngine(ScriptedEngine):
    """A ScriptedEngine that takes 10 ms per token and counts what it yielded."""

    yielded = 0

    def generate(self, *args, **kwargs):
        for item in super().generate(*args, **kwargs):
            time.sleep(0.01)
            self.yielded += 1
            yield item


def test_client_hangup_stops_generation_and_frees_the_worker(tokenizer):
    engine = SlowEngine(tokenizer.encode(" word") * 1000)
    with serve(create_app([Worker(engine, tokenizer, "cpu")], model_id=MODEL_ID)) as url:
        with httpx.stream("POST", url + "/chat/completions", timeout=20,
                          json={"messages": HELLO, "max_tokens": 1000}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first token of a 10-second reply
        deadline = time.time() + 10
        while httpx.get(url + "/health", timeout=10).json()["available"] != 1:
            assert time.time() < deadline, "the worker was not released after the client disconnected"
            time.sleep(0.05)
        assert engine.yielded < 500, "generation went on after the client hung up"
        r = httpx.post(url + "/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=20)
        assert r.status_code == 200 and sse_events(r.text)[-1]["done"] is True


# ----------------------------------------------------------------------------- loading + CLI
def test_load_workers_from_checkpoint(tmp_path, monkeypatch, model, tokenizer):
    from nanochat.checkpoint_manager import save_checkpoint

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tokenizer.save(str(tmp_path / "tokenizer"))
    cfg = model.config
    meta = {"model_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    save_checkpoint(str(tmp_path / "chatsft_checkpoints" / "tiny"), 5, model.state_dict(), None, meta)
    workers, model_id = chat_web.load_workers("sft", None, None, "cpu", 1)
    assert model_id == "nanochat-sft-tiny-step5" and len(workers) == 1 and workers[0].device == "cpu"
    with TestClient(create_app(workers, model_id=model_id), base_url=LOCAL) as c:
        r = c.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == model_id
    with pytest.raises(SystemExit):
        chat_web.load_workers("sft", None, None, "cpu", 2)  # several workers need CUDA


@pytest.mark.parametrize("flags", [["--temperature", "3"], ["--top_k", "0"], ["--max_tokens", "5000"],
                                   ["--num_gpus", "0"], ["--bogus"]])
def test_cli_rejects_bad_flags(flags):
    with pytest.raises(SystemExit):
        chat_web.main(flags)


# ----------------------------------------------------------------------------- --mc
def test_mc_worker_serves_conversations_longer_than_the_context(tokenizer, model):
    from tests.test_mc_session import tiny_mc_model

    mc_model, _, _ = tiny_mc_model(vocab=tokenizer.get_vocab_size(), random_lens=False)  # sequence_len 64
    with torch.no_grad():
        mc_model.lm_head.weight.copy_(model.lm_head.weight)  # printable gibberish, like the vanilla model's
    engine = MCEngine(mc_model, tokenizer, reuse_session=False)
    msgs = [{"role": "user", "content": " ".join(f"word{i}" for i in range(300))},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and what came first?"}]
    with TestClient(create_app([Worker(engine, tokenizer, "cpu")]), base_url=LOCAL) as c:
        body = {"messages": msgs, "max_tokens": 12, "temperature": 1.0, "seed": 3}
        out = c.post("/v1/chat/completions", json=body).json()
        assert out["usage"]["prompt_tokens"] > 5 * mc_model.config.sequence_len
        assert out["usage"]["completion_tokens"] == 12 and out["choices"][0]["finish_reason"] == "length"
        assert c.post("/v1/chat/completions", json=body).json()["choices"] == out["choices"]  # stateless
        events = sse_events(c.post("/chat/completions", json=body).text)
        assert events[-1]["done"] is True and "".join(e.get("token", "") for e in events) == \
            out["choices"][0]["message"]["content"]
    assert engine.session.stats()["max_kv_entries"] <= mc_model.config.sequence_len
    with pytest.raises(ValueError, match="--mc_enabled=1"):  # a vanilla checkpoint under --mc: the fix
        MCEngine(model, tokenizer)
    with pytest.raises(SystemExit):
        chat_web.main(["--mc_infer_refocus_interval", "8"])  # without --mc


def test_mc_saved_conversations_continue_across_a_restart(tokenizer, model, tmp_path, monkeypatch):
    """--session_dir: a request with a session_id gets the stateless reply, and its conversation is saved;
    after a restart (new workers, new store) the next turn reopens it and ingests only the new part."""
    from mc.infer.store import SessionStore
    from tests.test_mc_session import tiny_mc_model

    mc_model, _, _ = tiny_mc_model(vocab=tokenizer.get_vocab_size(), random_lens=False)
    with torch.no_grad():
        mc_model.lm_head.weight.copy_(model.lm_head.weight)
    ckpt = {"model": "tiny"}

    def app():
        engine = MCEngine(mc_model, tokenizer, reuse_session=False, store=SessionStore(str(tmp_path)), checkpoint=ckpt)
        return engine, create_app([Worker(engine, tokenizer, "cpu")])

    first = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))}]
    body = {"messages": first, "max_tokens": 8, "temperature": 0.0, "seed": 1}
    engine, a = app()
    with TestClient(a, base_url=LOCAL) as c:
        stateless = c.post("/v1/chat/completions", json=body).json()
        saved = c.post("/v1/chat/completions", json={**body, "session_id": "conv1"}).json()
        assert saved["choices"] == stateless["choices"]
        assert c.post("/v1/chat/completions", json={**body, "session_id": "../x"}).status_code == 400
        a.state.pool.busy.add("conv2")  # another request is generating in conv2
        r = c.post("/v1/chat/completions", json={**body, "session_id": "conv2"})
        assert r.status_code == 409 and "another request" in r.json()["error"]["message"]
    reply = saved["choices"][0]["message"]["content"]
    assert SessionStore(str(tmp_path)).committed_tokens("conv1") == \
        saved["usage"]["prompt_tokens"] + saved["usage"]["completion_tokens"]

    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and what came first?"}]
    body2 = {"messages": second, "max_tokens": 8, "temperature": 0.0, "seed": 2}
    opened = []
    real_open = SessionStore.open
    monkeypatch.setattr(SessionStore, "open", lambda self, *a, **k: opened.append(a[0]) or real_open(self, *a, **k))
    engine, a = app()  # a restart
    with TestClient(a, base_url=LOCAL) as c:
        out = c.post("/v1/chat/completions", json={**body2, "session_id": "conv1"}).json()
        assert opened == ["conv1"]  # reopened from disk, continued (the ids file kept, not replaced)...
        assert sorted(os.listdir(tmp_path / "conv1")) == ["state.bin", "tokens.bin"]
        history = engine.session.token_ids().tolist()
        assert len(history) == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
        assert out["choices"] == c.post("/v1/chat/completions", json=body2).json()["choices"]  # ...same reply
    engine, a = app()
    with TestClient(a, base_url=LOCAL) as c:  # messages that do not continue it: rebuilt, and replaced
        c.post("/v1/chat/completions", json={**body, "session_id": "conv1"})
    assert SessionStore(str(tmp_path)).committed_tokens("conv1") == \
        saved["usage"]["prompt_tokens"] + saved["usage"]["completion_tokens"]
    files = sorted(os.listdir(tmp_path / "conv1"))  # the replacement's ids in a new file, the old one gone
    assert len(files) == 2 and files[0] == "state.bin" and files[1].startswith("tokens.") and files[1] != "tokens.bin"
