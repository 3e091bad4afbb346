"""Tests for nanochat/engine.py: greedy parity with GPT.generate and a naive full-forward loop, KV-cache
growth, batched sampling with independent first tokens, the calculator tool state machine (scripted fake
model), the safe calculator, and the context-length error; MCEngine (MegaContext session) with the same
contract: greedy parity with a hand-driven MCSession, prompts far past the context, one session across
turns, the calculator's forced tokens in the session's history, and its errors."""

import itertools
import time
from dataclasses import dataclass

import pytest
import torch

import mc.infer.engine as mc_engine_module
import nanochat.engine as engine_module
from mc.infer.engine import MCEngine
from nanochat.engine import (
    CalculatorError,
    CalculatorTimeout,
    ContextTooLongError,
    Engine,
    evaluate_expression,
    use_calculator,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache
from nanochat.synthetic import synthetic_texts
from nanochat.tokenizer import RustBPETokenizer


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(itertools.islice(synthetic_texts(), 20), 300, pad_vocab=True)


def make_model(tok, seq_len=96, seed=0):
    """Tiny GPT with every path non-zero (attention matters, so a wrong cache changes the output)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=seq_len, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=4,
                          n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.5)
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
    return model.eval()


def prompt_ids(tok, text="Hello there, how many r in strawberry?"):
    return tok.render_for_completion({"messages": [{"role": "user", "content": text}]})


def naive_greedy(model, tokens, n, stop):
    """Full forward over the whole sequence each step; argmax of the last position."""
    seq = list(tokens)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(torch.tensor([seq]))[0, -1].argmax().item()
            if nxt in stop:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_greedy_matches_gpt_generate_and_naive_loop(tok):
    model = make_model(tok)
    eng = Engine(model, tok)
    p = prompt_ids(tok)
    n = 30
    results, masks = eng.generate_batch(p, num_samples=3, max_tokens=n, temperature=0.0)
    ref = naive_greedy(model, p, n, eng.stop_tokens)
    assert len(ref) > 5  # the comparison covers real decoding steps
    from_gpt = list(itertools.islice(model.generate(p, n, temperature=0.0), len(ref)))
    assert from_gpt == ref
    for r, m in zip(results, masks):  # every sample of a greedy batch equals the single-sequence answer
        assert r[: len(p)] == p and r[len(p):] == ref
        assert m == [0] * len(p) + [1] * len(ref)


def test_kv_cache_grows_past_first_allocation(tok, monkeypatch):
    grows = []

    class CountingCache(KVCache):
        def _grow(self, needed):
            grows.append((self.capacity, needed))
            super()._grow(needed)

    monkeypatch.setattr(engine_module, "KVCache", CountingCache)
    model = make_model(tok, seq_len=128)
    eng = Engine(model, tok)
    eng.decode_room = 4  # decode cache starts with room for only 4 tokens past the prompt
    eng.stop_tokens = set()  # never stop early: decode the full length
    p = prompt_ids(tok, "hi")
    n = 40
    results, _ = eng.generate_batch(p, num_samples=2, max_tokens=n, temperature=0.0)
    assert grows, "the decode cache never had to grow"
    seq = list(p)
    with torch.no_grad():
        for _ in range(n):
            seq.append(model(torch.tensor([seq]))[0, -1].argmax().item())
    assert results[0] == seq and results[1] == seq


def test_first_tokens_independent_and_sampling_reproducible(tok):
    model = make_model(tok)
    with torch.no_grad():
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # a broad next-token distribution
    eng = Engine(model, tok)
    p = prompt_ids(tok)
    first_col, first_mask = next(eng.generate(p, num_samples=16, max_tokens=5, temperature=1.0, seed=1))
    assert len(first_col) == 16 and first_mask == [1] * 16
    assert len(set(first_col)) > 1, "all samples got the same first token: it was sampled once and broadcast"
    a = eng.generate_batch(p, num_samples=4, max_tokens=12, temperature=0.8, top_k=20, seed=7)
    b = eng.generate_batch(p, num_samples=4, max_tokens=12, temperature=0.8, top_k=20, seed=7)
    assert a == b
    # top_k=1 is greedy whatever the temperature
    g, _ = eng.generate_batch(p, num_samples=2, max_tokens=10, temperature=0.0)
    k1, _ = eng.generate_batch(p, num_samples=2, max_tokens=10, temperature=1.5, top_k=1)
    assert g == k1


# ---------------------------------------------------------------------------------------------------
# tool use, with a model whose next token is scripted by position


@dataclass
class _Cfg:
    sequence_len: int
    vocab_size: int
    n_layer: int = 1
    n_head: int = 1
    n_kv_head: int = 1
    n_embd: int = 4


class ScriptedModel:
    """Next token after absolute position p is script[p + 1 - prompt_len] (one-hot logits); None = token 0.
    Writes dummy keys into the KV cache so positions advance exactly like a real model's."""

    def __init__(self, script, prompt_len, vocab_size, sequence_len=64):
        self.script, self.prompt_len = script, prompt_len
        self.config = _Cfg(sequence_len, vocab_size)
        self.calls = []

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, idx, kv_cache=None):
        B, T = idx.shape
        pos = kv_cache.get_pos()
        kv_cache.insert_kv(0, torch.zeros(B, 1, T, 4), torch.zeros(B, 1, T, 4))
        self.calls.append(idx.tolist())
        logits = torch.zeros(B, T, self.config.vocab_size)
        for t in range(T):
            step = pos + t + 1 - self.prompt_len
            nxt = self.script[step] if 0 <= step < len(self.script) else 0
            logits[:, t, nxt] = 100.0
        return logits


