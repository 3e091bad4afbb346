"""
Telemetry band alerts: the "Telemetry Targets & Alerts" table of the ops guide as code.

    monitor = BandMonitor(device_type, num_random_variants, micro_batch_rows, warmup_steps=100)
    for alert in monitor.check(step, metrics):      # metrics: the W&B dict of a log step
        print0(alert.line)
    # ALERT mc/lens_loss=0.7100 at step 300 outside band (→ 0; investigate: ...): <why>. <what to do>

BANDS lists every band: the metric it reads (the W&B name), the target, the "investigate when" rule in
words, and a note saying what a breach usually means. A metric that is absent from `metrics` is not
checked (a vanilla run has no mc/*, training has no swap rate), so one monitor fits every caller.

Conventions that differ from the seed table, and why:
- ΔNLL@H is mc/adv_delta_mean itself: the controller measures every variant's NLL on the horizon H (the
  shared raw tail) against the recency baseline, so there is no separate horizon metric to read.
- mc/preference_corr_mean (mc/train/lens_loss.py) is corr(s_v, -ΔNLL_v): LensNet's policy score against the
  *negated* ΔNLL, so agreement is POSITIVE (+1 = perfect). The seed's "negative (close to -1)" is the same
  property in corr(s, ΔNLL) convention. We alert when it is not clearly positive after warm-up.
- mc/lens_loss is a Bradley-Terry loss: with tied policy scores every pair costs -log σ(0) = log 2 ≈ 0.693,
  so the seed's absolute "> 0.1" would fire on every healthy run for a long time. We alert when, after
  warm-up, it has not fallen a few percent below the first value we saw (LensNet not learning at all);
  values ≤ 0.1 never alert.
- train/mfu is logged as a fraction (0.45 = 45 %), only on CUDA with a known peak. On other devices the
  band is skipped (monitor.skipped says so): CPU MFU against a GPU peak means nothing.
- mc/time_controller_ms is the mean per micro-step; tiny CPU models exceed 200 ms routinely, so that band
  only warns (severity "warn") and its limit is configurable.
- mc/variants_total counts compressed variants per controller call (= num_random_variants × the rows of
  ONE micro-batch), averaged over the micro-steps of a log interval.

Rate limit: an alert for a metric is printed at most once per `repeat_every` steps; a band that recovers
and breaks again within that window stays quiet. With a telemetry provider each printed alert is also an
`mc_alert` event (mc/ops/telemetry.py).
"""

import math
from collections import deque
from dataclasses import dataclass, field

LOG2 = math.log(2.0)


@dataclass(frozen=True)
class Band:
    metric: str  # the W&B name read from the metrics dict
    target: str  # the healthy range, in words
    investigate: str  # when to look, in words (the rule check() applies)
    note: str  # what a breach usually means / what to do
    after_warmup: bool = True  # rule applies only once step >= warmup_steps
    severity: str = "alert"  # "alert" or "warn"


