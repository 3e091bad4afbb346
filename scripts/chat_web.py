"""
Chat with a trained model in the browser, or through any OpenAI-compatible client.

    python -m scripts.chat_web                      # latest SFT checkpoint, http://127.0.0.1:8000
    python -m scripts.chat_web -i mid -g d20 -s 650 --num_gpus 8 --host 0.0.0.0 --port 8000
    python -m scripts.chat_web --mc                 # an MC checkpoint: conversations longer than the context

Endpoints
- GET  /                     the chat page (nanochat/ui.html: one offline file, no CDN)
- GET  /health               {"status": "ok", "model", "workers", "available"}
- POST /chat/completions     nanochat style: {"messages": [...], "temperature"?, "max_tokens"?, "top_k"?,
                             "seed"?} -> Server-Sent Events `data: {"token": "..."}` ... then
                             `data: {"done": true, "finish_reason", "usage"}` (`data: {"error"}` if it fails)
- POST /v1/chat/completions  OpenAI chat.completions: a chat.completion object, or with "stream": true
                             `data: {chat.completion.chunk}` lines ending in `data: [DONE]`
- GET  /v1/models            the one loaded model id
Bad requests get a 4xx JSON error naming the field: {"error": "..."} on the nanochat endpoint,
OpenAI's {"error": {"message", "type", "param", "code"}} under /v1.

Serving: one worker (model + Engine) per device (cuda:0..N-1, or one on cpu/mps). A request takes a
free worker (nanochat/web_pool.py), waiting in a line of at most --max_queue (then 503 + Retry-After);
the blocking token loop runs in its own thread, which checks a cancel flag and the --request_timeout
deadline between tokens and puts the worker back when it ends. A client that disconnects cancels its
request wherever it is: waiting, in prefill, streaming, or mid non-streamed reply (web_guard.until_disconnected).
Front door (nanochat/web_guard.py), before a request costs memory or a worker: Host must be a loopback name,
the bound --host or one of --allowed_hosts (DNS rebinding); a web page's Origin must be same-origin or an
allowed host; with --api_key / $NANOCHAT_API_KEY every path but / and /health needs `Authorization: Bearer`;
POST bodies must be application/json (415: text/plain and forms need no CORS preflight), <= 1 MB counted
while reading (413), strict JSON nested <= 32 deep (400). temperature 0 < T < 0.01 is a 400 (0 = greedy).

A reply is cut where the model's context (sequence_len) ends: max_tokens is lowered to the room the
prompt leaves (finish_reason "length"). A prompt that leaves no room is an ordinary 400; so is any
ContextTooLongError of the Engine, since the first token is awaited before a response is sent.
Text is streamed in whole UTF-8 characters: a token that ends inside a multi-byte character is held
back until the next token completes it (nanochat.engine.Utf8StreamDecoder).

--mc (an MC checkpoint): workers run mc.infer.engine.MCEngine. Requests are stateless (each carries the
whole conversation), so each builds a fresh MegaContext session from its full message list (ingest all,
refocus, generate): same request + seed, same reply; no per-conversation server state. No context cut
applies then (the request limits bound the work); only a history too long for W is a 400.
--mc --session_dir DIR: a request may also name a saved conversation, "session_id": "ID" in the body (an
OpenAI client: extra_body={"session_id": ...}). Its messages are still the whole conversation; when they
continue what is saved under ID token for token, only the new part is ingested (this worker's copy, or the
saved one reopened, mc/infer/store.py); otherwise the conversation is rebuilt from the messages, as a
stateless request would, and replaces the saved one. Either way the reply is the stateless reply, and the
conversation is saved once the prompt is in and again when the reply ends, so it survives a restart. One
request per conversation at a time (409 while another is generating in it).
"""

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from dataclasses import dataclass, replace

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mc.config import add_session_flags, given_session_flags, session_overrides
from mc.infer.checkpoint import load_model
from mc.infer.engine import MCEngine
from mc.infer.store import SESSION_ID, SessionStore, checkpoint_identity
from nanochat import cli_checks as ck
from nanochat import web_guard as wg
from nanochat.checkpoint_manager import SOURCE_DIRS, find_last_model_tag, latest_step, tag_dir
from nanochat.common import autodetect_device_type, die, get_base_dir
from nanochat.engine import Engine, Utf8StreamDecoder  # noqa: F401 (tests import the decoder from here)
from nanochat.web_pool import Generation, QueueFull, QueueTimeout, Worker, WorkerPool

