"""
MCController: one MegaContext training step for a micro-batch, as orchestration of pure functions.

    result = MCController(model, mc_modules, mc_config, total_steps=N).process_batch(x, y, step, row_ids)
    result.loss.backward()

For x, y [B, T] (y = x shifted by one; x_full = x with y's last token appended, [B, T+1]):

  tree    E = wte(x) is LOD0; GistNet gists every block of every sample, one call per level
          (mc/tree.py), with gradients into GistNet and wte.
  sample  W_t = annealed_wc_length(step) (mc/train/variants.py). Per sample the recency baseline (last W_t raw
          tokens) and N = N_t compressed variants (mc/train/variant_budget.py), all as plans, their random keys hashed from the global row
          id (split-independent: any micro-batch/process split draws the same variants for a row).
          build_working_context gathers the entries of all R = B(1+N) rows at once, right-aligned and
          padded to L slots (L = W_t rounded up to a multiple of pad_quantum, so a compiled GPT sees
          few shapes). targets_for(wc, x_full): the entry spanning [s, s+n) predicts x_full[s+n].
          wc_cos_sin: per-entry rotary tables (mc/positions.py), so every row has its own positions.
  base    lm_loss = GPT(x, y): the ordinary full-sequence next-token loss (keeps the model a plain LM,
          and is what train/loss reports, comparable with a vanilla run).
  variant ONE packed GPT forward over all R rows: inputs_embeds [R, L, C], cos/sin [R, L, 1, hd/2],
          key_padding_mask = valid, loss_reduction='none' -> per-entry NLL [R, L].
          row_loss_r = mean NLL over row r's entries;  variant_loss = mean over samples of the mean over
          that sample's distinct rows (a plan drawn k times weighs 1/k: dedup with fixed shapes, no sync).
          horizon: the last H = recent_tokens (>= 1, MCConfig checks) slots of every row hold the same raw tokens
          T-H..T-1 predicting the same targets in every row (the shared raw tail), so
          h_r = mean NLL over those slots, and ΔNLL_{b,v} = h_{b,v} - h_{b,baseline}.
          penalty = mean_{b,v} relu(h_{b,v} - stopgrad(h_{b,baseline}))  (the baseline is the reference,
          not something to make worse).
  lens    (when the modules have a LensNet) scores = LensNet(wc) over all R rows in one call (its inputs
          detached: this loss trains LensNet only), and lens_loss = the Bradley–Terry preference loss
          on the measured ΔNLL of the sample's variants (mc/train/lens_loss.py; pair weights from the
          advantage normaliser, optional KL and budget-smoothing terms per the --mc_lens_* knobs).
  loss    lm_loss + variant_loss + gist_delta_weight * penalty + lens_loss_weight * lens_loss.

LensNet's EMAs (advantage scale, budget mean) advance once per optimizer step: commit_step() after the
step's last micro-batch (mc/train/train_step.py does it), all-reduced over ranks, so they are the same on
every rank and for every micro-batch split; lens_state_dict()/load_lens_state() carry them through
checkpoints (they are the only controller state).

Metrics (0-d tensors, never synced here; MetricMeter/float_metrics() convert them at log time):
  mc/lod_loss/L     mean NLL of entries at level of detail L (all rows)
  mc/lod_frac/L     the LOD mix: fraction of the compressed variants' entries at level L
  mc/lod_delta/L    paired cost of context form: for entries at level L in compressed variants whose
                    target token t the baseline also predicts (t - 1 inside the baseline's window),
                    mean of NLL_variant(t) - NLL_baseline(t). L = 1: what predicting the next token
                    from a gist costs against the raw tokens; L = 0: what the compressed far history
                    changes for raw tokens against the truncated one (negative = it helps)
  mc/adv_delta_mean|p95|std   statistics of ΔNLL over the B*N compressed variants
  train/loss_lod0   the recency baselines' mean loss;  mc/token_loss  variant_loss;  mc/lm_loss
  mc/gist_penalty, mc/total_loss, mc/wc_length (W_t), mc/variants_total (B*N compressed variants),
  mc/variants_per_sample (1+N_t: N_t = --mc_num_random_variants, or fewer with --mc_dynamic_variants or
  --mc_positions_budget, mc/train/variant_budget.py), mc/priority_variants (of the N_t, LensNet's proposals),
  mc/effective_batch_size (R rows in the packed forward), mc/prepared_ahead (1 when --mc_async built this
  micro-batch's variants ahead, mc/train/prepare.py; the run's first micro-batch is always built in line),
  mc/horizon_tokens (B*(1+N)*H NLL terms behind the ΔNLL numbers)
  with LensNet: mc/lens_loss, mc/lens_pairs, mc/preference_corr_mean|max, mc/pref_span_corr,
  mc/policy_score_abs_mean, mc/policy_score_std_mean (definitions in mc/train/lens_loss.py)
Timings (ms, mc/time_<phase>_ms): tree, sample (with LensNet's proposals: its pass over the coarsest
  coverings), build (= tree + sample), base_forward, variant,
  lens_forward, lens_loss, metrics, controller (the whole call; forward only, backward is the trainer's).

Dtypes: every tensor that enters the GPT goes through _to_model_dtype (the dtype/device of the GPT's
weights), the caller's autocast applies to the GPT as in the plain training forward, and GistNet and
LensNet run at --mc_aux_dtype (auto: bf16 autocast on CUDA, fp32 elsewhere; weights stay fp32 for the optimizer).
Errors: any exception inside a phase is re-raised as MCControllerError naming the phase and the step.
MC_MEMORY_DEBUG: pass memory_log=<path> and a memory snapshot is written after each phase.

The trainer-side wrapper (row ids, metric averaging, log lines, the once-per-step commit of
LensNet's EMAs) is MCTrainStep in mc/train/train_step.py.
"""

