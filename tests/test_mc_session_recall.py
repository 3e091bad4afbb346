"""Chat remembers: how an MC session answers a question about a fact stated far earlier (mc/infer/session.py).

A small rigged model pins the mechanism end to end through MCSession's public API (ingest / refocus /
generate, as mc.infer.engine.MCEngine drives it: every user turn is ingested, then refocused):
- a history of 40 blocks of 32 filler tokens (10 user turns), with the fact "KEY VALUE" planted in block 3,
  so by the time the question comes that block is one LOD1 gist in a working context refocused to
  128 entries (the session's W, its hard cap, is 128 + the refocus interval of 64);
- the user turn "USER ASK KEY" arrives; at its refocus the scorer rates the fact's gist as relevant to the
  question, the allocator expands it (LOD1 -> 32 raw tokens), and greedy decoding answers VALUE, read from
  the raw VALUE token; the working context never holds more than 128 entries after a refocus;
- the same for a second fact "KEY2 VALUE2" (block 9), in a fresh chat and as a follow-up question in the
  same chat (the first block is released again); and with the question at the end of a long message, where
  the WC is over W at the refocus and raw history is collapsed to make room for the expansion;
- controls: before the question the block was NOT raw (the question caused the expansion); without a
  scorer (fixed focus) the block stays a gist and the same GPT does NOT answer VALUE; a question about a
  key the history never stated expands nothing.

The rig (nothing is trained):
- embeddings: token ids 0..15 are one-hot in the residual's first 16 dims, so the key is orthogonal to
  the fillers; GistNet is gistnet_type="mean" (a gist = the mean embedding of its 32 tokens);
- scorer (in LensNet's place, called as mc/focus.py calls LensNet): the question = the mean embedding of
  the row's last 3 raw entries; score = clamp(gain * cosine(entry, question) - raw_cost * [entry is raw],
  -1, 1) with gain 30, raw_cost 0.5. A gist holding the key is the only gist that resembles the question;
  raw history that does not bear on it scores -raw_cost, i.e. it may be coarser (collapses are what make
  room for an expansion);
- GPT: one layer, one head of 64 dims, rope_fraction=0 (attention matches on content at any distance),
  prev_token_mix (writes the previous token into its own residual slot): the head's query is "my token",
  its key "the token before me", its value "my token", so the last token KEY attends to the entry that
  FOLLOWS a raw KEY and copies it; lm_head reads only the copied slot. A one-layer induction head: it can
  answer only when the raw "KEY VALUE" pair is in the working context. (Sanity check: with the whole
  history raw, the plain GPT answers VALUE.)
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mc.config import MCConfig
from mc.gistnet import GistNet
from mc.infer.session import MCSession
from mc.modules import MCModules, attach
from nanochat.gpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, C, N_ID = 64, 64, 16  # ids 0..N_ID-1 get one-hot embeddings; the rest are never used
TOK, PREV, OUT = slice(0, 16), slice(16, 32), slice(32, 48)  # residual slots: my token, previous token, copied
BOS, USER, ASK = 0, 1, 2
KEY, VALUE, KEY2, VALUE2, UNKNOWN_KEY = 4, 5, 6, 7, 8
FILLERS = torch.arange(10, 16)
BS, SEQ, W, INTERVAL, RECENT = 32, 256, 128, 64, 16
TURNS, TURN_LEN = 10, 128  # 1280 history tokens = 40 blocks = 10 x W
FACT_BLOCK, FACT_AT = 3, 3 * BS + 11  # KEY at token 107, VALUE at 108
FACT2_BLOCK, FACT2_AT = 9, 9 * BS + 20  # KEY2 at token 308, VALUE2 at 309


class QuestionLens(nn.Module):
    """Stands in for a trained LensNet (module docstring): relevance to the last `k` raw entries."""

    def __init__(self, k=3, gain=30.0, raw_cost=0.5):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # mc/focus.py reads the dtype from the first parameter
        self.k, self.gain, self.raw_cost = k, gain, raw_cost

    def forward(self, embeddings=None, lod=None, span_start=None, span_len=None, valid=None):
        raw = valid & (lod == 0)
        from_end = raw.flip(1).long().cumsum(1).flip(1)  # raw entries at or after each slot
        ask = (raw & (from_end <= self.k)).to(embeddings.dtype)  # the row's last k raw entries
        question = (embeddings * ask[..., None]).sum(1) / ask.sum(1, keepdim=True).clamp(min=1)
        relevance = F.cosine_similarity(embeddings, question[:, None, :], dim=-1)
        score = (self.gain * relevance - self.raw_cost * raw.to(relevance.dtype)).clamp(-1.0, 1.0)
        return score * valid


def rigged_gpt():
    """A one-layer induction head (module docstring); every other weight is zero."""
    model = GPT(GPTConfig(sequence_len=SEQ, vocab_size=VOCAB, n_layer=1, n_head=1, n_kv_head=1, n_embd=C,
                          prev_token_mix=True, rope_fraction=0.0))
    model.init_weights()  # the rotary tables
    eye = torch.eye(N_ID)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.transformer.wte.weight[:N_ID, TOK] = eye
        model.prev_mix.weight[PREV, TOK] = eye  # x[t] += W x[t-1]: the previous token into its own slot
        model.prev_mix_lambda.fill_(1.0)
        attn = model.transformer.h[0].attn  # head dims 0..15 = token identities
        attn.c_q.weight[:N_ID, TOK] = eye  # query: my token
        attn.c_k.weight[:N_ID, PREV] = eye  # key: the token before me
        attn.c_v.weight[:N_ID, TOK] = eye  # value: my token
        attn.c_proj.weight[OUT, :N_ID] = eye  # -> the copied slot
        model.lm_head.weight[:N_ID, OUT] = 4.0 * eye  # logits read only the copied slot
    return model.eval()


def build(scorer=True, seed=0, focus="lensnet"):
    model = rigged_gpt()
    cfg = MCConfig(block_size=BS, max_lod=1, gistnet_type="mean", recent_tokens=RECENT, train_wc_length=W,
                   infer_refocus_interval=INTERVAL, lensnet_type="transformer" if scorer else "none",
                   infer_focus=focus)
    modules = MCModules(GistNet(C, block_size=BS, gistnet_type="mean"), QuestionLens() if scorer else None)
    attach(model, modules, cfg)
    return model, modules, cfg


def history(seed=0):
    """1280 tokens: BOS, fillers, "KEY VALUE" in block 3 and "KEY2 VALUE2" in block 9."""
    g = torch.Generator().manual_seed(seed)
    ids = FILLERS[torch.randint(0, len(FILLERS), (TURNS * TURN_LEN,), generator=g)]
    ids[0] = BOS
    ids[FACT_AT], ids[FACT_AT + 1] = KEY, VALUE
    ids[FACT2_AT], ids[FACT2_AT + 1] = KEY2, VALUE2
    return ids.tolist()


class WCSizes:
    """Telemetry provider that keeps the working-context size of every refocus."""

    def __init__(self):
        self.sizes = []

    def emit(self, event):
        if event.event_type == "working_context_snapshot":
            self.sizes.append(event.attributes["wc_length"])

    def flush(self):
        return True

    def shutdown(self):
        pass


def lod_of(s, positions):
    return [int(s.plan[0, p]) for p in positions]


def raw_entries(s):
    starts, lods = s.entries()
    return set(starts[lods == 0].tolist())


def chat(scorer=True, focus="lensnet"):
    """A session that has been told the history turn by turn (ingest + refocus per turn, as MCEngine does)."""
    model, modules, cfg = build(scorer, focus=focus)
    rec = WCSizes()
    s = MCSession(model, modules, cfg, telemetry=rec)
    assert (s.W, s.fit_budget, s.refocus_interval) == (W + INTERVAL, W, INTERVAL)
    ids = history()
    for turn in range(TURNS):
        s.ingest(ids[turn * TURN_LEN:(turn + 1) * TURN_LEN])
        s.refocus()
        assert s.num_entries <= W
    return s, rec


def filler(n, seed):
    return FILLERS[torch.randint(0, len(FILLERS), (n,), generator=torch.Generator().manual_seed(seed))].tolist()


def ask(s, key, preamble=()):
    """A user turn (preamble, then "USER ASK key"); returns (the turn's refocus info, greedy answer token)."""
    s.ingest(list(preamble) + [USER, ASK, key])  # shorter than refocus_interval: no refocus inside ingest
    info = s.refocus()
    assert s.num_entries <= W
    answer = next(s.generate(1, temperature=0.0))
    return info, answer


@pytest.mark.parametrize("key,value,block", [(KEY, VALUE, FACT_BLOCK), (KEY2, VALUE2, FACT2_BLOCK)])
def test_question_expands_the_fact_block_and_the_answer_comes_from_it(key, value, block):
    s, rec = chat()
    at = FACT_AT if key == KEY else FACT2_AT
    span = range(block * BS, (block + 1) * BS)
    # before the question: the fact is far behind the raw window, inside a LOD1 gist of the WC
    assert s.num_tokens == 1280 == 10 * W
    assert lod_of(s, span) == [1] * BS
    starts, lods = s.entries()
    assert block * BS in set(starts[lods == 1].tolist())
    assert not raw_entries(s) & {at, at + 1}
    # the plain GPT answers from the whole raw history (validity check of the rig)
    with torch.no_grad():
        full = s.model(torch.tensor([history() + [USER, ASK, key]]))[0, -1]
    assert int(full.argmax()) == value

    info, answer = ask(s, key)
    # the question's refocus expanded the fact's block: KEY and VALUE are raw (LOD0) entries of the WC
    assert info["expands"] == 1
    assert lod_of(s, span) == [0] * BS
    assert raw_entries(s) >= set(span)
    assert s.kv.get_pos() <= W  # the answer was decoded over <= W entries...
    assert answer == value  # ...and it is the raw value token, copied by the induction head
    # nothing else was expanded: every other block before the raw window is still a gist
    others = [b for b in range(30) if b != block]
    assert all(int(s.plan[0, b * BS]) == 1 for b in others)
    # never more than W entries after any refocus (the ones inside ingest included)
    assert len(rec.sizes) == 2 * TURNS + 1 and max(rec.sizes) <= W
    assert s.stats()["max_kv_entries"] <= W + INTERVAL


def test_follow_up_question_about_another_fact():
    """Same chat: answer about KEY, talk on (a turn of filler), then ask about KEY2. The first block is
    released again (its raw tokens do not bear on the new question) and the second one opens."""
    s, rec = chat()
    assert ask(s, KEY)[1] == VALUE
    s.ingest(filler(TURN_LEN, seed=1))
    s.refocus()
    info, answer = ask(s, KEY2)
    assert info["expands"] == 1 and answer == VALUE2
    assert lod_of(s, range(FACT2_BLOCK * BS, (FACT2_BLOCK + 1) * BS)) == [0] * BS
    assert lod_of(s, [FACT_AT, FACT_AT + 1]) == [1, 1]
    assert max(rec.sizes) <= W and s.stats()["max_kv_entries"] <= W + INTERVAL


def test_question_at_the_end_of_a_long_message_makes_room():
    """60 filler tokens then the question, in one turn: the WC is over W when the turn's refocus runs, so the
    allocator fits it (a forced collapse) and collapses raw history that does not bear on the question to
    make room for the expansion; the budget holds and the answer is still read from the raw fact."""
    s, rec = chat()
    info, answer = ask(s, KEY, preamble=filler(60, seed=2))
    assert info["expands"] == 1 and info["forced"] + info["collapses"] >= 1
    assert lod_of(s, [FACT_AT, FACT_AT + 1]) == [0, 0]
    assert answer == VALUE
    assert max(rec.sizes) <= W and s.stats()["max_kv_entries"] <= W + INTERVAL


def test_without_the_expansion_the_same_gpt_cannot_answer():
    # fixed focus (no scorer): the block stays a gist and the induction head has no raw KEY -> VALUE to copy
    s, rec = chat(scorer=False)
    info, answer = ask(s, KEY)
    assert info["expands"] == 0
    assert lod_of(s, [FACT_AT, FACT_AT + 1]) == [1, 1]
    assert answer != VALUE
    assert max(rec.sizes) <= W


def test_question_about_an_unknown_key_expands_nothing():
    s, _ = chat()
    before = s.plan.clone()
    info, answer = ask(s, UNKNOWN_KEY)
    assert info["expands"] == 0
    assert lod_of(s, [FACT_AT, FACT_AT + 1]) == [1, 1] and lod_of(s, [FACT2_AT, FACT2_AT + 1]) == [1, 1]
    assert torch.equal(s.plan[:, :FACT2_AT + 1], before[:, :FACT2_AT + 1])
    assert answer not in (VALUE, VALUE2)


# ------------------------------------------------------------------ keymatch focus (--mc_infer_focus=keymatch)
# No scorer at all: the rigged GPT's own layer-0 query ("my token" = KEY) and keys ("the token before me")
# single out the block where KEY was followed by its value (mc/keymatch.py).
@pytest.mark.parametrize("key,value,block", [(KEY, VALUE, FACT_BLOCK), (KEY2, VALUE2, FACT2_BLOCK)])
def test_keymatch_focus_opens_the_fact_block_from_the_gpts_own_keys(key, value, block):
    s, rec = chat(scorer=False, focus="keymatch")
    span = range(block * BS, (block + 1) * BS)
    assert lod_of(s, span) == [1] * BS  # before the question: a gist
    info, answer = ask(s, key)
    assert info["expands"] == 1 and lod_of(s, span) == [0] * BS
    assert answer == value
    others = [b for b in range(30) if b != block]
    assert all(int(s.plan[0, b * BS]) == 1 for b in others)
    assert max(rec.sizes) <= W and s.stats()["max_kv_entries"] <= W + INTERVAL
    assert s.memory_bytes()["history"] >= s.num_tokens * 64 * 2  # the cached bf16 keys are accounted


def test_keymatch_follow_up_and_unknown_key():
    s, rec = chat(scorer=False, focus="keymatch")
    assert ask(s, KEY)[1] == VALUE
    s.ingest(filler(TURN_LEN, seed=1))
    s.refocus()
    info, answer = ask(s, KEY2)
    assert info["expands"] == 1 and answer == VALUE2
    before = s.plan.clone()
    info, answer = ask(s, UNKNOWN_KEY)  # nothing stands out: no block is opened
    assert info["expands"] == 0 and answer not in (VALUE, VALUE2)
    assert torch.equal(s.plan[:, :FACT2_AT + 1], before[:, :FACT2_AT + 1])
    assert max(rec.sizes) <= W


def test_keymatch_makes_room_by_collapsing_the_oldest_detail():
    s, rec = chat(scorer=False, focus="keymatch")
    info, answer = ask(s, KEY, preamble=filler(60, seed=2))
    assert info["expands"] == 1 and info["forced"] >= 1
    assert lod_of(s, [FACT_AT, FACT_AT + 1]) == [0, 0] and answer == VALUE
    assert max(rec.sizes) <= W and s.stats()["max_kv_entries"] <= W + INTERVAL


def test_given_block_scores_open_those_blocks_whatever_the_policy():
    """refocus(block_scores=...) (mc_recall's ORACLE): the named block opens even under fixed focus."""
    s, rec = chat(scorer=False)
    s.ingest([USER, ASK, KEY])
    z = torch.zeros(1, s.num_tokens // BS)
    z[0, FACT_BLOCK] = 10.0
    info = s.refocus(block_scores=z)
    assert info["expands"] == 1 and lod_of(s, [FACT_AT, FACT_AT + 1]) == [0, 0]
    assert next(s.generate(1, temperature=0.0)) == VALUE
    assert max(rec.sizes) <= W


def test_keymatch_keeps_an_open_block_rather_than_swap_it_for_the_runner_up():
    """At 1M tokens the coarsest covering leaves room for one raw block; a repeated refocus for the same question
    must keep the block it opened (the needle's) instead of closing it to open the second-best block."""
    from mc.config import MCConfig
    from mc.keymatch import keymatch_refocus
    from mc.working_context import entry_counts, entry_starts

    bs, T, R = 4, 136, 8
    plan = torch.full((1, T), 2, dtype=torch.int8)  # 8 LOD2 gists, then the raw tail
    plan[0, 128:] = 0
    plan[0, 0:16] = 1  # unit 0 opened to LOD1 ...
    plan[0, 8:12] = 0  # ... and its block 2 to raw: the block the question asks about, opened last time
    W = int(entry_counts(plan, bs)[0])  # exactly the room for one raw block (16 + 2 x 3)
    z = torch.zeros(1, T // bs)
    z[0, 2], z[0, 20] = 5.0, 4.9  # block 2 best, block 20 (inside LOD2 unit 5) a close runner-up
    cfg = MCConfig(block_size=bs, max_lod=2, recent_tokens=R)
    start = entry_starts(plan, bs, max_level=2)[0].nonzero()[:, 0]

    def refocused(W):
        s, lod, _, _, stats = keymatch_refocus(start, plan[0, start].long(), z, W, cfg, T - R)
        return lod.repeat_interleave(bs ** lod)[None], stats

    new_plan, stats = refocused(W)
    assert int(new_plan[0, 8]) == 0 and int(new_plan[0, 80]) == 2  # block 2 stays raw, block 20 stays closed
    assert int(stats["expands"][0]) == 0 and int(entry_counts(new_plan, bs)[0]) <= W
    # with room for two, the runner-up opens too
    new_plan, stats = refocused(W + 6)
    assert int(new_plan[0, 8]) == 0 and int(new_plan[0, 80]) == 0 and int(stats["expands"][0]) == 1