# ----------------------------------------------------------------------------- request limits
MAX_MESSAGES = 500              # messages per request
MAX_MESSAGE_CHARS = 8000        # characters per message
MAX_CONVERSATION_CHARS = 32000  # characters over all messages
MAX_BODY_BYTES = 1_000_000      # raw request body (32,000 chars of 4-byte UTF-8 + JSON overhead fit)
MAX_TOKENS_RANGE = (1, 4096)
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (1, 200)
MIN_TEMPERATURE = 0.01          # 0 < T < this is refused: logits / 1e-45 overflow to inf, and it is greedy anyway
MAX_JSON_DEPTH = 32             # a chat request nests 4 levels; json.loads itself fails near 1,000
MAX_QUEUE = 16                  # --max_queue default: requests that may wait for a busy worker
REQUEST_TIMEOUT = 600.0         # --request_timeout default (seconds, queue wait included; 0 = none)
BODY_TIMEOUT = 30.0             # seconds a client may take to send its (<= 1 MB) body
RETRY_AFTER = 2                 # seconds, in the Retry-After of a 503
API_KEY_ENV = "NANOCHAT_API_KEY"
OPEN_PATHS = ("/", "/health")   # no API key needed: the page (it asks for the key) and liveness probes
ROLES = ("user", "assistant", "system")
UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")


RequestError = wg.Refusal  # a 4xx/5xx with a message that says what to fix (the name the tests know)


@dataclass
class ChatParams:
    messages: list      # [{"role", "content": str}] validated
    max_tokens: int
    temperature: float
    top_k: int
    seed: int
    session_id: str | None = None  # --session_dir: the saved conversation this request continues


def _number(body, name, lo, hi, default, integer):
    """body[name] checked against [lo, hi] (None/absent -> default). bool is not a number here."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"{name} must be {kind} in [{lo}, {hi}], got {value!r}", param=name)
    if not lo <= value <= hi:
        raise RequestError(400, f"{name} must be in [{lo}, {hi}], got {value}", param=name)
    return int(value) if integer else float(value)


def _content_text(content, i):
    """Message content as one string: a str, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(400, f"messages[{i}].content must be a string (or a list of text parts), "
                            f"got {type(content).__name__}", param=f"messages[{i}].content")