from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mc.allocator import entry_scores_to_token_map
from mc.config import MCConfig
from mc.keymatch import entry_match, tail_block_scores
from mc.positions import wc_cos_sin
from mc.train.lens_loss import AdvantageNormalizer, BudgetSmoother, lens_preference_loss
from mc.train.prepare import Prepared
from mc.train.timing import PhaseTimer, memory_snapshot
from mc.train.variant_budget import VariantBudget
from mc.train.variants import (
    annealed_wc_length,
    duplicate_weights,
    hashed_uniform,
    priority_keys,
    sample_compressed_plans,
    sample_variants,
    unit_starts,
)
from mc.tree import MegaContextTree, min_variant_entries, unit_counts
from mc.working_context import build_working_context, gather_embeddings, targets_for, wc_layout


class MCControllerError(RuntimeError):
    """The MC training step failed; the message names the phase and the step."""


def default_pad_quantum(cfg: MCConfig, sequence_len: int) -> int:
    """Packed rows are padded to multiples of this: max(block_size, T / 16), so as W anneals a compiled
    GPT sees at most ~16 distinct shapes, at a cost of < 1/16 of T extra slots per row."""
    return max(cfg.block_size, sequence_len // 16)


def padded_length(W: int, T: int, quantum: int) -> int:
    """Slots per packed row: W rounded up to a multiple of quantum, at most T (and at least W)."""
    return max(W, min(T, -(-W // quantum) * quantum))


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask; NaN when the mask is empty (no host sync either way)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum()


class PositionalCaches(Mapping):
    """The per-entry rotary tables of one step. `.packed` = (cos, sin) [R, L, 1, hd/2] as fed to the GPT;
    `caches[f"train_step_{step}_sample_{b}"]` = (cos, sin, None) [1+N, L, 1, hd/2] for sample b (the
    seed-004 session-id convention; None = no ALiBi), sliced lazily on access."""

    def __init__(self, cos, sin, step, batch_size, rows_per_sample):
        self.packed = (cos, sin)
        self.step, self.B, self.V = step, batch_size, rows_per_sample

    def _key(self, b):
        return f"train_step_{self.step}_sample_{b}"

    def __getitem__(self, key):
        for b in range(self.B):
            if key == self._key(b):
                s = slice(b * self.V, (b + 1) * self.V)
                return self.packed[0][s], self.packed[1][s], None
        raise KeyError(key)

    def __iter__(self):
        return (self._key(b) for b in range(self.B))

    def __len__(self):
        return self.B


@dataclass
class MCResult:
    loss: torch.Tensor  # scalar with grad: lm_loss + variant_loss + gist_delta_weight * penalty + lens term
    lm_loss: torch.Tensor  # detached full-sequence LM loss (train/loss)
    metrics: dict  # name -> 0-d tensor (detached) or number
    timer: PhaseTimer
    positional_caches: PositionalCaches
    horizon_nll: torch.Tensor  # [B, 1+N] detached, column 0 = recency baseline (LensNet's supervision)
    plans: torch.Tensor  # int8 [B*(1+N), T], rows ordered (sample, variant)
    extras: dict = field(default_factory=dict)

    @property
    def timings(self) -> dict:
        """{"mc/time_<phase>_ms": ms}; on CUDA this waits for the step's work (read at log time)."""
        return {f"mc/time_{k}_ms": v for k, v in self.timer.elapsed_ms().items()}

    def float_metrics(self) -> dict:
        """metrics as Python floats (syncs)."""
        return {k: float(v) for k, v in self.metrics.items()}


class MCController:
    def __init__(self, model, mc_modules, mc_config: MCConfig, forward_model=None, total_steps: int = 0,
                 seed: int = 0, pad_quantum: int | None = None):
        """model: the GPT (weights, wte, config); forward_model: what to call for forwards (e.g. the
        torch.compile'd model; default model). total_steps: run length, the W anneal spans
        --mc_wc_anneal_steps or, when that is 0, the whole run. seed: mixes into the variant keys."""
        if mc_config.tree != "ram":
            raise ValueError(f"--mc_tree={mc_config.tree} is for inference sessions (chat_cli / chat_web --mc, "
                             f"mc_bench): training builds each batch's tree in memory; drop the flag")
        self.model = model
        self.forward_model = forward_model if forward_model is not None else model
        self.mc_modules = mc_modules
        self.cfg = mc_config
        self.total_steps = total_steps
        self.seed = seed
        self.head_dim = model.config.n_embd // model.config.n_head
        self.pad_quantum = pad_quantum or default_pad_quantum(mc_config, model.config.sequence_len)
        self._targets = {}  # T -> target W (validated once per sequence length)
        self.lensnet = getattr(mc_modules, "lensnet", None)
        self.adv_normalizer = AdvantageNormalizer(mc_config.lens_adv_norm_beta)
        self.budget_smoother = BudgetSmoother(mc_config.lens_budget_smooth_beta)
        self.variant_budget = VariantBudget(mc_config)  # N_t, the variants per sample of a step
        self._budget_checked = set()  # sequence lengths whose positions budget was checked

    # ------------------------------------------------------------------ LensNet's step-level state
    def commit_step(self, all_reduce=None):
        """Fold this optimizer step's statistics into LensNet's EMAs (module docstring). all_reduce:
        sums a tensor over ranks in place (None in one process)."""
        self.adv_normalizer.commit(all_reduce)
        self.budget_smoother.commit(all_reduce)
        self.variant_budget.commit(all_reduce)

    def lens_state_dict(self) -> dict:
        """JSON-serialisable EMA state (syncs with the device: checkpoint time only)."""
        return {"adv_scale": self.adv_normalizer.state_dict(), "budget_mean": self.budget_smoother.state_dict(),
                "variants": self.variant_budget.state_dict()}

    def load_lens_state(self, state: dict | None):
        device = self.model.get_device()
        if state:
            self.adv_normalizer.load_state_dict(state["adv_scale"], device)
            self.budget_smoother.load_state_dict(state["budget_mean"], device)
            self.variant_budget.load_state_dict(state.get("variants"), device)  # absent before the budget existed

    # ------------------------------------------------------------------ helpers
    def _to_model_dtype(self, t: torch.Tensor) -> torch.Tensor:
        """Cast a tensor that enters the GPT to its weights' device and (for floats) dtype."""
        ref = self.model.transformer.wte.weight
        return t.to(device=ref.device, dtype=ref.dtype) if t.is_floating_point() else t.to(ref.device)

    def _aux(self, device_type):
        """(autocast context, input dtype) for GistNet per --mc_aux_dtype."""
        aux = self.cfg.aux_dtype
        if aux == "auto":
            aux = "bf16" if device_type in ("cuda", "meta") else "fp32"
        if device_type == "meta":  # the memory dry run (nanochat/memory.py), which emulates autocast itself
            return nullcontext(), (torch.float32 if aux == "fp32" else None)
        if aux == "fp32":
            return torch.autocast(device_type, enabled=False), torch.float32
        return torch.autocast(device_type, dtype=torch.bfloat16), None

    def target_wc_length(self, T: int) -> int:
        if T not in self._targets:
            if T > self.model.config.sequence_len:
                raise ValueError(f"sequence length {T} exceeds the model's sequence_len {self.model.config.sequence_len}")
            self._targets[T] = self.cfg.validate_against(T)
        return self._targets[T]

    def wc_length(self, step: int, T: int) -> int:
        """W_t, the working-context budget at this step (annealed, see mc/train/variants.py)."""
        steps = self.cfg.wc_anneal_steps or self.total_steps
        return annealed_wc_length(step, steps, self.cfg.wc_anneal_start_frac, self.target_wc_length(T), T)

    def num_variants(self, step: int, T: int) -> int:
        """N_t, the compressed variants per sample at this step (mc/train/variant_budget.py)."""
        if T not in self._budget_checked:
            self.variant_budget.check(self.wc_length(0, T), T)  # the anneal starts at the widest W
            self._budget_checked.add(T)
        return self.variant_budget.variants(step, self.wc_length(step, T), T)

    @contextmanager
    def _phase(self, timer, name, step, memory):
        try:
            with timer(name):
                yield
        except MCControllerError:
            raise
        except Exception as e:
            raise MCControllerError(f"MegaContext controller failed in phase '{name}' at step {step}: "
                                    f"{type(e).__name__}: {e}") from e
        if memory is not None:
            memory.append(f"=== after phase '{name}' (step {step})\n{memory_snapshot(self.model.get_device())}")

    # ------------------------------------------------------------------ the step
    def process_batch(self, x: torch.Tensor, y: torch.Tensor, step: int, row_ids: torch.Tensor | None = None,
                      memory_log: str | None = None, prepared: Prepared | None = None) -> MCResult:
        """x, y: [B, T] long. row_ids: long [B], the global data-row index of each row (default
        step * B + arange(B)). memory_log: a file path to write per-phase memory snapshots to. prepared: this
        micro-batch's prepare(x, y, step, row_ids), built ahead (--mc_async); default: built here."""
        cfg = self.cfg
        timer = PhaseTimer(x.device)
        memory = [] if memory_log else None
        with self._phase(timer, "controller", step, None):
            with self._phase(timer, "build", step, None):
                with self._phase(timer, "tree", step, memory):
                    if x.ndim != 2 or x.shape != y.shape:
                        raise ValueError(f"x and y must both be [B, T], got {tuple(x.shape)} and {tuple(y.shape)}")
                    B, T = x.shape
                    E = self.model.transformer.wte(x)  # LOD0 [B, T, C], with grad
                    aux_ctx, aux_dtype = self._aux(x.device.type)
                    with aux_ctx:
                        tree = MegaContextTree.build(E.to(aux_dtype) if aux_dtype else E, self.mc_modules.gistnet,
                                                     cfg.block_size, cfg.max_lod, cfg.cache_lod0)
                    levels = [E] + tree.levels[1:]
                    if [tuple(t.shape[:2]) for t in levels] != self._level_shapes(B, T):  # the layout's assumption
                        raise ValueError(f"the tree's levels {[tuple(t.shape[:2]) for t in levels]} are not the "
                                         f"shapes the layout assumes, {self._level_shapes(B, T)}")
                with self._phase(timer, "sample", step, memory):
                    ahead = prepared is not None
                    prepared = prepared.ready() if ahead else self.prepare(x, y, step, row_ids)
                    N, L, W = prepared.N, prepared.L, prepared.W
                    V, H, P = 1 + N, max(cfg.recent_tokens, 1), min(cfg.priority_variants, N)
                    if prepared.plans is None:  # LensNet proposes some variants: drawn from this step's tree
                        keys = self._proposed_keys(prepared.keys, levels, E, T, N, P, aux_ctx)
                        self._lay_out(prepared, x, y, keys)
                    vp = prepared.plans
                    wc = gather_embeddings(prepared.wc, prepared.flat, levels)
                    targets, cos, sin = prepared.targets, prepared.cos, prepared.sin
                    emb = self._to_model_dtype(wc.embeddings)
            with self._phase(timer, "base_forward", step, memory):
                lm_loss = self.forward_model(x, y)
            with self._phase(timer, "variant", step, memory):
                nll = self.forward_model(inputs_embeds=emb, targets=targets, cos_sin_override=(cos, sin),
                                         key_padding_mask=self._to_model_dtype(wc.valid),
                                         loss_reduction="none").float()  # [R, L]
                has = targets >= 0
                row_loss = nll.sum(1) / has.sum(1).clamp(min=1)
                # a variant drawn twice for a sample counts once; normalised per sample, so every sample
                # weighs the same and the loss does not depend on how rows are split into micro-batches
                weight = duplicate_weights(vp.plan, V).view(B, V)
                variant_loss = ((row_loss.view(B, V) * weight).sum(1) / weight.sum(1)).mean()
                horizon = nll[:, L - H:].mean(1).view(B, V)  # the shared raw tail, same targets in every row
                delta = horizon[:, 1:] - horizon[:, :1]
                self.variant_budget.observe(delta)
                loss = lm_loss + variant_loss
                penalty = F.relu(horizon[:, 1:] - horizon[:, :1].detach()).mean()
                if cfg.gist_delta_weight > 0:
                    loss = loss + cfg.gist_delta_weight * penalty
            lens_metrics = {}
            if self.lensnet is not None:
                with self._phase(timer, "lens_forward", step, memory):
                    match = self._lens_match(E, wc, T, V) if getattr(self.lensnet, "match", False) else None
                    with aux_ctx:
                        scores = self.lensnet(wc, **({"match": match} if match is not None else {}))  # [R, L]
                with self._phase(timer, "lens_loss", step, None):
                    lens = lens_preference_loss(
                        scores.float(), wc, horizon.detach(), temperature=cfg.lens_temperature,
                        hard_negative_ratio=cfg.lens_hard_negative_ratio, adv_normalizer=self.adv_normalizer,
                        kl_weight=cfg.lens_kl_weight, budget_smoother=self.budget_smoother,
                        budget_weight=cfg.lens_budget_smooth_weight, block_size=cfg.block_size, history_len=T)
                    if cfg.lens_loss_weight > 0:
                        loss = loss + cfg.lens_loss_weight * lens.loss
                    lens_metrics = lens.metrics
            with self._phase(timer, "metrics", step, None):
                metrics = self._metrics(nll.detach(), has, wc, vp.variant_idx, delta.detach(), B, T, V, L, W, H, P)
                metrics.update({"mc/lm_loss": lm_loss.detach(), "mc/token_loss": variant_loss.detach(),
                                "train/loss_lod0": row_loss.detach().view(B, V)[:, 0].mean(),
                                "mc/gist_penalty": penalty.detach(), "mc/total_loss": loss.detach()})
                metrics.update(lens_metrics)
                metrics["mc/prepared_ahead"] = float(ahead)
        if memory is not None:
            with open(memory_log, "w") as f:
                f.write("".join(memory))
        caches = PositionalCaches(cos, sin, step, B, V)
        return MCResult(loss, lm_loss.detach(), metrics, timer, caches, horizon.detach(), vp.plan,
                        extras={"wc": wc, "targets": targets})

    @torch.no_grad()
    def prepare(self, x: torch.Tensor, y: torch.Tensor, step: int, row_ids: torch.Tensor | None = None,
                stream=None, after=None) -> Prepared:
        """The step's weight-independent part (mc/train/prepare.py): N_t, the keys and, unless LensNet proposes
        variants, the plans, layout, targets and rotary tables. stream / after (CUDA, --mc_async): run on this
        side stream once the event `after` has happened (recorded on the main stream after the batch's copy)."""
        if x.ndim != 2 or x.shape != y.shape:
            raise ValueError(f"x and y must both be [B, T], got {tuple(x.shape)} and {tuple(y.shape)}")
        if stream is not None:
            stream.wait_event(after)
        # no autocast here (the layout's float work is cos/sin, which the trainer's autocast would leave alone
        # anyway): the same arithmetic in the worker thread, which has no autocast, and in line
        no_autocast = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()
        with torch.cuda.stream(stream) if stream is not None else nullcontext(), no_autocast:
            cfg = self.cfg
            B, T = x.shape
            W, N = self.wc_length(step, T), self.num_variants(step, T)
            if row_ids is None:
                row_ids = step * B + torch.arange(B, device=x.device)
            units = sum(unit_counts(T, cfg.block_size, cfg.max_lod, cfg.recent_tokens))
            prepared = Prepared(step, W, N, padded_length(W, T, self.pad_quantum), row_ids,
                                hashed_uniform(row_ids.to(x.device), step, self.seed, N, units))
            if not (min(cfg.priority_variants, N) and units):
                self._lay_out(prepared, x, y, prepared.keys)
            if stream is not None:
                prepared.event = torch.cuda.Event()
                prepared.event.record(stream)
        return prepared

    def _level_shapes(self, B: int, T: int) -> list[tuple[int, int]]:
        """(rows, units) of every level of a micro-batch's tree: T tokens, then T // bs**l gists."""
        return [(B, T)] + [(B, n) for n in unit_counts(T, self.cfg.block_size, self.cfg.max_lod, 0)]

    def _lay_out(self, prepared: Prepared, x, y, keys):
        """Fill in the plans, the layout, the targets and the rotary tables of prepared from the variants' keys."""
        cfg, (B, T), W, N, L = self.cfg, x.shape, prepared.W, prepared.N, prepared.L
        vp = sample_variants(B, T, W, N, cfg.block_size, cfg.max_lod, cfg.recent_tokens, device=x.device,
                             dedup=False, keys=keys)
        wc, flat = wc_layout(vp.plan, self._level_shapes(B, T), cfg.block_size, vp.sample_idx, length=L, align="right",
                             check=False)
        x_full = torch.cat([x, y[:, -1:]], dim=1)  # [B, T+1]: every entry gets a target
        cos, sin = wc_cos_sin(wc, self.head_dim, cfg.positional_type, rope_fraction=self.model.config.rope_fraction)
        prepared.plans, prepared.wc, prepared.flat = vp, wc, flat
        prepared.targets = targets_for(wc, x_full)
        prepared.cos, prepared.sin = self._to_model_dtype(cos), self._to_model_dtype(sin)

    @torch.no_grad()
    def _proposed_keys(self, keys: torch.Tensor, levels, E: torch.Tensor, T: int, N: int, P: int,
                       aux_ctx) -> torch.Tensor:
        """keys [B * N, units] with the first P (--mc_priority_variants, at most N) variants of each sample LensNet's proposals
        (mc/train/variants.py): LensNet scores each sample's coarsest covering (no gradient), and every unit takes
        the score of the entry that holds it."""
        cfg, B, units = self.cfg, E.size(0), keys.size(1)
        e_min = min_variant_entries(T, cfg.block_size, cfg.max_lod, cfg.recent_tokens)
        coarse = sample_compressed_plans(B, T, e_min, cfg.block_size, cfg.max_lod, cfg.recent_tokens, device=E.device,
                                         keys=torch.zeros(B, units, device=E.device))  # no expansion fits: k = 0
        wc = build_working_context(coarse, levels, cfg.block_size, torch.arange(B, device=E.device), length=e_min,
                                   align="right", check=False)  # every row holds exactly e_min entries
        with torch.no_grad(), aux_ctx:
            match = self._lens_match(E, wc, T, 1) if getattr(self.lensnet, "match", False) else None
            scores = self.lensnet(wc, **({"match": match} if match is not None else {})).float()
        token_map = entry_scores_to_token_map(coarse, scores, cfg.block_size, cfg.max_lod, check=False)
        unit_scores = token_map[:, unit_starts(T, cfg.block_size, cfg.max_lod, cfg.recent_tokens, E.device)]
        keys = keys.view(B, N, units).clone()
        keys[:, :P] = priority_keys(keys[:, :P], unit_scores[:, None], cfg.priority_temperature)
        return keys.view(B * N, units)

    def _lens_match(self, E: torch.Tensor, wc, T: int, V: int) -> torch.Tensor:
        """[R, L] LensNet's content-match input (mc/keymatch.py): each sample's compressible blocks scored
        against the raw tail whose NLL the variants are compared on, then read per entry of every row."""
        cfg = self.cfg
        B = E.size(0)
        limit = max(T - cfg.recent_tokens, 0) // cfg.block_size * cfg.block_size
        ends = torch.full((B,), T, dtype=torch.long, device=E.device)
        z = tail_block_scores(self.model, E, ends, cfg.recent_tokens, limit, cfg.block_size).repeat_interleave(V, 0)
        return entry_match(z, wc.span_start, wc.lod, wc.valid, cfg.block_size, cfg.max_lod)

    def _metrics(self, nll, has, wc, variant_idx, delta, B, T, V, L, W, H, P) -> dict:
        cfg = self.cfg
        lod = wc.lod
        # the baseline's NLL for target token p sits in its slot L - T + p - 1 (raw token p - 1)
        base = nll.view(B, V, L)[:, 0]  # [B, L]
        p = wc.span_start + wc.span_len
        slot = L - T + p - 1
        in_base = has & (slot >= L - min(W, T))
        base_nll = base[wc.sample_idx].gather(1, slot.clamp(0, L - 1))
        compressed = (variant_idx > 0)[:, None]
        present = [0] + [lvl for lvl, n in enumerate(unit_counts(T, cfg.block_size, cfg.max_lod, cfg.recent_tokens), 1) if n]
        m = {}
        in_compressed = wc.valid & compressed
        n_compressed = in_compressed.sum().clamp(min=1)
        for level in present:
            at = has & (lod == level)
            m[f"mc/lod_loss/{level}"] = masked_mean(nll, at)
            m[f"mc/lod_frac/{level}"] = (in_compressed & (lod == level)).sum() / n_compressed
            m[f"mc/lod_delta/{level}"] = masked_mean(nll - base_nll, at & in_base & compressed)
        d = delta.flatten()
        m["mc/adv_delta_mean"] = d.mean()
        m["mc/adv_delta_std"] = d.std(correction=0)
        m["mc/adv_delta_p95"] = torch.quantile(d, 0.95)
        m["mc/wc_length"] = W
        m["mc/variants_total"] = B * (V - 1)
        m["mc/variants_per_sample"] = V
        m["mc/priority_variants"] = P
        m["mc/effective_batch_size"] = B * V
        m["mc/horizon_tokens"] = B * V * H
        return m
