"""
MCTrainStep: the trainer's side of an MC micro-step (scripts/base_train.py), around an MCController.

- global row ids from the loader contract (micro-batch k of optimizer step n on rank r holds global rows
  n*R + (k*world + r)*B + [0, B), R = total_batch_size / T, nanochat/dataloader.py), which seed the
  variants of each row, so any micro-batch/process split draws the same variants;
- the once-per-optimizer-step commit of LensNet's EMAs (after the step's last micro-batch forward,
  all-reduced over ranks), see MCController.commit_step;
- metric/timing accumulation between log lines (MetricMeter) and the log-time summary (W&B dict,
  telemetry, band alerts, one compact stdout line); MC_MEMORY_DEBUG snapshots at log steps.
Plus describe() (the start-up lines) and raise_recompile_limit() (torch.compile and the packed shapes).
Pretraining (scripts/base_train.py) and the chat stages (scripts/mid_train.py: midtraining and SFT) run
their MC micro-steps through this one class, and every stage writes its state_dict() as meta["mc_train_state"]
(a resumed stage reloads it; a new chat stage starts LensNet's EMAs afresh, its data having another ΔNLL
scale; chat_rl, which does not train MC, carries weights and state through unchanged).
"""

import math
import os
import traceback

import torch

from mc.config import MCConfig
from mc.ops.telemetry import emit_training_metrics
from mc.train.controller import MCController, MCControllerError
from mc.train.prepare import PrepareWorker
from mc.train.timing import MetricMeter
from nanochat.common import autocast_ctx
from nanochat.training import all_reduce_sum