def parse_chat_request(body, defaults, openai=False) -> ChatParams:
    """Validate a chat request body against every limit; raises RequestError (400) naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object with a 'messages' list")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise RequestError(400, "'messages' must be a list of {\"role\", \"content\"} objects", param="messages")
    if not messages:
        raise RequestError(400, "'messages' is empty: send at least one user message", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(400, f"too many messages: {len(messages)} > {MAX_MESSAGES}; start a new chat", param="messages")
    clean, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}",
                               param=f"messages[{i}].role")
        text = _content_text(m.get("content"), i)
        try:  # JSON may carry lone surrogates (\ud800) that no tokenizer can encode
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(400, f"messages[{i}].content is not valid Unicode (a lone surrogate)",
                               param=f"messages[{i}].content") from None
        if not text.strip():
            raise RequestError(400, f"messages[{i}].content is empty", param=f"messages[{i}].content")
        if len(text) > MAX_MESSAGE_CHARS:
            raise RequestError(400, f"messages[{i}] has {len(text)} characters; the limit is {MAX_MESSAGE_CHARS} "
                                    f"per message", param=f"messages[{i}].content")
        total += len(text)
        clean.append({"role": role, "content": text})
    if total > MAX_CONVERSATION_CHARS:
        raise RequestError(400, f"the conversation has {total} characters; the limit is {MAX_CONVERSATION_CHARS} "
                                f"per request: start a new chat", param="messages")
    if clean[-1]["role"] != "user":
        raise RequestError(400, f"the last message must come from the user (got {clean[-1]['role']!r}): "
                                f"the server writes the next assistant reply", param="messages")
    if any(m["role"] == "system" for m in clean[1:]):
        raise RequestError(400, "a system message may only be the first message", param="messages")
    if openai:
        if body.get("n", 1) != 1:
            raise RequestError(400, f"n must be 1 (one choice per request), got {body.get('n')!r}", param="n")
        if body.get("max_completion_tokens") is not None and body.get("max_tokens") is None:
            body = {**body, "max_tokens": body["max_completion_tokens"]}
    seed = _number(body, "seed", 0, 2**63 - 1, random.randrange(2**31), integer=True)
    temperature = _number(body, "temperature", *TEMPERATURE_RANGE, defaults["temperature"], integer=False)
    if 0 < temperature < MIN_TEMPERATURE:
        raise RequestError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature!r}",
                           param="temperature")
    session_id = body.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or not SESSION_ID.match(session_id)):
        raise RequestError(400, f"session_id must be 1-64 letters, digits, '_' or '-', got {session_id!r}",
                           param="session_id")
    return ChatParams(clean, _number(body, "max_tokens", *MAX_TOKENS_RANGE, defaults["max_tokens"], integer=True),
                      temperature, _number(body, "top_k", *TOP_K_RANGE, defaults["top_k"], integer=True), seed,
                      session_id)


def too_long(detail):
    return RequestError(400, f"the conversation is too long for the model's context ({detail}). "
                             f"Start a new chat or send shorter messages.", param="messages",
                        code="context_length_exceeded")


def overloaded(message, code):
    return RequestError(503, f"{message}; retry in a few seconds", code=code, kind="overloaded_error",
                        headers={"Retry-After": str(RETRY_AFTER)})


async def start_generation(pool, params, deadline=None) -> tuple:
    """Acquire a worker, start generating, wait for prefill. -> (generation, prompt_tokens).
    The reply is limited to the context left after the prompt: max_tokens = min(requested,
    sequence_len - prompt_tokens), finish_reason "length" when it runs out. A prompt that leaves no
    room (or any ContextTooLongError of the Engine) -> RequestError 400 before any response is sent.
    A full waiting line, or a deadline (time.monotonic()) that passes while waiting -> 503 + Retry-After."""
    try:  # the conversation primed for the assistant's reply; the tokenizer checks the role order
        prompt = pool.workers[0].tokenizer.render_for_completion({"messages": params.messages})
    except ValueError as e:
        raise RequestError(400, f"bad conversation: {e}", param="messages") from e
    # the model's context (GPTConfig.sequence_len), when the worker's engine exposes its model and has one
    engine = pool.workers[0].engine
    limit = None if getattr(engine, "unbounded", False) else \
        getattr(getattr(getattr(engine, "model", None), "config", None), "sequence_len", None)
    if limit is not None:
        if len(prompt) >= limit:
            raise too_long(f"{len(prompt)} prompt tokens, the context holds {limit} tokens including the reply")
        params = replace(params, max_tokens=min(params.max_tokens, limit - len(prompt)))
    sid = params.session_id
    if sid is not None:
        if not getattr(engine, "store", None):
            raise RequestError(400, "session_id needs a server that saves conversations: start it with --mc "
                                    "--session_dir DIR", param="session_id")
        if sid in pool.busy:
            raise RequestError(409, f"session {sid} is answering another request; send this one when that reply "
                                    f"has ended", param="session_id")
        pool.busy.add(sid)  # released by the generation thread when it ends
    try:
        worker = await pool.acquire(None if deadline is None else deadline - time.monotonic())
    except (QueueFull, QueueTimeout, asyncio.CancelledError) as e:
        pool.busy.discard(sid)
        if isinstance(e, QueueFull):
            raise overloaded(f"the server is busy: {e}", "queue_full") from None
        if isinstance(e, QueueTimeout):
            raise overloaded("no worker became free before the request timeout (--request_timeout)", "timeout") from None
        raise
    gen = Generation(pool, worker, prompt, params, deadline)
    try:
        first = await gen.events.get()
    except BaseException:  # request cancelled while waiting for prefill: stop the thread
        gen.cancel.set()
        raise
    if first[0] != "started":
        raise too_long(first[1]) if first[0] == "too_long" else RequestError(500, first[1], kind="server_error")
    return gen, len(prompt)


async def iterate(gen):
    """Async iterator over ("text", s) events; ends with the ("end", ...) or ("error", ...) event.
    Leaving early (client gone) tells the thread to stop, which then frees the worker."""
    try:
        while True:
            event = await gen.events.get()
            yield event
            if event[0] in ("end", "error", "too_long"):
                return
    finally:
        gen.cancel.set()


# ----------------------------------------------------------------------------- the app
def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _GenerationStream(StreamingResponse):
    """An SSE response that stops its generation however it ends: a client that hangs up before the
    first chunk is pulled never runs the body iterator's own cleanup."""

    def __init__(self, body, gen):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.cancel.set()


