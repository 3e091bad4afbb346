"""
MCSession: MegaContext inference. A chat or document of any length, decoded at a bounded cost per token.

    s = MCSession(model, model.mc_modules, model.mc_config)   # W, refocus_interval: defaults below
    s.ingest(prompt_ids); s.refocus()                          # a user turn
    for tok in s.generate(64, temperature=0): ...              # or next_logits() / append_token(id)
    s.stats()                                                  # swap rate, re-prefill, memory, ...

State (batch 1):
- the MegaContextTree of the whole history (mc/tree.py): every token goes in, LOD1/LOD2 gists are made
  as blocks complete. LOD0 is never stored (cache_lod0=False whatever the checkpoint says): the session
  keeps the token ids (4 bytes per token) and re-embeds the <= W raw entries of the working context
  with wte, which is far cheaper than C floats per token.
- the plan, int8 [1, T]: level of detail of every history token (mc/working_context.py); full
  coverage; new tokens join it raw. The working context (WC) is its entry list: an entry starts at
  token t iff plan[t] = l and t % bs**l == 0 and spans bs**l tokens. Kept as two CPU vectors
  (span_start, lod; mc/infer/buffer.py), appended to for every new token and recomputed from the plan after
  a refocus.
- the allocator's hysteresis state, int8 [1, T].
- a KV cache over the WC entries, unpadded, in entry order: cache slot i holds entry i. Each entry
  is fed to the GPT as inputs_embeds (wte(id) for a raw token, the gist for a gist) with its own
  rotary angles, cos_sin_override = mc.positions.rope_cos_sin(position, span_len, positional_type):
  position = the entry's absolute history position (last token of its span, as in training), computed
  directly for any position, so histories past the GPT's rotary table (10 x sequence_len) work.
  Invariant: the cache holds a prefix of the current entry list.

Refocus (refocus(); automatically every refocus_interval ingested/appended tokens, and at once when
the WC would pass W entries; the engine also calls it at every user turn): mc.focus.refocus_entries = LensNet
scores the current WC (lensnet None = fixed focus: every score 0, only forced collapses) and the
allocator edits the entry list under the refocus budget (see Budget; step 0, the hard fit, collapses the
lowest-scored groups until entries fit it). When a long ingest left more than W entries, a score-free
hard fit to W runs first so LensNet never sees more entries than the model does. With
--mc_infer_focus=keymatch the GPT's own layer-0 attention chooses instead of LensNet
(mc.keymatch.keymatch_refocus): the history's last token is the query, the blocks that stand out are
made raw and the oldest detail is collapsed to make room (layer-0 keys cached per token). A LensNet
with the content match (--lensnet_match=1) reads the same cached keys, with the history's last token as
the query (mc/keymatch.py); when the question singles out a block (z >= 3), the refocus first frees room
to open two blocks from the coarsest level (mc.focus.make_room_entries: the lowest-scored groups collapse), as
the keymatch focus does, since a WC at budget could otherwise open nothing. A refocus runs max(allocator_iterations, max_lod) allocator iterations, so a
question can take the coarsest gist it asks about down to raw before the answer (as mc_eval's MC-LensNet).

Re-prefill. After a refocus the KV cache keeps the slots of the entries before the first changed one and
next_logits() re-runs every entry from there in ONE forward (mc/infer/session_metrics.py: why that is exact,
and the re-prefill accounting).

Budget. W is a hard cap: the WC (and so the KV cache) never holds more than W <= sequence_len entries,
decoded tokens included. A history of at most W tokens is never compressed: every token stays raw and
the session's logits are the plain GPT's (the allocator only removes detail when the budget needs it,
mc/allocator.py). Once the history is longer than W, a refocus fits the WC to W - refocus_interval
entries (the refocus budget; headroom), each new token adds one raw entry, and the next refocus comes
after at most refocus_interval tokens, or at once when an ingest would pass W, so entries <= W at all
times and refocuses stay amortised. Default W = min(mc_config.wc_length(sequence_len) + refocus_interval,
sequence_len): a refocus then leaves at most the training W entries, the most the checkpoint's variants
held. W - refocus_interval must exceed recent_tokens (the raw tail). A decode step costs the same at
any history length, and so does the allocator: every focus policy edits the entry list (mc/entry_allocator.py,
O(W); mc.focus.refocus_entries, mc.keymatch.keymatch_refocus) and the per-token plan is only written where an
edit lands. The keymatch focus and a LensNet with the content match also score the history's keys for the
question (an exact search over every block, H_kv x D multiply-adds per history token: ~65 ns per token on
one CPU core at 1M, lab notebook 2026-12-07 session 5). Largest history: its most
compressed covering must fit the refocus budget (about (W - refocus_interval - recent_tokens -
max_lod * (bs - 1)) * bs**max_lod tokens). A longer history grows the tree a level (LOD3, LOD4, ...: the
same GistNet over groups of bs gists of the level below, mc/tree.py grow), up to --mc_infer_max_lod
(default 5: ~33M tokens at bs 32); beyond that HistoryTooLongError. GistNet was trained on the levels of
max_lod only: what a grown level costs is measured in the lab notebook ("LOD growth").

Memory. The session keeps per history token its id (int32), its plan level (int8) and, per block, the gists
of every level (C floats per bs**l tokens); with the keymatch focus or a content-matching LensNet, also the
layer-0 keys (H_kv x D bf16). --mc_tree ram (the default) holds them in RAM; --mc_tree disk in memory-mapped
files under tree_dir ($NANOCHAT_BASE_DIR/mc_tree; mc/mapped.py: unlinked at once, so nothing is left behind),
and each refocus ends by dropping their pages from resident memory (release), so what stays resident is the
working context, the KV cache and the pages read since: bounded, whatever the history's length. The entry
list, the allocator's marks and the KV cache are O(W) and stay in RAM.

Metrics: stats() and one set of telemetry events per refocus (mc/infer/session_metrics.py says what each means).
"""