BANDS = [
    Band("mc/adv_delta_mean", "≤ 0.10 (ΔNLL@H, ≈ 0 ideal)",
         "> 0.15 for 3 checks in a row, or rising monotonically over 5 checks",
         "Gist compression drifting: variants lose more on the horizon than the recency baseline. Check the "
         "tokenizer/data, then the WC sampling (--mc_train_wc_length, --mc_num_random_variants)."),
    Band("mc/adv_delta_p95", "low, close to the mean",
         "rising monotonically over 5 checks (by > 0.05)",
         "The worst variants get worse: random compressions hurt more, or LensNet is not improving utility; "
         "inspect the per-LOD mc/lod_delta/* curves."),
    Band("mc/swap_rate", "0.05–0.20 (inference)", "> 0.25, or oscillating between 0 and 1",
         "Lens/controller instability: inspect the report's swap plots; consider re-running midtraining.",
         after_warmup=False),
    Band("mc/residency", "0.90–1.00 (inference)", "< 0.80",
         "Allocator collapsing too aggressively: verify LensNet logits and the budget constraints.",
         after_warmup=False),
    Band("train/mfu", "45–55 % (GPU)", "< 40 %",
         "Check --device_batch_size, grad accumulation steps and host I/O stalls (data loader, logging)."),
    Band("mc/token_loss", "trending down, ideally ≤ the baseline loss",
         "flat or rising: the mean of the last 5 checks is not 0.2 % below the mean of the 5 before",
         "Horizon eval unstable: revisit WC sampling or loss weights."),
    Band("mc/variants_total", "= mc_num_random_variants × micro-batch rows", "0, or not the expected count",
         "The controller is not sampling WC variants as configured; inspect the mc_batch_counters events.",
         after_warmup=False),
    Band("mc/preference_corr_mean", "clearly positive, → +1 (our sign: corr(s_v, -ΔNLL_v))",
         "< 0.10 after warm-up (near 0, or flipped negative)",
         "Policy scores no longer align with measured ΔNLL: rerun the preference debug, inspect targets."),
    Band("mc/lens_loss", "→ 0 (Bradley–Terry; log 2 ≈ 0.69 = ranking at chance)",
         "not 5 % below its first logged value after warm-up and 5 checks (values ≤ 0.1 never alert)",
         "LensNet disagrees with the ΔNLL argmin / is not learning; inspect focus telemetry and lens flags."),
    Band("mc/time_controller_ms", "< 200 ms per micro-step (GPU)", "> the configured limit (default 200 ms)",
         "Controller latency spike: chart the mc_timing phases (tree, sample, variant) to find the slow one. "
         "Normal for tiny CPU runs.", after_warmup=False, severity="warn"),
]
BANDS_BY_METRIC = {b.metric: b for b in BANDS}


@dataclass(frozen=True)
class Alert:
    metric: str
    value: float
    band: str  # the target text
    message: str  # why it fired (the rule that tripped) + the band's note
    step: int = 0
    severity: str = "alert"
    investigate: str = ""

    @property
    def line(self) -> str:
        """One log line: `ALERT mc/lens_loss=0.7100 at step 300 outside band (target; investigate: ...): msg`."""
        head = "ALERT" if self.severity == "alert" else "WARN"
        return (f"{head} {self.metric}={self.value:.4g} at step {self.step} outside band "
                f"({self.band}; investigate: {self.investigate}): {self.message}")


# ------------------------------------------------------------------------------------------------
# Rules: (value, history of earlier values, monitor) -> reason string when the band is broken, else None.
# History excludes the current value; it holds the last `history` finite values seen (every check, also
# during warm-up, so trends have data as soon as warm-up ends).

def _rising(values, window, min_rise):
    """The last `window` values strictly increase and rise by more than min_rise overall (a drift, not noise:
    one flat or falling step anywhere resets it)."""
    if len(values) < window:
        return False
    w = values[-window:]
    return all(b > a for a, b in zip(w, w[1:])) and w[-1] - w[0] > min_rise


def rule_delta(value, hist, mon):
    recent = hist[-(mon.sustain_checks - 1):] if mon.sustain_checks > 1 else []
    if value > mon.delta_investigate and len(recent) == mon.sustain_checks - 1 and all(
            v > mon.delta_investigate for v in recent):
        return f"above {mon.delta_investigate:g} for {mon.sustain_checks} checks in a row"
    if _rising(hist + [value], mon.trend_window, 0.02):
        return f"rising monotonically over the last {mon.trend_window} checks"
    return None


def rule_p95(value, hist, mon):
    if _rising(hist + [value], mon.trend_window, 0.05):
        return f"p95 rising monotonically over the last {mon.trend_window} checks"
    return None


