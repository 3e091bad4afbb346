"""
Reliability fuzz of the chat server. Builds a tiny CPU checkpoint in a temporary $NANOCHAT_BASE_DIR, starts
`python -m scripts.chat_web` on 127.0.0.1 with an API key, --max_queue 4 and --request_timeout 30, then:

1. --requests random cases from 4 threads, each knowing the statuses it may get: valid chats (both endpoints,
   streamed or not) and malformed ones (random bytes, truncated JSON, deep nesting, NaN/Infinity, huge numbers,
   tiny temperatures, wrong types, lone surrogates, over-limit conversations, wrong content types, bodies over
   1 MB declared or chunked, missing/wrong keys, foreign Hosts and Origins, wrong methods and paths);
2. abandonment: a non-streamed and a streamed reply left after 0.5 s (worker free within 1 s of the client
   leaving), then ten clients that leave after 0.5 s and one that stays (it must not wait for the ten);
3. a flood of 40 concurrent chats (200 or 503 + Retry-After), and a full line (503);
4. a --big_mb MB POST from a generator (neither side holds it), chunked and with Content-Length: 413, and the
   server's peak RSS (sampled every 5 ms) grows < 10 MB.

Prints counts per status code and per case kind plus the measurements. Exit code 1 on any 5xx (but the
flood's 503s), hang (no answer within --timeout), unexpected status, dead server or failed measurement.

    python -m scripts.web_fuzz                       # ~1,060 requests, about a minute on 2 CPU cores
    python -m scripts.web_fuzz --requests 3000 --seed 7 --big_mb 100
"""

import argparse
import collections
import itertools
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import psutil
import torch

from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.synthetic import synthetic_texts
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "fuzz"
MAX_QUEUE = 4
CLIENT_THREADS = 4         # <= MAX_QUEUE: the random phase alone never fills the line
ABANDON_FREE_LIMIT = 1.0   # seconds from a client leaving to its worker being free
RSS_LIMIT_MB = 10.0
LONG = 2000                # max_tokens of a reply meant to outlast its client (2-3 ms a token here)
WORDS = "the blue vault Marta Quill lives near river north of seven gardens and a quiet harbor".split()


# ----------------------------------------------------------------------------- the tiny server
def build_checkpoint(base_dir):
    """A 512-id tokenizer and an untrained 4-layer GPT whose head only writes printable tokens, so replies
    run to max_tokens instead of stopping at once (slow enough to abandon, fast enough to flood)."""
    tok = RustBPETokenizer.train_from_iterator(itertools.islice(synthetic_texts(), 10), 512, pad_vocab=True)
    tok.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=2304, vocab_size=tok.get_vocab_size(), n_layer=4, n_head=2, n_kv_head=2, n_embd=128)
    model = GPT(cfg)
    model.init_weights()
    n_bpe = tok.get_vocab_size() - len(SPECIAL_TOKENS) - tok.num_reserved

    def printable(i):
        try:
            return i < n_bpe and tok.enc.decode_single_token_bytes(i).decode("utf-8").isprintable()
        except UnicodeDecodeError:
            return False

    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 3.0)
        model.lm_head.weight[[i for i in range(cfg.vocab_size) if not printable(i)]] = 0.0
    meta = {"model_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", TAG), 1, model.state_dict(), None, meta)


def start_server(base_dir, key, log):
    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, NANOCHAT_API_KEY=key, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "scripts.chat_web", "-i", "sft", "-g", TAG, "--device_type", "cpu",
           "--port", str(port), "--max_queue", str(MAX_QUEUE), "--request_timeout", "30", "--max_tokens", "8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"chat_web exited with code {proc.returncode} before serving")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("chat_web did not answer /health within 180 s")
        time.sleep(0.2)


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    kind: str
    expect: set
    path: str = "/v1/chat/completions"
    method: str = "POST"
    body: object = None            # bytes, or a zero-argument function returning an iterator of bytes
    headers: dict = field(default_factory=dict)
    stream: bool = False           # read the reply as Server-Sent Events