import dataclasses
import os
import time
import uuid

import torch

from mc.allocator import PlanDoesNotFitError
from mc.entry_allocator import SpanScores, allocate_entries, marks_from_state, state_from_marks
from mc.focus import refocus_entries
from mc.infer.buffer import AppendBuffer
from mc.infer.session_metrics import add_refocus, emit_refocus_events, refocus_moves, session_stats
from mc.keymatch import KEYMATCH_MAX_BLOCKS, KEYMATCH_MIN_Z, LayerZeroKeys, block_scores, keymatch_refocus
from mc.ops.telemetry import NoOpTelemetryProvider
from mc.positions import rope_cos_sin
from mc.tree import MegaContextTree, min_variant_entries
from mc.working_context import WorkingContext, entry_starts
from nanochat.common import get_base_dir
from nanochat.engine import ContextTooLongError
from nanochat.gpt import sample_next_token
from nanochat.kv_cache import KVCache

VANILLA_FIX = ("train with MegaContext: `python -m scripts.base_train --mc_enabled=1` "
               "(or `bash run10.sh --profile mc`), "
               "then continue mid/SFT from that checkpoint; or chat without --mc within the model's context")


class MCSessionError(ValueError):
    """The model/checkpoint or the session settings cannot run a MegaContext session (the message says why)."""


class HistoryTooLongError(ContextTooLongError):
    """Even the most compressed covering of the history no longer fits W entries."""