def rule_swap(value, hist, mon):
    # oscillation first: a swap rate of 1 also exceeds the limit, but "flipping every refocus" is the
    # more specific diagnosis (the allocator undoes its own edits)
    last = (hist + [value])[-4:]
    extreme = ["lo" if v <= 0.05 else "hi" if v >= 0.95 else None for v in last]
    if len(last) == 4 and None not in extreme and all(a != b for a, b in zip(extreme, extreme[1:])):
        return "oscillating between 0 and 1 over the last 4 checks"
    if value > mon.swap_rate_max:
        return f"swap rate above {mon.swap_rate_max:g}"
    return None


def rule_residency(value, hist, mon):
    return f"residency below {mon.residency_min:g}" if value < mon.residency_min else None


def rule_mfu(value, hist, mon):
    return f"MFU {100 * value:.1f} % is below {100 * mon.mfu_min:g} %" if value < mon.mfu_min else None


def rule_token_loss(value, hist, mon):
    w = mon.trend_window
    series = hist + [value]
    if len(series) < 2 * w:
        return None
    recent, earlier = sum(series[-w:]) / w, sum(series[-2 * w:-w]) / w
    if recent > earlier * (1 - mon.min_rel_improvement):
        what = "rising" if recent > earlier else "flat"
        return f"{what}: mean of the last {w} checks {recent:.4f} vs {earlier:.4f} for the {w} before"
    return None


def rule_variants(value, hist, mon):
    if value <= 0:
        return "no compressed variants were sampled"
    expected = mon.expected_variants
    if expected is not None and abs(value - expected) > 0.5:
        return f"expected {expected} (= {mon.num_random_variants} variants × {mon.micro_batch_rows} rows)"
    return None


def rule_pref_corr(value, hist, mon):
    if value < mon.pref_corr_min:
        side = "flipped negative" if value < 0 else "near 0"
        return f"{side}: below {mon.pref_corr_min:g} (good is positive in our sign convention)"
    return None


def rule_lens_loss(value, hist, mon):
    if len(hist) < mon.trend_window:  # judge only after a few values, whenever LensNet's metrics start
        return None
    first = mon.first_values.get("mc/lens_loss", value)
    if value > mon.lens_loss_floor and value > first * (1 - mon.lens_min_rel_drop):
        return (f"not {100 * mon.lens_min_rel_drop:g} % below its first value {first:.4f} "
                f"(log 2 = {LOG2:.3f} is chance)")
    return None


def rule_controller_ms(value, hist, mon):
    limit = mon.controller_ms_limit
    return f"controller took {value:.0f} ms per micro-step (limit {limit:g} ms)" if value > limit else None


RULES = {"mc/adv_delta_mean": rule_delta, "mc/adv_delta_p95": rule_p95, "mc/swap_rate": rule_swap,
         "mc/residency": rule_residency, "train/mfu": rule_mfu, "mc/token_loss": rule_token_loss,
         "mc/variants_total": rule_variants, "mc/preference_corr_mean": rule_pref_corr,
         "mc/lens_loss": rule_lens_loss, "mc/time_controller_ms": rule_controller_ms}
assert set(RULES) == set(BANDS_BY_METRIC), "every band needs a rule"