def create_app(workers, model_id="nanochat", defaults=None, *, max_queue=MAX_QUEUE, request_timeout=REQUEST_TIMEOUT,
               api_key=None, allowed_hosts=wg.LOCAL_HOSTS) -> FastAPI:
    """The FastAPI app over a list of Workers (tests pass tiny in-memory models here).
    max_queue: requests that may wait for a busy worker (None = unbounded); request_timeout: seconds from
    a parsed request to its last token (None/0 = none); api_key: required as 'Bearer <key>' on everything
    but the page and /health; allowed_hosts: Host names served (web_guard.allowed_hosts; None = any)."""
    defaults = {"temperature": 0.8, "top_k": 50, "max_tokens": 512, **(defaults or {})}
    pool = WorkerPool(workers, max_waiting=max_queue)
    with open(UI_PATH, encoding="utf-8") as f:
        ui_html = f.read()

    async def guard(request: Request):
        host = request.headers.get("host")
        wg.check_host(host, allowed_hosts)
        wg.check_origin(request.headers.get("origin"), host, allowed_hosts)
        if request.url.path not in OPEN_PATHS:
            wg.check_api_key(request.headers.get("authorization"), api_key)
        if request.method == "POST":  # the size first: a huge declared body is refused before all else
            wg.check_content_length(request.headers.get("content-length"), MAX_BODY_BYTES)
            wg.check_content_type(request.headers.get("content-type"))

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(guard)])
    app.state.pool = pool  # the tests look at its busy conversations

    def error_response(request, status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        openai_shape = request.url.path.startswith("/v1/")
        body = {"message": message, "type": kind, "param": param, "code": code}
        return JSONResponse({"error": body} if openai_shape else {"error": message, "param": param, "code": code},
                            status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error_response(request, exc.status, exc.message, exc.param, exc.code, exc.kind, exc.headers)

    @app.exception_handler(wg.ClientGone)
    async def _client_gone(request, exc):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the log shows it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request, exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                              kind=kind)

    async def read_json(request):
        try:
            raw = await asyncio.wait_for(wg.read_body(request.stream(), MAX_BODY_BYTES), BODY_TIMEOUT)
        except ClientDisconnect:
            raise wg.ClientGone() from None
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {BODY_TIMEOUT:.0f} s") from None
        return wg.parse_json(raw, MAX_JSON_DEPTH)

    def deadline():
        return time.monotonic() + request_timeout if request_timeout else None

    def log(params, prompt_tokens, n, t0, finish=""):
        dt = time.perf_counter() - t0
        print(f"[chat_web] {len(params.messages)} messages, prompt {prompt_tokens} tokens -> {n} tokens "
              f"in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s){' [timeout]' if finish == 'timeout' else ''}",
              flush=True)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "workers": len(pool.workers), "available": pool.available()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat(request: Request):
        params = parse_chat_request(await read_json(request), defaults)
        t0 = time.perf_counter()
        gen, prompt_tokens = await wg.until_disconnected(request.receive, start_generation(pool, params, deadline()))

        async def stream():
            async for event in iterate(gen):
                if event[0] == "text":
                    yield _sse({"token": event[1]})
                elif event[0] == "end":
                    log(params, prompt_tokens, event[2], t0, event[1])
                    yield _sse({"done": True, "finish_reason": event[1], "usage": _usage(prompt_tokens, event[2])})
                else:
                    yield _sse({"error": event[1]})
        return _GenerationStream(stream(), gen)

    @app.post("/v1/chat/completions")
    async def chat_openai(request: Request):
        body = await read_json(request)
        params = parse_chat_request(body, defaults, openai=True)
        stream_flag = body.get("stream", False)
        if not isinstance(stream_flag, bool):
            raise RequestError(400, f"stream must be true or false, got {stream_flag!r}", param="stream")
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage") is True
        t0 = time.perf_counter()
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta, finish=None):
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        async def whole_reply():
            gen, prompt_tokens = await start_generation(pool, params, deadline())
            parts = []
            async for event in iterate(gen):
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "end":
                    finish, n = event[1], event[2]
                else:
                    raise RequestError(500, event[1], kind="server_error")
            log(params, prompt_tokens, n, t0, finish)
            message = {"role": "assistant", "content": "".join(parts)}
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                    "usage": _usage(prompt_tokens, n)}

        if not stream_flag:  # nothing is sent until the end, so only this watch notices a client that left
            return await wg.until_disconnected(request.receive, whole_reply())
        gen, prompt_tokens = await wg.until_disconnected(request.receive, start_generation(pool, params, deadline()))

        async def stream():
            yield _sse(chunk({"role": "assistant", "content": ""}))
            async for event in iterate(gen):
                if event[0] == "text":
                    yield _sse(chunk({"content": event[1]}))
                elif event[0] == "end":
                    log(params, prompt_tokens, event[2], t0, event[1])
                    yield _sse(chunk({}, finish=event[1]))
                    if include_usage:
                        yield _sse({**chunk({}), "choices": [], "usage": _usage(prompt_tokens, event[2])})
                else:
                    yield _sse({"error": {"message": event[1], "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"
        return _GenerationStream(stream(), gen)

    return app


# ----------------------------------------------------------------------------- command line
def load_workers(source, model_tag, step, device_type, num_gpus, mc=False, mc_kwargs=None, session_dir=""):
    """One Worker per device with the checkpoint loaded; -> (workers, model_id). mc: MCEngine workers
    (a fresh MegaContext session per request); mc_kwargs: MCSession settings (W, refocus_interval);
    session_dir: requests with a session_id continue and save that conversation there (mc/infer/store.py)."""
    if device_type == "cuda" and num_gpus > torch.cuda.device_count():
        die(f"--num_gpus={num_gpus} but only {torch.cuda.device_count()} CUDA device(s) are visible; lower --num_gpus")
    if device_type != "cuda" and num_gpus != 1:
        die(f"--num_gpus={num_gpus} needs --device_type=cuda; on {device_type} the server runs one worker")
    devices = [f"cuda:{i}" for i in range(num_gpus)] if device_type == "cuda" else [device_type]
    root = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    model_tag = model_tag or find_last_model_tag(root)
    if step is None:
        step = latest_step(tag_dir(root, model_tag, "-g/--model_tag"))
        if step is None:
            die(f"no complete checkpoint in {os.path.join(root, model_tag)}; train one first or pick another -g/-s")
    workers = []
    for device in devices:
        model, tokenizer, meta = load_model(source, device, "eval", model_tag=model_tag, step=step)
        saved = dict(store=SessionStore(session_dir), checkpoint=checkpoint_identity(meta)) if session_dir else {}
        # MCEngine refuses a vanilla checkpoint with the fix (MCSessionError, a ValueError: main() dies with it)
        engine = MCEngine(model, tokenizer, reuse_session=False, **saved, **(mc_kwargs or {})) if mc else \
            Engine(model, tokenizer)
        workers.append(Worker(engine, tokenizer, device, name=device))
    return workers, f"nanochat-{source}-{model_tag}-step{step}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Web chat + OpenAI-compatible API for a nanochat model",
                                     allow_abbrev=False)
    parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint stage")
    parser.add_argument("-g", "--model_tag", type=ck.model_tag, default=None, help="model tag (default: most recent)")
    parser.add_argument("-s", "--step", type=ck.nonneg_int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--num_gpus", type=ck.positive_int, default=1, help="workers = models, one per GPU")
    parser.add_argument("--device_type", default="", choices=["", "cuda", "cpu", "mps"], help="default: autodetect")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to serve the network)")
    parser.add_argument("--port", type=ck.port, default=8000)
    parser.add_argument("--temperature", type=ck.temperature, default=0.8, help="default when a request sets none")
    parser.add_argument("--top_k", type=ck.top_k, default=50, help="default when a request sets none")
    parser.add_argument("--max_tokens", type=ck.positive_int, default=512, help="default when a request sets none")
    parser.add_argument("--mc", action="store_true", help="MegaContext session per request (an MC checkpoint)")
    parser.add_argument("--max_queue", type=ck.nonneg_int, default=MAX_QUEUE,
                        help="requests that may wait for a busy worker; more get 503 + Retry-After")
    parser.add_argument("--request_timeout", type=ck.nonneg_float, default=REQUEST_TIMEOUT,
                        help="seconds per request, queue wait included (0 = none): a reply still being "
                             "written then ends with finish_reason 'timeout'")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV}; none = open)")
    parser.add_argument("--allowed_hosts", default="",
                        help="comma-separated extra Host names/addresses to answer besides localhost and --host "
                             "(e.g. the machine's LAN name under --host 0.0.0.0); '*' = any")
    parser.add_argument("--session_dir", default="", help="--mc: save conversations under this folder; requests "
                        "with a session_id continue and save theirs (kill -9 safe)")
    add_session_flags(parser)  # --mc_infer_wc_length, --mc_infer_refocus_interval, --mc_infer_focus, --mc_infer_max_lod,
    #                            --mc_tree
    args = parser.parse_args(argv)
    if not args.mc and (given_session_flags(args) or args.session_dir):
        die(f"{' / '.join(given_session_flags(args) + (['--session_dir'] if args.session_dir else []))} only apply "
            f"with --mc")
    for name, (lo, hi) in (("temperature", TEMPERATURE_RANGE), ("top_k", TOP_K_RANGE), ("max_tokens", MAX_TOKENS_RANGE)):
        if not lo <= getattr(args, name) <= hi:
            die(f"--{name}={getattr(args, name)} is outside the allowed range [{lo}, {hi}]")
    if 0 < args.temperature < MIN_TEMPERATURE:
        die(f"--temperature={args.temperature}: use 0 (greedy) or at least {MIN_TEMPERATURE}")
    if args.num_gpus < 1:
        die(f"--num_gpus must be at least 1, got {args.num_gpus}")
    try:
        hosts = wg.allowed_hosts(args.host, args.allowed_hosts.split(","))
    except ValueError as e:
        die(f"--allowed_hosts / --host: {e}")
    device_type = args.device_type or autodetect_device_type()
    try:
        workers, model_id = load_workers(args.source, args.model_tag, args.step, device_type, args.num_gpus,
                                         mc=args.mc, mc_kwargs=session_overrides(args), session_dir=args.session_dir)
    except (RuntimeError, ValueError, OSError) as e:  # CheckpointError / TokenizerError say the fix
        die(str(e))
    defaults = {"temperature": args.temperature, "top_k": args.top_k, "max_tokens": args.max_tokens}
    app = create_app(workers, model_id=model_id, defaults=defaults, max_queue=args.max_queue,
                     request_timeout=args.request_timeout, api_key=args.api_key, allowed_hosts=hosts)
    # uvicorn only to serve: the tests build and drive the app without it
    import uvicorn

    print(f"serving {model_id} on {len(workers)} worker(s): http://{args.host}:{args.port}/ "
          f"(API key {'required' if args.api_key else 'off'}; Host names: "
          f"{'any' if hosts is None else ', '.join(sorted(hosts))})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