class Cases:
    """Random request cases; each kind is a method returning a Case with the statuses it may get."""

    def __init__(self, rng, key):
        self.rng, self.key = rng, key
        self.kinds = [m[5:] for m in dir(self) if m.startswith("kind_")]

    def headers(self, **extra):
        h = {"content-type": "application/json", "authorization": f"Bearer {self.key}"}
        h.update(extra)
        return {k: v for k, v in h.items() if v is not None}

    def text(self, n=None):
        return " ".join(self.rng.choice(WORDS) for _ in range(n or self.rng.randint(1, 12)))

    def chat(self, **extra):
        return {"messages": [{"role": "user", "content": self.text()}], "max_tokens": self.rng.randint(1, 4), **extra}

    def case(self, kind, body, expect, **kw):
        raw = body if isinstance(body, bytes) or callable(body) else json.dumps(body).encode()
        return Case(kind, set(expect), body=raw, **{"headers": self.headers(), **kw})

    def random(self):
        return getattr(self, "kind_" + self.rng.choice(self.kinds))()

    # valid requests
    def kind_valid_v1(self):
        stream = self.rng.random() < 0.5
        return self.case("valid_v1", self.chat(stream=stream, temperature=self.rng.choice([0, 0.5, 1.0])), {200},
                         stream=stream)

    def kind_valid_nanochat(self):
        return self.case("valid_nanochat", self.chat(top_k=self.rng.randint(1, 200)), {200},
                         path="/chat/completions", stream=True)

    def kind_unicode(self):  # random code points (no surrogates): a reply, or a 400 if it is all whitespace
        text = "".join(chr(self.rng.choice([self.rng.randint(32, 0xD7FF), self.rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(self.rng.randint(1, 40)))
        return self.case("unicode", {"messages": [{"role": "user", "content": text}], "max_tokens": 2}, {200, 400})

    # malformed bodies
    def kind_random_bytes(self):
        return self.case("random_bytes", self.rng.randbytes(self.rng.randint(0, 2000)), {400})

    def kind_truncated(self):
        raw = json.dumps(self.chat()).encode()
        return self.case("truncated", raw[:self.rng.randint(0, len(raw) - 1)], {400})

    def kind_deep(self):
        depth = self.rng.choice([33, 100, 999, 1000, 5000, 100_000])
        opener, closer = self.rng.choice([("[", "]"), ('{"a":', "}")])
        raw = '{"messages": [{"role": "user", "content": "hi"}], "x": ' + opener * depth + "1" + closer * depth + "}"
        if self.rng.random() < 0.3:
            raw = raw[:-depth // 2]  # unbalanced too
        return self.case("deep", raw.encode(), {400})

    def kind_constants(self):
        value = self.rng.choice(["NaN", "Infinity", "-Infinity"])
        name = self.rng.choice(["temperature", "top_k", "max_tokens", "seed"])
        raw = json.dumps(self.chat())[:-1] + f', "{name}": {value}}}'
        return self.case("constants", raw.encode(), {400})

    def kind_huge_number(self):
        name = self.rng.choice(["temperature", "top_k", "max_tokens", "seed"])
        value = self.rng.choice(["1e400", "-1e400", "1e308", "-5", str(2 ** 64), "9" * 5000, "2.5", "-0.0001"])
        raw = json.dumps(self.chat())[:-1] + f', "{name}": {value}}}'
        return self.case("huge_number", raw.encode(), {400})

    def kind_tiny_temperature(self):
        return self.case("tiny_temperature", self.chat(temperature=self.rng.choice([1e-45, 5e-324, 1e-9, 0.009])), {400})

    def kind_wrong_type(self):
        name, bad = self.rng.choice([
            ("messages", "hi"), ("messages", 5), ("messages", {}), ("messages", [5]), ("messages", [None]),
            ("messages", [{"role": "user"}]), ("messages", [{"role": "bot", "content": "x"}]),
            ("messages", [{"role": "user", "content": ""}]), ("messages", [{"role": "user", "content": [1]}]),
            ("messages", [{"role": ["user"], "content": "x"}]), ("temperature", "hot"), ("temperature", True),
            ("temperature", []), ("top_k", {}), ("top_k", 2.5), ("max_tokens", "8"), ("max_tokens", [8]),
            ("seed", "x"), ("seed", -1), ("stream", "yes"), ("stream", 1), ("n", 2), ("n", "1")])
        body = self.chat()
        body[name] = bad
        if self.rng.random() < 0.2:
            body = self.rng.choice([[body], "text", 42, None])
        return self.case("wrong_type", body, {400})

    def kind_surrogate(self):
        raw = '{"messages": [{"role": "user", "content": "a\\ud800b"}]}'
        return self.case("surrogate", raw.encode(), {400})

    def kind_over_limits(self):
        roles = ["user", "assistant"]
        body = self.rng.choice([
            {"messages": [{"role": roles[i % 2], "content": "x"} for i in range(501)]},
            {"messages": [{"role": "user", "content": "x" * 8001}]},
            {"messages": [{"role": roles[i % 2], "content": "y" * 7000} for i in range(5)]},
            {"messages": []}])
        return self.case("over_limits", body, {400})

    def kind_content_type(self):
        ctype = self.rng.choice(["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/xml", None])
        return self.case("content_type", self.chat(), {415}, headers=self.headers(**{"content-type": ctype}))

    def kind_oversized(self):
        size = self.rng.randint(1_000_001, 3_000_000)
        if self.rng.random() < 0.5:
            return self.case("oversized", b" " * size, {413})

        def chunks(chunk=1 << 16):
            for i in range(0, size, chunk):
                yield b" " * min(chunk, size - i)
        return self.case("oversized", chunks, {413})

    def kind_auth(self):
        auth = self.rng.choice([None, "Bearer", "Bearer wrong", f"Basic {self.key}", self.key, f"Bearer {self.key}x"])
        path = self.rng.choice(["/v1/chat/completions", "/chat/completions"])
        return self.case("auth", self.chat(), {401}, path=path, headers=self.headers(authorization=auth))

    def kind_host(self):
        host = self.rng.choice(["evil.example", "evil.example:8000", "127.0.0.2", "localhost.evil.example", "0.0.0.0",
                                "[::2]:80", "a:b:c"])
        return self.case("host", self.chat(), {400}, headers=self.headers(host=host))

    def kind_origin(self):
        origin = self.rng.choice(["https://evil.example", "null", "http://127.0.0.1.evil.example", "http://[::1"])
        return self.case("origin", self.chat(), {403}, headers=self.headers(origin=origin))

    def kind_method_path(self):
        return self.rng.choice([
            Case("method_path", {405}, method="GET", headers=self.headers()),
            Case("method_path", {404}, path="/v1/nope", headers=self.headers()),
            Case("method_path", {405}, path="/health", method="POST", body=b"{}", headers=self.headers())])


# ----------------------------------------------------------------------------- sending
def send(client, case):
    """-> (status or 'hang' / 'error:<type>' / 'broken_stream', response headers). A 200 stream must end
    in `data: [DONE]` (OpenAI) or a done event (nanochat)."""
    body = case.body() if callable(case.body) else case.body
    headers = {}
    try:
        with client.stream(case.method, case.path, headers=case.headers, content=body) as r:
            text = r.read().decode("utf-8")
        status, headers = r.status_code, r.headers
        if status == 200 and case.stream:
            last = [line for line in text.splitlines() if line.startswith("data: ")][-1:]
            if not last or (last[0] != "data: [DONE]" and '"done": true' not in last[0]):
                status = "broken_stream"
    except httpx.TimeoutException:
        status = "hang"
    except httpx.HTTPError as e:
        status = f"error:{type(e).__name__}"
    return status, headers


class Tally:
    def __init__(self):
        self.by_status, self.by_kind, self.problems, self.lock = collections.Counter(), {}, [], threading.Lock()
        self.abandoned = 0  # requests whose client left on purpose: no status to count

    def add(self, case, status, allowed=None):
        with self.lock:
            self.by_status[status] += 1
            self.by_kind.setdefault(case.kind, collections.Counter())[status] += 1
            if status not in (allowed or case.expect):
                self.problems.append(f"{case.kind}: {case.method} {case.path} got {status}, expected "
                                     f"{sorted(allowed or case.expect)}")

    def fail(self, message):
        with self.lock:
            self.problems.append(message)


def wait_free(url, limit):
    """The time.perf_counter() at which /health first shows the worker free, or None after `limit` s."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if httpx.get(url + "/health", timeout=5).json()["available"] == 1:
            return time.perf_counter()
        time.sleep(0.005)
    return None


def abandon(url, key, stream, after=0.5):
    """Ask for a long reply and hang up after `after` seconds; -> the moment it hung up."""
    body = {"messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": LONG, "stream": stream}
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=after)) as c:
        try:
            with c.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                if stream:
                    t_end = time.perf_counter() + after
                    for _ in r.iter_raw():
                        if time.perf_counter() > t_end:
                            break
                else:
                    r.read()
        except httpx.ReadTimeout:
            pass
    return time.perf_counter()


def peak_rss_growth(pid, action):
    """Run action() while sampling the process's RSS every 5 ms; -> (action's result, peak - start in MB)."""
    proc, peak, stop = psutil.Process(pid), [0], threading.Event()
    start = proc.memory_info().rss

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        result = action()
    finally:
        time.sleep(0.05)
        stop.set()
        t.join()
    return result, max(0, peak[0] - start) / 1e6


# ----------------------------------------------------------------------------- the run
def phase_random(args, url, cases, tally, report):
    batch = [cases.random() for _ in range(args.requests)]

    def one(case):
        with httpx.Client(base_url=url, timeout=args.timeout) as client:
            tally.add(case, send(client, case)[0])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(one, batch))
    report.append(f"random cases: {len(batch)} in {time.perf_counter() - t0:.1f} s")
    if wait_free(url, 30) is None:
        tally.fail("the worker was still busy 30 s after the random cases")


def phase_abandon(args, url, key, cases, tally, report):
    for stream in (False, True):
        left = abandon(url, key, stream)
        freed = wait_free(url, 10)
        took, kind = None if freed is None else freed - left, "streamed" if stream else "non-streamed"
        tally.abandoned += 1
        if took is None or took > ABANDON_FREE_LIMIT:
            tally.fail(f"abandoned {kind} reply: worker free after {took} s (limit {ABANDON_FREE_LIMIT} s)")
        report.append(f"abandoned {kind} reply: worker free {took:.3f} s after the client left"
                      if took is not None else f"abandoned {kind} reply: worker never freed")
    with ThreadPoolExecutor(10) as pool:
        tally.abandoned += len(list(pool.map(lambda _: abandon(url, key, False), range(10))))
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=args.timeout) as client:
        stay = cases.case("after_abandon", cases.chat(), {200})
        status = send(client, stay)[0]
    waited = time.perf_counter() - t0
    tally.add(stay, status)
    report.append(f"10 clients left after 0.5 s, then a staying client was answered ({status}) in {waited:.2f} s")
    if waited > 5:
        tally.fail(f"after 10 abandoned requests the next one waited {waited:.1f} s")


def phase_flood(args, url, key, cases, tally, report):
    rng = random.Random(args.seed + 1)
    flood = [cases.case("flood", {**cases.chat(), "max_tokens": rng.randint(16, 64)}, {200, 503})
             for _ in range(40)]
    no_retry_after = []

    def flood_one(case):
        with httpx.Client(base_url=url, timeout=args.timeout) as client:
            status, headers = send(client, case)
        if status == 503 and not headers.get("retry-after", "").isdigit():
            no_retry_after.append(case)
        tally.add(case, status)
        return status

    with ThreadPoolExecutor(40) as pool:
        statuses = collections.Counter(pool.map(flood_one, flood))
    # one reply running and MAX_QUEUE waiting (all hang up after 3 s): the line is full in between
    holders = [threading.Thread(target=abandon, args=(url, key, False, 3.0)) for _ in range(MAX_QUEUE + 1)]
    for h in holders:
        h.start()
    time.sleep(1.0)
    r = httpx.post(url + "/v1/chat/completions", json=cases.chat(), headers=cases.headers(), timeout=args.timeout)
    for h in holders:
        h.join()
    tally.abandoned += len(holders)
    tally.add(Case("queue_full", {503}), r.status_code)
    if no_retry_after or (r.status_code == 503 and not r.headers.get("retry-after", "").isdigit()):
        tally.fail("a 503 came without a Retry-After header")
    if wait_free(url, 30) is None:
        tally.fail("the worker was still busy 30 s after the flood")
    report.append(f"flood of 40 concurrent chats: {dict(sorted(statuses.items(), key=str))}; "
                  f"a full line answered {r.status_code} Retry-After {r.headers.get('retry-after')}")


def phase_huge_post(args, url, proc, cases, tally, report):
    """The body comes from a generator: neither side ever holds it."""
    size = args.big_mb * 1_000_000
    for declared in (False, True):
        sent = [0]

        def chunks(chunk=1 << 16):
            block = b" " * chunk
            while sent[0] < size:
                sent[0] += chunk
                yield block

        case = Case("huge_post", {413}, body=chunks,
                    headers=cases.headers(**({"content-length": str(size)} if declared else {})))

        def post(case=case):
            with httpx.Client(base_url=url, timeout=args.timeout) as client:
                return send(client, case)[0]

        status, grew = peak_rss_growth(proc.pid, post)
        tally.add(case, status)
        how = "Content-Length" if declared else "chunked"
        report.append(f"{args.big_mb} MB POST ({how}): {status}, client sent {sent[0] / 1e6:.1f} MB, "
                      f"server peak RSS +{grew:.1f} MB (limit {RSS_LIMIT_MB:.0f} MB)")
        if grew >= RSS_LIMIT_MB:
            tally.fail(f"{how} {args.big_mb} MB POST grew the server's RSS by {grew:.1f} MB")


def run(args, url, proc, key):
    tally, report, cases = Tally(), [], Cases(random.Random(args.seed), key)
    t0 = time.perf_counter()
    phase_random(args, url, cases, tally, report)
    phase_abandon(args, url, key, cases, tally, report)
    phase_flood(args, url, key, cases, tally, report)
    phase_huge_post(args, url, proc, cases, tally, report)
    if proc.poll() is not None:
        tally.fail(f"chat_web died (exit code {proc.returncode})")
    elif httpx.get(url + "/health", timeout=5).status_code != 200:
        tally.fail("chat_web stopped answering /health")
    return tally, report, time.perf_counter() - t0


def summarize(tally, report, seconds):
    total = sum(tally.by_status.values())
    five = sum(n for s, n in tally.by_status.items() if isinstance(s, int) and s >= 500)
    flood_503 = tally.by_kind.get("flood", {}).get(503, 0) + tally.by_kind.get("queue_full", {}).get(503, 0)
    hangs = sum(n for s, n in tally.by_status.items() if s == "hang")
    print(f"\nweb_fuzz: {total + tally.abandoned} requests in {seconds:.1f} s ({tally.abandoned} abandoned on purpose)")
    print("by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(tally.by_status.items(), key=lambda x: str(x[0]))))
    for kind, counts in sorted(tally.by_kind.items()):
        print(f"  {kind:18s} " + ", ".join(f"{s}: {n}" for s, n in sorted(counts.items(), key=lambda x: str(x[0]))))
    for line in report:
        print("- " + line)
    print(f"5xx: {five} ({flood_503} of them load-shedding 503s under a flood), hangs: {hangs}, "
          f"problems: {len(tally.problems)}")
    for p in tally.problems[:30]:
        print("  PROBLEM " + p)
    print("FAIL" if tally.problems else "PASS")
    return 1 if tally.problems else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Reliability fuzz of scripts.chat_web against a tiny model",
                                     allow_abbrev=False)
    parser.add_argument("--requests", type=ck.positive_int, default=1000, help="random cases (phase 1)")
    parser.add_argument("--seed", type=ck.nonneg_int, default=0, help="seed of the random cases")
    parser.add_argument("--timeout", type=ck.positive_float, default=60.0,
                        help="seconds without an answer that count as a hang")
    parser.add_argument("--big_mb", type=ck.positive_int, default=300, help="size of the huge POST (MB)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoint dir and server log")
    args = parser.parse_args(argv)
    base_dir = tempfile.mkdtemp(prefix="web_fuzz_")
    key = secrets.token_urlsafe(16)
    log_path = os.path.join(base_dir, "chat_web.log")
    print(f"building a tiny checkpoint in {base_dir} ...", flush=True)
    build_checkpoint(base_dir)
    with open(log_path, "wb") as log:
        proc, url = start_server(base_dir, key, log)
        print(f"chat_web pid {proc.pid} at {url}; fuzzing ...", flush=True)
        try:
            code = summarize(*run(args, url, proc, key))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    if code:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            tail = [line for line in f.read().splitlines() if "Traceback" in line or "Error" in line][-20:]
        print("server log (errors):\n" + "\n".join(tail))
    if args.keep:
        print(f"kept {base_dir}")
    else:
        shutil.rmtree(base_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