class MCSession:
    def __init__(self, model, mc_modules=None, mc_config=None, W: int | None = None,
                 refocus_interval: int | None = None, telemetry=None, device=None, session_id: str | None = None,
                 seed: int = 0, ingest_chunk: int = 8192, focus: str | None = None, max_lod: int | None = None,
                 tree: str | None = None, tree_dir: str | None = None):
        """mc_modules / mc_config default to model.mc_modules / model.mc_config (mc.infer.checkpoint.build_model);
        W, refocus_interval default as in the module docstring; telemetry: a mc.ops.telemetry provider (NoOp);
        seed: the stochastic_greedy allocator's draws; ingest_chunk: tokens per GistNet batch on ingest;
        focus: "lensnet" | "keymatch" (default: the config's --mc_infer_focus); max_lod: the highest level the
        tree may grow to (default: the config's --mc_infer_max_lod); tree: "ram" | "disk" (default: the config's
        --mc_tree; module docstring, Memory); tree_dir: the folder of a disk tree's files (default
        $NANOCHAT_BASE_DIR/mc_tree)."""
        mc_modules = mc_modules if mc_modules is not None else getattr(model, "mc_modules", None)
        cfg = mc_config if mc_config is not None else getattr(model, "mc_config", None)
        seq_len = model.config.sequence_len
        if mc_modules is None or cfg is None:
            raise MCSessionError(f"this model has no MegaContext modules (model.mc_modules is None: a vanilla "
                                 f"checkpoint, no GistNet/LensNet weights or meta['mc_config']); {VANILLA_FIX} of "
                                 f"{seq_len} tokens")
        try:
            if focus is not None:
                cfg = dataclasses.replace(cfg, infer_focus=focus)  # validated there (one clear error)
            if max_lod is not None:
                cfg = dataclasses.replace(cfg, infer_max_lod=max_lod)
            if tree is not None:
                cfg = dataclasses.replace(cfg, tree=tree)
        except ValueError as e:
            raise MCSessionError(str(e)) from None
        # a question must be able to open what it asks about before the answer: enough allocator iterations
        # for a coarsest gist to reach raw in one refocus (children inherit a gist's score, mc/allocator.py)
        cfg = dataclasses.replace(cfg, allocator_iterations=max(cfg.allocator_iterations, cfg.max_lod))
        interval = cfg.infer_refocus_interval if refocus_interval is None else refocus_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise MCSessionError(f"--mc_infer_refocus_interval={interval!r} must be an integer >= 1")
        if W is None:
            W = min(cfg.wc_length(seq_len) + interval, seq_len)
        if isinstance(W, bool) or not isinstance(W, int) or W < 1:
            raise MCSessionError(f"the working-context budget W={W!r} must be an integer >= 1")
        if W > seq_len:
            raise MCSessionError(f"W={W} exceeds the model's sequence_len={seq_len}: the working context (and its KV "
                                 f"cache) holds up to W entries; lower W (--mc_infer_wc_length)")
        if W - interval <= cfg.recent_tokens:
            raise MCSessionError(f"W={W} - refocus_interval={interval} = {W - interval} must exceed "
                                 f"--allocator_recent_tokens={cfg.recent_tokens} (the raw tail): a history longer than "
                                 f"W is refocused to W - refocus_interval entries; raise W (--mc_infer_wc_length) or "
                                 f"lower --mc_infer_refocus_interval")
        self.model, self.mc_modules, self.cfg = model, mc_modules, cfg
        self.lensnet = mc_modules.lensnet
        # the GPT's layer-0 keys of the history (mc/keymatch.py): the keymatch focus, or a LensNet that reads them
        self.match = getattr(self.lensnet, "match", False) and cfg.infer_focus == "lensnet"
        folder = None  # --mc_tree disk: the history's files go there (module docstring, Memory)
        if cfg.tree == "disk":
            folder = tree_dir if tree_dir is not None else os.path.join(get_base_dir(), "mc_tree")
        self.keys = LayerZeroKeys(model, folder) if cfg.infer_focus == "keymatch" or self.match else None
        self.W, self.refocus_interval = W, interval
        self.max_entries = W  # the hard cap on WC entries (and KV cache slots), decoded tokens included
        self.fit_budget = W - interval  # a refocus of a history longer than W fits it to this: headroom
        self.device = torch.device(device) if device is not None else model.get_device()
        self.telemetry = telemetry or NoOpTelemetryProvider()
        self.session_id = session_id or uuid.uuid4().hex[:12]
        self.ingest_chunk = ingest_chunk
        self.generator = torch.Generator().manual_seed(seed)  # stochastic_greedy draws (CPU, like the allocator)
        self.bs, self.max_lod = cfg.block_size, cfg.max_lod
        c = model.config
        self.head_dim = c.n_embd // c.n_head
        self.rope_fraction = c.rope_fraction
        self.tree = MegaContextTree(mc_modules.gistnet, cfg.block_size, cfg.max_lod, cache_lod0=False, disk_dir=folder)
        self._ids, self._plan = AppendBuffer(torch.int32, folder), AppendBuffer(torch.int8, folder)
        self._starts, self._lods = AppendBuffer(torch.long), AppendBuffer(torch.long)
        self.marks = None  # allocator hysteresis: the last refocus's edits, long [M, 3] (mc/entry_allocator.py)
        self.kv = KVCache(1, c.n_kv_head, seq_len, self.head_dim, c.n_layer, device=self.device)
        self._logits = None  # [V] after the last cached entry
        self._rope = None  # (first position, cos, sin) table for decode steps (_cos_sin)
        self._since_refocus = 0
        self.last = {}  # the last refocus's metrics
        self.totals = dict(refocuses=0, expands=0, collapses=0, forced=0, reprefill_entries=0, forward_entries=0,
                           generated_tokens=0, ingested_tokens=0, max_kv_entries=0, swap_rate_sum=0.0,
                           refocus_ms=0.0)
        self._window = dict(generated=0, busy_s=0.0)  # since the last inference_update

    # ------------------------------------------------------------------ views
    @property
    def num_tokens(self) -> int:
        return self._ids.n

    @property
    def num_entries(self) -> int:
        return self._starts.n

    @property
    def plan(self) -> torch.Tensor:
        """int8 [1, T] (CPU): the level of detail of every history token."""
        return self._plan.view()[None]

    @property
    def state(self) -> torch.Tensor | None:
        """The allocator's hysteresis as mc/allocator.py's per-token state, int8 [1, T] (CPU; None before the
        first refocus). O(T): for the saved session (mc/infer/store.py) and the tests, not the refocus."""
        return state_from_marks(self.marks, self.num_tokens)

    @state.setter
    def state(self, state: torch.Tensor | None):
        self.marks = marks_from_state(state)

    def token_ids(self) -> torch.Tensor:
        """int32 [T] (CPU): the whole history."""
        return self._ids.view()

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(span_start, lod), long [L] each (CPU): the working context in order."""
        return self._starts.view(), self._lods.view()

    def memory_bytes(self) -> dict:
        """Bytes held per part in RAM (allocations, spare capacity included), and "mapped": the bytes of a disk
        tree's files (ids, plan, gists, layer-0 keys), resident only while the pages are in use."""
        tree = self.tree.nbytes()
        hist = self._ids.nbytes() + self._plan.nbytes() + (0 if self.marks is None else 8 * self.marks.numel())
        hist += 0 if self.keys is None else self.keys.nbytes()
        kv = 0 if self.kv.k is None else 2 * self.kv.k.numel() * self.kv.k.element_size()
        wc = self._starts.nbytes() + self._lods.nbytes()
        mapped = self.tree.mapped_bytes() + self._ids.mapped_bytes() + self._plan.mapped_bytes()
        mapped += 0 if self.keys is None else self.keys.mapped_bytes()
        return {"tree": tree, "history": hist, "working_context": wc, "kv_cache": kv, "mapped": mapped}

    def release(self):
        """A disk tree: drop its files' pages from resident memory (mc/mapped.py); the next reads fault in what
        they need. Each refocus ends with it. Nothing to do in RAM."""
        for part in (self.tree, self._ids, self._plan, self.keys):
            if part is not None:
                part.release()

    # ------------------------------------------------------------------ history
    @torch.inference_mode()
    def ingest(self, token_ids):
        """Append tokens (a prompt, a user turn, a document, ...) to the history. Refocuses (once per call)
        when refocus_interval tokens have arrived since the last refocus, or at once when the WC would
        hold more than W entries (module docstring, Budget)."""
        self._add(token_ids)
        if self.num_entries > self.W or self._since_refocus >= self.refocus_interval:
            self.refocus()

    @torch.inference_mode()
    def append_token(self, token_id: int):
        """One generated (or forced) token; the next next_logits() feeds it through the GPT."""
        t0 = time.perf_counter()
        self.ingest([int(token_id)])
        self.totals["generated_tokens"] += 1
        self._window["generated"] += 1
        self._window["busy_s"] += time.perf_counter() - t0

    def _add(self, token_ids):
        V = self.model.config.vocab_size
        wte = self.model.transformer.wte
        if isinstance(token_ids, (list, tuple)) and len(token_ids) == 1 and isinstance(token_ids[0], int):
            tok = token_ids[0]  # the decode step: one token, plain Python where possible
            if not 0 <= tok < V:
                raise ValueError(f"token ids must lie in [0, {V}) (the model's vocab_size), got {tok}")
            self.tree.append(wte(torch.tensor([[tok]], device=self.device)))
            T = self.num_tokens
            for buf, value in ((self._ids, tok), (self._plan, 0), (self._starts, T), (self._lods, 0)):
                buf.append(value)
            self._since_refocus += 1
            self.totals["ingested_tokens"] += 1
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
        n = ids.numel()
        if n == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"token ids must lie in [0, {V}) (the model's vocab_size)")
        for chunk in ids.split(self.ingest_chunk):  # bounded GistNet batch for huge documents
            self.tree.append(wte(chunk.to(self.device))[None])
        T0 = self.num_tokens
        self._ids.extend(ids.to(torch.int32))
        self._plan.extend(torch.zeros(n, dtype=torch.int8))  # new tokens are raw...
        self._starts.extend(torch.arange(T0, T0 + n))  # ...and each is one new entry at the end
        self._lods.extend(torch.zeros(n, dtype=torch.long))
        self._since_refocus += n
        self.totals["ingested_tokens"] += n

    def _set_plan(self, plan: torch.Tensor, first_changed: int = 0):
        """Install a new plan [1, T] and recompute the entry list from the first changed token on: entries
        starting before t0 = first_changed rounded down to a top-level span are unchanged (an aligned
        t0 keeps every level's alignment in the suffix), so the work is O(T - t0), not O(T)."""
        top = self.bs ** self.max_lod
        t0 = first_changed // top * top
        self._plan.set(plan[0].to(torch.int8))
        keep = int(torch.searchsorted(self._starts.view(), t0)) if t0 else 0
        tail = plan[:, t0:]
        starts = entry_starts(tail, self.bs, max_level=self.max_lod)[0].nonzero()[:, 0]
        self._starts.n, self._lods.n = keep, keep
        self._starts.extend(starts + t0)
        self._lods.extend(tail[0, starts].long())

    def _set_entries(self, start: torch.Tensor, lod: torch.Tensor, edits):
        """Install the entry list the entry allocator returned; the per-token plan follows edit by edit, so the
        work is the edited spans, not the history."""
        plan = self._plan.view()
        for _, _, s, span, level in edits:
            plan[s: s + span] = level
        self._starts.set(start)
        self._lods.set(lod)

    # ------------------------------------------------------------------ the working context
    def _embed(self, a: int, b: int, raw_only: bool = False) -> torch.Tensor:
        """[b - a, C] input embeddings of entries a..b-1: wte(id) for raw tokens, the tree's gist otherwise."""
        starts, lods = self._starts.view()[a:b], self._lods.view()[a:b]
        wte = self.model.transformer.wte
        raw_ids = self._ids.view()
        if raw_only:  # the decode step: only raw tokens
            return wte(raw_ids[starts].long().to(self.device))
        out = torch.empty(b - a, wte.embedding_dim, dtype=wte.weight.dtype, device=self.device)
        for level in range(self.max_lod + 1):  # a loop over levels, not entries
            m = lods == level
            if not bool(m.any()):
                continue
            idx = starts[m]
            rows = wte(raw_ids[idx].long().to(self.device)) if level == 0 else \
                self.tree.level(level)[0, (idx // self.bs ** level).to(self.device)]
            out[m.to(self.device)] = rows.to(out.dtype)
        return out

    def _cos_sin(self, a: int, b: int, raw_only: bool = False):
        """(cos, sin) [1, b - a, 1, hd/2] for entries a..b-1. Raw-only chunks (decode steps) are consecutive
        positions: sliced from a table of the next 1024 positions, refreshed when they pass its end (a raw
        token has span 1, where gaussian == simple, mc/positions.py)."""
        starts, lods = self._starts.view()[a:b], self._lods.view()[a:b]
        if raw_only:
            p, n = int(starts[0]), b - a
            if self._rope is None or not self._rope[0] <= p <= p + n <= self._rope[0] + self._rope[1].size(1):
                pos = torch.arange(p, p + max(n, 1024), device=self.device)
                self._rope = (p, *rope_cos_sin(pos[None], self.head_dim, rope_fraction=self.rope_fraction))
            p0, cos, sin = self._rope
            return cos[:, p - p0: p - p0 + n], sin[:, p - p0: p - p0 + n]
        span = torch.tensor(self.bs).pow(lods)
        pos = (starts + span - 1).to(self.device)  # last token of the span (as in training)
        return rope_cos_sin(pos[None], self.head_dim, span.to(self.device)[None], self.cfg.positional_type,
                            rope_fraction=self.rope_fraction)

    def working_context(self) -> WorkingContext:
        """The current WC as a mc.working_context.WorkingContext [1, L] (no padding)."""
        starts, lods = (x.to(self.device)[None] for x in self.entries())
        span = torch.tensor(self.bs, device=self.device).pow(lods)
        L = starts.size(1)
        return WorkingContext(self._embed(0, L)[None], (starts + span - 1).float(), lods, starts, span,
                              torch.ones(1, L, dtype=torch.bool, device=self.device),
                              torch.zeros(1, dtype=torch.long, device=self.device))

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """float32 [V]: the next-token distribution's logits given the whole history. Feeds every entry
        not in the KV cache yet (new tokens, or the re-prefill after a refocus) in one forward."""
        t0 = time.perf_counter()
        n, c = self.num_entries, self.kv.get_pos()
        if n == 0:
            raise ValueError("the session is empty: ingest at least one token (e.g. the BOS token) first")
        if c < n or self._logits is None:
            if c == n:  # nothing new but no logits kept: recompute the last entry
                self.kv.set_pos(c - 1)
                c -= 1
            if n > self.W:  # cannot happen: ingest refocuses before the WC passes W (<= sequence_len)
                raise RuntimeError(f"working context of {n} entries exceeds W={self.W}")
            raw_only = not bool(self._lods.view()[c:n].any())
            logits = self.model(inputs_embeds=self._embed(c, n, raw_only)[None],
                                cos_sin_override=self._cos_sin(c, n, raw_only), kv_cache=self.kv, last_only=True)
            self._logits = logits[0, -1]
            self.totals["forward_entries"] += n - c
            self.totals["max_kv_entries"] = max(self.totals["max_kv_entries"], n)
        self._window["busy_s"] += time.perf_counter() - t0
        return self._logits

    def generate(self, max_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 42,
                 stop_tokens=()):
        """Yield up to max_tokens sampled token ids (each appended to the history); stops after a stop token."""
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed)
        stop = set(stop_tokens)
        for _ in range(max_tokens):
            tok = int(sample_next_token(self.next_logits()[None], rng, temperature, top_k)[0, 0])
            self.append_token(tok)
            yield tok
            if tok in stop:
                return

    # ------------------------------------------------------------------ refocus
    def _capacity_error(self, e):
        bs, L, R = self.bs, self.max_lod, self.cfg.recent_tokens
        cap = max(self.fit_budget - R - L * (bs - 1), 0) * bs ** L
        return HistoryTooLongError(
            f"the history of {self.num_tokens} tokens no longer fits the MegaContext working context even fully "
            f"compressed (W={self.W} entries, refocused to W - refocus_interval = {self.fit_budget}, "
            f"--mc_block_size={bs}, --mc_max_lod={L}, --allocator_recent_tokens={R}; this W holds about {cap} "
            f"tokens; --mc_infer_max_lod={self.cfg.infer_max_lod} stops the tree from growing further). Start a new "
            f"chat, raise --mc_infer_max_lod, or use a larger W ({e})")

    def _allocate(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PlanDoesNotFitError as e:
            raise self._capacity_error(e) from None

    def _grow_to_fit(self):
        """Grow the tree a level at a time (mc/tree.py grow: the same GistNet one level up) while even the
        most compressed covering of the history would not fit the refocus budget, up to --mc_infer_max_lod;
        past that the refocus raises HistoryTooLongError. The plans may then use the new level."""
        budget = self.fit_budget if self.num_tokens > self.W else self.W
        while (self.max_lod < self.cfg.infer_max_lod and
               min_variant_entries(self.num_tokens, self.bs, self.max_lod, self.cfg.recent_tokens) > budget):
            self.tree.grow()
            self.max_lod += 1
            self.cfg = dataclasses.replace(self.cfg, max_lod=self.max_lod,
                                           allocator_iterations=max(self.cfg.allocator_iterations, self.max_lod))

    def _limit(self) -> int:
        """The first token of the raw tail (--allocator_recent_tokens)."""
        return max(self.num_tokens - self.cfg.recent_tokens, 0)

    def _hard_fit(self):
        """Forced collapses only (all scores 0, thresholds out of reach): entries -> <= W. Returns stats.
        Run before LensNet when a long ingest left more than W entries, so it never reads more than the
        model does; LensNet's scores then choose what goes to reach the refocus budget."""
        cfg = dataclasses.replace(self.cfg, allocator_expand_threshold=2.0, allocator_collapse_threshold=-2.0)
        start, lod = self.entries()
        zero = SpanScores.of_entries(start, lod, torch.zeros(start.numel()), self.bs)
        start, lod, self.marks, edits, stats = self._allocate(allocate_entries, start, lod, zero, self.W, cfg,
                                                              self.bs, self.max_lod, self._limit(), self.marks)
        self._set_entries(start, lod, edits)
        return stats

    @torch.inference_mode()
    def refocus(self, block_scores: torch.Tensor | None = None) -> dict:
        """LensNet + allocator (mc.focus.refocus), then truncate the KV cache at the first changed entry.
        Returns this refocus's metrics (also in stats()["last"] and sent as telemetry). block_scores [1, n_blocks]:
        open the blocks these scores single out instead of asking the focus policy (mc.keymatch.keymatch_refocus;
        evaluation uses it for ORACLE, the needle's blocks by ground truth)."""
        if self.num_tokens == 0:
            return {}
        t0 = time.perf_counter()
        old_starts, old_lods = (x.clone() for x in self.entries())
        cached = self.kv.get_pos()
        self._grow_to_fit()
        forced = int(self._hard_fit()["forced"][0]) if self.num_entries > self.W else 0  # fit before LensNet reads
        # a history that fits W keeps every token (the plain model); a longer one is fitted with headroom
        budget = self.W if self.num_tokens <= self.W else self.fit_budget
        if block_scores is not None or (self.keys is not None and not self.match):
            z = self._keymatch_scores() if block_scores is None else block_scores
            start, lod, self.marks, edits, info = self._allocate(keymatch_refocus, *self.entries(), z, budget,
                                                                 self.cfg, self._limit())
            self._set_entries(start, lod, edits)
        else:  # on the entry list: O(W), whatever the history's length (mc/entry_allocator.py)
            z, room = self._lens_match() if self.match else (None, 0)
            wc = self.working_context() if self.lensnet is not None else self._score_free_wc()
            start, lod, self.marks, edits, info = self._allocate(refocus_entries, self.lensnet, wc, self.cfg, budget,
                                                                 self._limit(), self.marks, self.generator,
                                                                 match_z=z, room=room)
            self._set_entries(start, lod, edits)
        # KV: entries starting before the first changed token are unchanged (module docstring)
        starts, lods = self.entries()
        moved = refocus_moves(old_starts, old_lods, starts, lods, cached, self.num_tokens, self.bs, self.max_lod)
        self.kv.set_pos(moved["kept"])
        if moved["kept"] < cached:
            self._logits = None
        n = self.num_entries
        last = dict(swap_rate=moved["swap_rate"], residency=moved["residency"],
                    reprefill_entries=moved["reprefill_entries"], first_changed_entry=moved["first_changed_entry"],
                    expands=int(info["expands"][0]), collapses=int(info["collapses"][0]),
                    forced=forced + int(info["forced"][0]), iterations=int(info["iterations"]),
                    budget_used=n / self.W, wc_entries=n, history_tokens=self.num_tokens,
                    refocus_ms=1000 * (time.perf_counter() - t0))
        add_refocus(self.totals, last)
        self.last = last
        self._since_refocus = 0
        self._emit(last)
        self.release()
        return dict(last)

    def _lens_match(self):
        """(match_z [1, n_blocks], room): the content match a LensNet with --lensnet_match=1 reads, and the
        entries to free first: a question that singles out a block gets room to open it (and its neighbour)
        from the coarsest level."""
        z = self.keys.tail_scores(self.token_ids(), self._limit(), self.bs)
        room = KEYMATCH_MAX_BLOCKS * self.max_lod * (self.bs - 1) if bool((z >= KEYMATCH_MIN_Z).any()) else 0
        return z, room

    def _keymatch_scores(self) -> torch.Tensor:
        """[1, n_blocks] block scores for the history's last token as the query (mc/keymatch.py)."""
        ids = self.token_ids()
        self.keys.extend(ids)
        return block_scores(self.keys.view()[None], self.keys.query(ids, self.num_tokens - 1), self.bs)

    def _score_free_wc(self) -> WorkingContext:
        """Fixed focus: the scores are all 0, so the entries' spans are all it needs (no embeddings)."""
        starts, lods = (x[None] for x in self.entries())
        span = self.bs ** lods
        L = starts.size(1)
        return WorkingContext(torch.zeros(1, L, 0), (starts + span - 1).float(), lods, starts, span,
                              torch.ones(1, L, dtype=torch.bool), torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------ metrics (mc/infer/session_metrics.py)
    def stats(self) -> dict:
        """Counters since the session started, its memory and the last refocus's metrics (session_metrics.stats)."""
        return session_stats(self)

    def _emit(self, last: dict):
        emit_refocus_events(self, last)