def test_calculator_tool_forces_output_tokens(tok):
    sp = tok.encode_special
    p = prompt_ids(tok, "what is 2+3?")
    expr = tok.encode("2+3")
    junk = tok.encode("X")[0]  # what the model "wants" while the tool output is being forced
    tail = tok.encode(" ok")
    script = [sp("<|python_start|>")] + expr + [sp("<|python_end|>")] + [junk] * 3 + tail + [sp("<|assistant_end|>")]
    model = ScriptedModel(script, len(p), tok.get_vocab_size())
    eng = Engine(model, tok)
    results, masks = eng.generate_batch(p, num_samples=2, max_tokens=30, temperature=1.0)
    forced = [sp("<|output_start|>")] + tok.encode("5") + [sp("<|output_end|>")]
    assert len(forced) == 3
    want = [sp("<|python_start|>")] + expr + [sp("<|python_end|>")] + forced + tail
    want_mask = [1] * (len(expr) + 2) + [0, 0, 0] + [1] * len(tail)
    for r, m in zip(results, masks):
        assert r[len(p):] == want
        assert m[len(p):] == want_mask
    assert tok.decode(results[0][len(p):]) == "<|python_start|>2+3<|python_end|><|output_start|>5<|output_end|> ok"
    # the forced tokens were fed to the model (its KV cache holds the tool output)
    fed = [c[0][0] for c in model.calls[1:]]
    assert fed[: len(want)] == want


def test_bad_expression_forces_nothing_and_rows_stop_independently(tok):
    sp = tok.encode_special
    p = prompt_ids(tok, "x")
    bad = tok.encode("__import__('os')")
    script = [sp("<|python_start|>")] + bad + [sp("<|python_end|>"), sp("<|assistant_end|>")]
    eng = Engine(ScriptedModel(script, len(p), tok.get_vocab_size()), tok)
    (r,), (m,) = eng.generate_batch(p, max_tokens=40, temperature=0.0)
    assert r[len(p):] == [sp("<|python_start|>")] + bad + [sp("<|python_end|>")]
    assert m[len(p):] == [1] * (len(bad) + 2)
    # a stopped row repeats its stop token with mask 0 while others continue; bos also stops a row
    script2 = [sp("<|bos|>")]
    eng2 = Engine(ScriptedModel(script2, len(p), tok.get_vocab_size()), tok)
    cols = list(eng2.generate(p, num_samples=2, max_tokens=10, temperature=0.0))
    assert cols == [([sp("<|bos|>")] * 2, [1, 1])]


