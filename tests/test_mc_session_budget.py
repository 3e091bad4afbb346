"""The inference session's budget (mc/infer/session.py, "Budget"; issue 17 item 0):
- a short chat is the plain model: while the history fits W, every token stays raw and the session's
  next-token logits equal the plain GPT's full-attention logits on the same ids, even with a LensNet that
  scores everything strongly negative (the old allocator collapsed such entries on its own);
- W is a hard cap: past W, the working context never holds more than W entries, after every appended
  or ingested token and after every refocus, and a refocus of a long history leaves W - refocus_interval.
"""

import pytest
import torch

from mc.infer.session import MCSession
from tests.test_mc_session import SEQ, scratch_logits, tiny_mc_model

pytestmark = pytest.mark.usefixtures("single_thread")


class NegativeLens(torch.nn.Module):
    """A LensNet that wants every entry coarser: -1 everywhere (also after mc/focus.py's centring, which
    subtracts the mean over gists: a raw-only WC has none)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, embeddings=None, lod=None, span_start=None, span_len=None, valid=None):
        return -torch.ones(span_start.shape, dtype=self.anchor.dtype, device=embeddings.device) * valid


def plain_logits(model, ids):
    """The plain GPT: full attention over the raw ids, its own rotary table."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


@pytest.mark.parametrize("positional_type", ["gaussian", "simple"])
def test_history_that_fits_w_is_the_plain_model(positional_type):
    model, modules, cfg = tiny_mc_model(seed=7, positional_type=positional_type)
    modules.lensnet = NegativeLens()
    s = MCSession(model, modules, cfg)
    assert s.W == 40 + 16 <= SEQ  # default: the training W + one refocus interval of headroom
    ids = torch.randint(0, 256, (s.W,), generator=torch.Generator().manual_seed(7)).tolist()
    s.ingest(ids[:5])
    s.refocus()  # a user turn
    for n in range(5, s.W + 1):  # every length up to exactly W, refocusing every interval on the way
        if n > 5:
            s.append_token(ids[n - 1])
            if n % 20 == 0:
                s.refocus()  # user turns at other points too
        assert s.num_tokens == s.num_entries == n and not bool(s.plan.any())  # all raw, nothing collapsed
        torch.testing.assert_close(s.next_logits().float(), plain_logits(model, ids[:n]), atol=1e-4, rtol=1e-4)
    assert s.stats()["refocuses"] >= 3 and s.stats()["collapses"] == s.stats()["forced"] == 0


@pytest.mark.parametrize("n", [1, 17, 40, 55, 56])
def test_one_ingest_that_fits_w_is_the_plain_model(n):
    model, modules, cfg = tiny_mc_model(seed=8)
    modules.lensnet = NegativeLens()
    s = MCSession(model, modules, cfg)
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    s.ingest(ids)  # >= refocus_interval tokens refocus inside ingest
    s.refocus()
    assert s.num_entries == n and not bool(s.plan.any())
    torch.testing.assert_close(s.next_logits().float(), plain_logits(model, ids), atol=1e-4, rtol=1e-4)


class EntryLog:
    """Wraps a session's refocus to record the entry count right after every refocus."""

    def __init__(self, s):
        self.after_refocus, self.s, self._refocus = [], s, s.refocus

        def refocus():
            out = self._refocus()
            self.after_refocus.append((s.num_tokens, s.num_entries))
            return out

        s.refocus = refocus


@pytest.mark.parametrize("lensnet", ["random", "none", "negative"])
def test_entries_never_exceed_w_past_it(lensnet):
    model, modules, cfg = tiny_mc_model(seed=9, lensnet="none" if lensnet == "none" else "transformer")
    if lensnet == "negative":
        modules.lensnet = NegativeLens()
    s = MCSession(model, modules, cfg)
    W, B = s.W, s.fit_budget
    assert B == W - s.refocus_interval
    log = EntryLog(s)
    g = torch.Generator().manual_seed(9)
    after_token = []
    # a chat: user turns of varied length (some push the WC past W at once), each followed by a reply of
    # several refocus intervals, decoded token by token
    for turn, length in enumerate((30, 3, 50, 120, 9)):
        s.ingest(torch.randint(0, 256, (length,), generator=g).tolist())
        assert s.num_entries <= W
        s.refocus()
        for _ in s.generate(3 * s.refocus_interval + 5, temperature=1.0, seed=turn):
            after_token.append(s.num_entries)
            assert s.num_entries <= W and s.kv.get_pos() <= W
    assert s.num_tokens > 6 * W
    assert max(after_token) == W  # the cap is used, never passed
    assert all(e <= W for _, e in log.after_refocus)
    # a refocus of a history longer than W leaves headroom for the next interval; one that fits keeps all
    assert all(e <= B for t, e in log.after_refocus if t > W)
    assert all(e == t for t, e in log.after_refocus if t <= W)
    st = s.stats()
    assert st["max_kv_entries"] <= W <= SEQ
    torch.testing.assert_close(s.next_logits(), scratch_logits(s), atol=2e-5, rtol=1e-4)


def test_crossing_w_refocuses_at_once():
    model, modules, cfg = tiny_mc_model(seed=10)
    s = MCSession(model, modules, cfg)
    ids = torch.randint(0, 256, (s.W + 1,), generator=torch.Generator().manual_seed(10)).tolist()
    s.ingest(ids[:-1])
    s.refocus()
    refocuses = s.stats()["refocuses"]
    assert s.num_entries == s.W
    s.next_logits()
    s.append_token(ids[-1])  # W + 1 tokens: the session refocuses before the WC passes W
    assert s.stats()["refocuses"] == refocuses + 1 and s.num_entries <= s.fit_budget
    torch.testing.assert_close(s.next_logits(), scratch_logits(s), atol=2e-5, rtol=1e-4)