@dataclass
class BandMonitor:
    """Checks log-time metrics against BANDS (module docstring). Construct once per run, call check() at
    every log step. num_random_variants / micro_batch_rows: None for a vanilla run (the variants band then
    only checks for 0, which cannot happen without MC metrics anyway)."""

    device_type: str = "cuda"
    num_random_variants: int | None = None
    micro_batch_rows: int | None = None  # rows of ONE controller call (MCTrainStep.B), not rows per step
    warmup_steps: int = 100
    repeat_every: int = 200  # steps between two alerts for the same metric
    telemetry: object = None  # a mc.ops.telemetry provider: each printed alert becomes an mc_alert event
    only: tuple | None = None  # restrict to these metric names (e.g. ("train/mfu",) for the vanilla trainer)
    # thresholds (defaults from the seed's table; see BANDS for the words)
    delta_investigate: float = 0.15
    sustain_checks: int = 3
    trend_window: int = 5
    swap_rate_max: float = 0.25
    residency_min: float = 0.80
    mfu_min: float = 0.40
    min_rel_improvement: float = 0.002
    pref_corr_min: float = 0.10
    lens_min_rel_drop: float = 0.05
    lens_loss_floor: float = 0.10
    controller_ms_limit: float = 200.0
    history: int = 20
    skipped: dict = field(default_factory=dict, init=False)  # metric -> why it is not checked
    first_values: dict = field(default_factory=dict, init=False)  # metric -> first finite value seen
    _hist: dict = field(default_factory=dict, init=False, repr=False)
    _last_alert: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.warmup_steps < 0 or self.repeat_every < 1:
            raise ValueError(f"BandMonitor: warmup_steps must be >= 0 and repeat_every >= 1, got "
                             f"{self.warmup_steps} and {self.repeat_every}")
        if self.only is not None:
            unknown = sorted(set(self.only) - set(BANDS_BY_METRIC))
            if unknown:
                raise ValueError(f"BandMonitor(only=...): no band for {unknown}; known: {sorted(BANDS_BY_METRIC)}")
        if self.device_type != "cuda":
            self.skipped["train/mfu"] = (f"MFU is a GPU number (bf16 tensor-core peak); skipped on "
                                         f"device_type={self.device_type!r}")

    @property
    def expected_variants(self) -> int | None:
        if self.num_random_variants is None or self.micro_batch_rows is None:
            return None
        return self.num_random_variants * self.micro_batch_rows

    def bands(self) -> list[Band]:
        """The bands this monitor checks (after `only` and device skips)."""
        return [b for b in BANDS if b.metric not in self.skipped and (self.only is None or b.metric in self.only)]

    def describe(self) -> str:
        """Start-up text: what is checked and what is skipped, and why."""
        lines = [f"band alerts: {', '.join(b.metric for b in self.bands())} (warm-up {self.warmup_steps} steps, "
                 f"at most one alert per metric per {self.repeat_every} steps)"]
        lines += [f"band alerts: {m} skipped: {why}" for m, why in self.skipped.items()
                  if self.only is None or m in self.only]
        return "\n".join(lines)

    def check(self, step: int, metrics: dict) -> list[Alert]:
        """Alerts for this log step (already rate-limited); records the values for the trend rules."""
        alerts = []
        for band in self.bands():
            if band.metric not in metrics:
                continue
            try:
                value = float(metrics[band.metric])
            except (TypeError, ValueError):
                continue  # not a number: the metric's producer is broken, not this band; nothing to compare
            if not math.isfinite(value):
                continue  # NaN/inf losses are stopped by the trainer's own finiteness checks
            hist = self._hist.setdefault(band.metric, deque(maxlen=self.history))
            self.first_values.setdefault(band.metric, value)
            reason = None
            if not band.after_warmup or step >= self.warmup_steps:
                reason = RULES[band.metric](value, list(hist), self)
            hist.append(value)
            if reason is None:
                continue
            last = self._last_alert.get(band.metric)
            if last is not None and step - last < self.repeat_every:
                continue
            self._last_alert[band.metric] = step
            alert = Alert(band.metric, value, band.target, f"{reason}. {band.note}", step, band.severity,
                          band.investigate)
            alerts.append(alert)
            self._emit(alert)
        return alerts

    def _emit(self, alert: Alert):
        if self.telemetry is None:
            return
        from mc.ops.telemetry import emit_event  # lazy: alerts stay importable without the telemetry module's deps

        emit_event(self.telemetry, "mc_alert", {"metric": alert.metric, "step": int(alert.step),
                                                "value": float(alert.value), "band": alert.band,
                                                "severity": alert.severity, "message": alert.message})


def bands_table() -> str:
    """BANDS as a markdown table (what the ops guide shows; a test keeps them in sync)."""
    rows = ["| metric | target | investigate when | note |", "|---|---|---|---|"]
    rows += [f"| `{b.metric}` | {b.target} | {b.investigate} | {b.note} |" for b in BANDS]
    return "\n".join(rows)