def test_context_too_long(tok):
    model = make_model(tok, seq_len=48)
    eng = Engine(model, tok)
    p = prompt_ids(tok)
    assert 20 < len(p) < 40
    with pytest.raises(ContextTooLongError, match=r"\+ max_tokens=20 = .* exceeds the model's context of 48 tokens.*--mc"):
        eng.generate(p, max_tokens=20)  # raised at the call, before any step is requested
    with pytest.raises(ValueError):  # it is a ValueError too
        eng.generate_batch(list(range(60)), max_tokens=1)
    with pytest.raises(ContextTooLongError):  # a too-long prompt is named as such whatever max_tokens says
        eng.generate_batch([1] * 60, max_tokens=48 - 60)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.generate_batch(p, max_tokens=-1)
    with pytest.raises(ContextTooLongError):  # a prompt that fills the context leaves no room
        eng.generate_batch([1] * 48)
    eng.stop_tokens = set()
    results, _ = eng.generate_batch(p, temperature=0.0)  # max_tokens=None: fill the context, no more
    assert len(results[0]) == 48
    with pytest.raises(ValueError, match="vocab_size"):
        eng.generate_batch([tok.get_vocab_size()], max_tokens=1)


# ---------------------------------------------------------------------------------------------------
# calculator


def test_calculator_allowed_expressions():
    assert evaluate_expression("2+3") == 5
    assert evaluate_expression("(12 * 7 - 4) / 8") == 10.0
    assert evaluate_expression("2**10 // 3 % 100") == 41
    assert evaluate_expression("-3 + +4") == 1
    assert evaluate_expression("'strawberry'.count('r')") == 3
    assert evaluate_expression("'Hello'.upper().replace('L', 'l')") == "HEllO"
    assert evaluate_expression("'a b c'.split()") == ["a", "b", "c"]
    assert use_calculator("'-'.join('lantern')") == "l-a-n-t-e-r-n"  # SpellingBee's spelling tool call
    assert use_calculator("'-'.join(['a'])") is None  # only a string argument
    assert use_calculator("1,234 + 1") == "1235"
    assert use_calculator("2+3") == "5"
    assert use_calculator("1/0") is None


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo hi')",
    "open('/etc/passwd').read()",
    "().__class__.__bases__[0].__subclasses__()",
    "'a'.__class__",
    "'{0.__class__}'.format(1)",
    "[x for x in range(10)]",
    "lambda: 1",
    "x + 1",
    "print('hi')",
    "'abc'.count",
    "'abc'.count(sub='a')",
    "exec('1')",
    "1 if 1 else 2",
    "'%s' % 5",
    "b'bytes'",
])
def test_calculator_rejects_dangerous_expressions(expr):
    with pytest.raises(CalculatorError):
        evaluate_expression(expr)
    assert use_calculator(expr) is None


def test_calculator_bounds_pathological_expressions():
    t0 = time.monotonic()
    for expr in ["9**9**9**9", "10**10**10", "'a' * 10**9", "(2**4000) * (2**4000)", "('ab' * 5000).replace('a', 'a' * 5000)",
                 "'x' * 6000 + 'y' * 6000", "(" * 5000 + "1" + ")" * 5000, "1" + "+1" * 2000]:
        with pytest.raises(CalculatorError):
            evaluate_expression(expr)
    assert time.monotonic() - t0 < 2.0


def test_calculator_times_out():
    # many cheap operations; a deadline already passed stops the walk at its first node
    expr = " + ".join(["('ab' * 4000).count('a')"] * 35)
    assert evaluate_expression(expr) == 35 * 4000
    with pytest.raises(CalculatorTimeout):
        evaluate_expression(expr, timeout=0.0)
    assert use_calculator(expr, timeout=0.0) is None


# ---------------------------------------------------------------------------------------------------
# MCEngine: the MegaContext session behind the same generate() contract


def mc_model(tok, seed=0):
    from tests.test_mc_session import tiny_mc_model

    model, modules, cfg = tiny_mc_model(seed=seed, vocab=tok.get_vocab_size())
    with torch.no_grad():  # replies that do not stop at once
        model.lm_head.weight[tok.encode_special("<|assistant_end|>")] = 0
        model.lm_head.weight[tok.get_bos_token_id()] = 0
    return model, modules, cfg


def long_prompt(tok, n_turns=12):
    msgs = []
    for i in range(n_turns):
        msgs += [{"role": "user", "content": f"tell me about the river number {i} and the old mill"},
                 {"role": "assistant", "content": f"the river {i} runs past the mill"}]
    return tok.render_for_completion({"messages": msgs + [{"role": "user", "content": "and then?"}]})