class MCTrainStep:
    """The trainer's MC micro-step: __call__(x, y, step, micro, log_step) -> (loss, lm_loss); log(...) at log time;
    state_dict()/load_state_dict() for checkpoints (LensNet's EMAs)."""

    def __init__(self, controller: MCController, rows_per_step: int, B: int, rank: int, world_size: int,
                 report_dir: str, memory_debug: bool = False, fail=None, telemetry=None):
        """fail(message): called (after printing the traceback) when the MC step fails, e.g. the trainer's
        die(); it must not return. Default: the MCControllerError propagates.
        telemetry: a mc.ops.telemetry provider; log() emits mc_timing and mc_batch_counters to it."""
        self.controller, self.rows_per_step, self.B = controller, rows_per_step, B
        self.rank, self.world_size = rank, world_size
        self.report_dir, self.memory_debug, self.fail = report_dir, memory_debug, fail
        self.telemetry = telemetry
        self.meter = MetricMeter()
        self.grad_accum_steps = rows_per_step // (B * world_size)
        self.last_result = None  # the last MCResult (the trainer's NonFiniteGuard names its loss parts)
        self.worker = PrepareWorker(controller) if controller.cfg.async_prepare else None  # --mc_async
        from mc.ops.alerts import BandMonitor  # the seed-003 telemetry bands (train/mfu is the trainer's)

        device_type = controller.model.get_device().type
        bands = ("mc/adv_delta_mean", "mc/adv_delta_p95", "mc/token_loss", "mc/variants_total",
                 "mc/preference_corr_mean", "mc/lens_loss")
        if device_type == "cuda":  # the 200 ms latency band is a GPU figure; tiny CPU runs always exceed it
            bands += ("mc/time_controller_ms",)
        cfg = controller.cfg
        fixed = not (cfg.dynamic_variants or cfg.positions_budget)  # else N_t varies: the band only checks for 0
        self.alerts = BandMonitor(device_type, cfg.num_random_variants if fixed else None, B, warmup_steps=100,
                                  telemetry=telemetry, only=bands)

    def state_dict(self) -> dict:
        return {"lens": self.controller.lens_state_dict()}

    def load_state_dict(self, state: dict | None):
        self.controller.load_lens_state((state or {}).get("lens"))

    def _failed(self, e: MCControllerError, what: str):
        if self.fail is None:
            raise e
        traceback.print_exc()
        self.fail(f"{e}\n{what}")

    def __call__(self, x, y, step: int, micro: int, log_step: bool = False, step_first_row: int | None = None):
        """(loss, lm_loss) of micro-batch `micro` of optimizer step `step`. step_first_row: the global index of
        the step's first row when the loader counts rows itself (the chat stages' ChatLoader); default
        step * rows_per_step (the pretraining loader's contract)."""
        row0 = self._first_row(step, micro, step_first_row)
        row_ids = torch.arange(row0, row0 + x.size(0), device=x.device)
        memory_log = None
        if self.memory_debug and log_step and micro == 0:
            os.makedirs(self.report_dir, exist_ok=True)
            suffix = f"_rank{self.rank}" if self.rank else ""
            memory_log = os.path.join(self.report_dir, f"mc_memory_step{step + 1}{suffix}.txt")
        try:
            prepared = self._take(step, micro, row0, x)
            with autocast_ctx(x.device.type):  # the trainer's autocast (bf16 on CUDA), as for the vanilla forward
                result = self.controller.process_batch(x, y, step, row_ids=row_ids, memory_log=memory_log,
                                                       prepared=prepared)
        except MCControllerError as e:
            self._failed(e, "training stopped: the MegaContext step failed (no fallback to the vanilla loss)")
        if micro == self.grad_accum_steps - 1:
            # after the step's last forward: every micro-batch of this step used the same EMA values
            self.controller.commit_step(all_reduce_sum)
        self.last_result = result
        self.meter.add(result.metrics)
        self.meter.add_timer(result.timer, prefix="mc/time_")
        return result.loss, result.lm_loss

    def _first_row(self, step: int, micro: int, step_first_row: int | None) -> int:
        first = step * self.rows_per_step if step_first_row is None else step_first_row
        return first + (micro * self.world_size + self.rank) * self.B

    def prefetch(self, x, y, step: int, micro: int, step_first_row: int | None = None):
        """--mc_async: start building micro-batch `micro` of step `step` (the next one the trainer will pass to
        __call__) in the worker thread, so it is ready when its turn comes (mc/train/prepare.py). Call it after
        the current micro-batch's __call__ (which commits a finished step's EMAs first). No-op without --mc_async."""
        if self.worker is None:
            return
        row0 = self._first_row(step, micro, step_first_row)
        self.worker.submit((step, micro, row0), x, y, step, torch.arange(row0, row0 + x.size(0), device=x.device))

    def _take(self, step: int, micro: int, row0: int, x):
        """The worker's Prepared for this micro-batch (None without --mc_async or when none was submitted for it);
        a failure in the worker surfaces here, named."""
        if self.worker is None:
            return None
        try:
            return self.worker.take((step, micro, row0), x)
        except Exception as e:
            raise MCControllerError(f"MegaContext controller failed preparing micro-batch {micro} of step {step} in "
                                    f"the --mc_async worker: {type(e).__name__}: {e}") from e

    def close(self):
        """Stop the --mc_async worker (at the end of training)."""
        if self.worker is not None:
            self.worker.close()

    def log(self, step: int, step_ms: float, grad_accum_steps: int):
        """(metrics for W&B, one stdout line) averaged since the last call. Non-finite MC losses are named
        in the line; stopping (or skipping the step) is the trainer's NonFiniteGuard's job, which runs
        before this (--nonfinite=stop never gets here). The controller's share of a step = its per-micro-step time x accum
        / step time (its forwards included); build share = tree + sampling, the work vanilla never does."""
        try:
            m = self.meter.means()
        finally:
            self.meter.reset()
        bad = [name for name in ("mc/token_loss", "mc/total_loss", "mc/lens_loss") if not math.isfinite(m.get(name, 0.0))]
        m["mc/grad_accum_steps"] = grad_accum_steps
        m["mc/time_step_ms"] = step_ms
        m["mc/controller_share"] = m.get("mc/time_controller_ms", 0.0) * grad_accum_steps / max(step_ms, 1e-9)
        m["mc/build_share"] = m.get("mc/time_build_ms", 0.0) * grad_accum_steps / max(step_ms, 1e-9)
        if self.telemetry is not None:
            emit_training_metrics(self.telemetry, step, m)
        nan = float("nan")
        lods = " ".join(f"L{k.rsplit('/', 1)[1]} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("mc/lod_loss/"))
        line = (f"  mc | tok {m.get('mc/token_loss', nan):.4f} | base {m.get('train/loss_lod0', nan):.4f} | {lods}"
                f" | Δ {m.get('mc/adv_delta_mean', nan):+.3f} (p95 {m.get('mc/adv_delta_p95', nan):+.3f})"
                f" | W {m.get('mc/wc_length', 0):.0f} | N {m.get('mc/variants_per_sample', 1) - 1:.3g} | ctl {m.get('mc/time_controller_ms', 0):.0f}ms×{grad_accum_steps}"
                f" = {100 * m['mc/controller_share']:.0f}% of step (build {100 * m['mc/build_share']:.0f}%)")
        if bad:
            line += f"\n  mc | non-finite {', '.join(bad)} in this log interval (steps skipped by --nonfinite=skip)"
        line += "".join("\n" + a.line for a in self.alerts.check(step, m))
        if "mc/lens_loss" in m:
            line += (f"\n  lens | loss {m['mc/lens_loss']:.4f} | pref corr {m.get('mc/preference_corr_mean', nan):+.3f}"
                     f" | span corr {m.get('mc/pref_span_corr', nan):+.3f} | |score| {m.get('mc/policy_score_abs_mean', nan):.3f}"
                     f" | pairs {m.get('mc/lens_pairs', nan):.1f}")
        return m, line


def describe(cfg: MCConfig, plan, T: int, n_params: int) -> str:
    """The trainer's start-up lines about MC (plan: mc.train.auto_batch.BatchPlan)."""
    text = (f"megacontext: W={cfg.wc_length(T)} entries (anneal from {cfg.wc_anneal_start_frac:g}×T), "
            f"{cfg.num_random_variants} variants + recency baseline per row"
            f"{' (fewer as the ΔNLL spread falls, at least ' + str(cfg.min_variants) + ')' if cfg.dynamic_variants else ''}"
            f"{f' (within {cfg.positions_budget:g} GPT positions per token)' if cfg.positions_budget else ''}"
            f", block {cfg.block_size}, max LOD "
            f"{cfg.max_lod}, GistNet {cfg.gistnet_type} ({n_params:,} params); auto-batch "
            f"{'on' if cfg.auto_batch else 'off'}: {plan.device_batch_size} rows × {plan.grad_accum_steps} accum "
            f"(row cost ≈{plan.multiplier:.2f}× vanilla, divisor {plan.divisor})")
    if cfg.auto_batch and not plan.fits:
        text += (f"\nmegacontext: warning: an MC row costs ≈{plan.multiplier:.2f}× a vanilla row but the micro-batch "
                 f"cannot shrink below 1 row; expect more memory than the vanilla run")
    return text


def raise_recompile_limit(limit: int = 64):
    """torch.compile: the packed forward sees a new padded length each time W crosses a pad quantum (at
    most ~16 over a run); keep dynamo from falling back to eager after its default 8 recompiles."""
    # torch._dynamo is heavy to import and only a compiled run needs it
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), limit))