@pytest.mark.usefixtures("single_thread")
def test_mc_engine_matches_session_and_passes_the_context(tok):
    from mc.infer.session import MCSession

    model, modules, cfg = mc_model(tok)
    p = long_prompt(tok)
    assert len(p) > 4 * model.config.sequence_len  # Engine would refuse this prompt
    with pytest.raises(ContextTooLongError):
        Engine(model, tok).generate(p, max_tokens=10)
    modules.lensnet.calls = 0  # the stand-in LensNet's scores depend on its call count
    eng = MCEngine(model, tok)
    results, masks = eng.generate_batch(p, max_tokens=50, temperature=0.0)
    assert results[0][: len(p)] == p and masks[0] == [0] * len(p) + [1] * (len(results[0]) - len(p))
    assert len(results[0]) - len(p) >= 40
    modules.lensnet.calls = 0
    s = MCSession(model, modules, cfg)
    s.ingest(p)
    s.refocus()
    assert results[0][len(p):] == list(itertools.islice(s.generate(50, temperature=0.0), len(results[0]) - len(p)))
    st = eng.session.stats()
    assert st["max_kv_entries"] <= model.config.sequence_len and st["refocuses"] >= 3


@pytest.mark.usefixtures("single_thread")
def test_mc_engine_keeps_one_session_across_turns(tok):
    model, _, _ = mc_model(tok, seed=1)
    eng = MCEngine(model, tok)
    first = eng.session
    p1 = long_prompt(tok, 3)
    (r1,), _ = eng.generate_batch(p1, max_tokens=20, temperature=0.0)
    p2 = r1 + [tok.encode_special("<|assistant_end|>")] + tok.encode("more please", prepend="<|user_start|>",
                                                                      append="<|user_end|>") \
        + [tok.encode_special("<|assistant_start|>")]
    (r2,), _ = eng.generate_batch(p2, max_tokens=20, temperature=0.0)
    assert eng.session is first  # extended, not rebuilt
    assert first.token_ids().tolist() == r2 and first.stats()["ingested_tokens"] == len(r2)
    # a prompt that does not extend the history starts a new session; reuse_session=False always does
    eng.generate_batch(p1, max_tokens=5)
    assert eng.session is not first and eng.session.num_tokens == len(p1) + 5
    fresh = MCEngine(model, tok, reuse_session=False)
    fresh.generate_batch(p1, max_tokens=5)
    s = fresh.session
    fresh.generate_batch(s.token_ids().tolist(), max_tokens=5)
    assert fresh.session is not s


@pytest.mark.usefixtures("single_thread")
def test_mc_engine_calculator_tokens_enter_the_session(tok, monkeypatch):
    sp = tok.encode_special
    model, _, _ = mc_model(tok, seed=2)
    p = long_prompt(tok, 4)
    expr, junk, tail = tok.encode("2+3"), tok.encode("X")[0], tok.encode(" ok")
    script = iter([sp("<|python_start|>")] + expr + [sp("<|python_end|>")] + tail + [sp("<|assistant_end|>")]
                  + [junk] * 10)
    monkeypatch.setattr(mc_engine_module, "sample_next_token", lambda logits, *a: torch.tensor([[next(script)]]))
    eng = MCEngine(model, tok)
    (r,), (m,) = eng.generate_batch(p, max_tokens=30, temperature=1.0)
    forced = [sp("<|output_start|>")] + tok.encode("5") + [sp("<|output_end|>")]
    want = [sp("<|python_start|>")] + expr + [sp("<|python_end|>")] + forced + tail
    assert r[len(p):] == want
    assert m[len(p):] == [1] * (len(expr) + 2) + [0] * len(forced) + [1] * len(tail)
    # sampled and forced tokens alike are in the session's history (the stop token too)
    assert eng.session.token_ids().tolist() == p + want + [sp("<|assistant_end|>")]


def test_mc_engine_errors(tok):
    model, _, _ = mc_model(tok, seed=3)
    eng = MCEngine(model, tok)
    with pytest.raises(ValueError, match="num_samples must be 1"):
        eng.generate(prompt_ids(tok), num_samples=2)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.generate(prompt_ids(tok), max_tokens=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        eng.generate([tok.get_vocab_size()])
    from mc.infer.session import MCSessionError

    with pytest.raises(MCSessionError, match="--mc_enabled=1"):
        MCEngine(make_model(tok), tok)  # a vanilla model
