"""mc/ops/alerts.py: every band fires on a bad value and stays quiet on a good one, warm-up and the rate limit
hold, MFU is skipped off CUDA, alerts become mc_alert telemetry events, and the documented table matches."""

import math
import os

import pytest

from mc.ops import telemetry as T
from mc.ops.alerts import BANDS, BANDS_BY_METRIC, LOG2, RULES, Alert, BandMonitor, bands_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def monitor(**kw):
    kw.setdefault("warmup_steps", 10)
    kw.setdefault("repeat_every", 50)
    return BandMonitor("cuda", kw.pop("n", 2), kw.pop("rows", 4), **kw)


def feed(mon, metric, values, start=100):
    """Check one metric over consecutive steps; all alerts raised."""
    out = []
    for i, v in enumerate(values):
        out += mon.check(start + i, {metric: v})
    return out


# (metric, good series, bad series): each series is fed after warm-up; bad must alert on its last value
CASES = [
    ("mc/adv_delta_mean", [0.05, 0.2, 0.02, 0.18, 0.03, 0.2], [0.05, 0.16, 0.17, 0.2]),
    ("mc/adv_delta_mean", [0.01, 0.03, 0.02, 0.04, 0.03], [0.00, 0.01, 0.02, 0.04, 0.06]),  # monotonic drift
    ("mc/adv_delta_p95", [0.3, 0.35, 0.32, 0.4, 0.38, 0.41], [0.30, 0.32, 0.34, 0.37, 0.40]),
    ("mc/swap_rate", [0.05, 0.1, 0.2, 0.15], [0.1, 0.3]),
    ("mc/residency", [0.95, 0.9, 1.0, 0.81], [0.95, 0.7]),
    ("train/mfu", [0.5, 0.45, 0.41], [0.5, 0.3]),
    ("mc/token_loss", [5.0 - 0.1 * i for i in range(12)], [5.0, 4.8, 4.6, 4.6, 4.6, 4.61, 4.6, 4.6, 4.59, 4.6, 4.6, 4.6]),
    ("mc/variants_total", [8, 8.0, 8], [8, 0]),
    ("mc/variants_total", [8], [6]),  # not N × rows (2 × 4)
    ("mc/preference_corr_mean", [0.3, 0.5, 0.8], [0.5, 0.05]),
    ("mc/preference_corr_mean", [0.9], [0.5, -0.4]),  # flipped sign
    ("mc/lens_loss", [LOG2, 0.6, 0.55, 0.5, 0.45, 0.4, 0.3], [LOG2, 0.69, 0.68, 0.7, 0.69, 0.71]),
    ("mc/time_controller_ms", [20, 150, 199], [20, 450]),
]


@pytest.mark.parametrize("metric, good, bad", CASES)
def test_band_fires_on_bad_and_stays_quiet_on_good(metric, good, bad):
    assert feed(monitor(), metric, good) == []
    alerts = feed(monitor(), metric, bad)
    assert len(alerts) == 1, alerts
    a = alerts[0]
    assert isinstance(a, Alert) and a.metric == metric and a.step == 100 + len(bad) - 1
    assert a.value == pytest.approx(bad[-1]) and a.band == BANDS_BY_METRIC[metric].target
    assert BANDS_BY_METRIC[metric].note in a.message
    head = "WARN" if metric == "mc/time_controller_ms" else "ALERT"
    assert a.line.startswith(f"{head} {metric}=") and "outside band (" in a.line and "investigate:" in a.line


def test_every_band_has_a_case_and_a_rule():
    assert {m for m, _, _ in CASES} == set(BANDS_BY_METRIC) == set(RULES)


def test_lens_loss_at_chance_does_not_alert_with_an_absolute_threshold():
    """log 2 at init is not a breach by itself: the seed's "> 0.1" would fire here; our rule waits."""
    mon = monitor()
    assert feed(mon, "mc/lens_loss", [LOG2] * 4) == []  # too few values to judge
    mon = monitor()
    assert feed(mon, "mc/lens_loss", [0.09, 0.09, 0.095, 0.09, 0.09, 0.09]) == []  # ≤ 0.1 never alerts


def test_swap_rate_oscillation_is_named():
    mon = monitor(repeat_every=1)
    reasons = [a.message for a in feed(mon, "mc/swap_rate", [0.0, 1.0, 0.0, 1.0])]
    assert reasons[0].startswith("swap rate above 0.25") and reasons[-1].startswith("oscillating between 0 and 1")


def test_line_format():
    mon = monitor()
    (a,) = feed(mon, "mc/lens_loss", [0.7, 0.71, 0.71, 0.71, 0.71, 0.71])
    assert a.line.startswith("ALERT mc/lens_loss=0.71 at step 105 outside band (→ 0 ")
    assert "not 5 % below its first value 0.7000" in a.line


def test_warmup_suppresses_but_still_records():
    mon = monitor(warmup_steps=100)
    bad_early = [mon.check(s, {"train/mfu": 0.1, "mc/preference_corr_mean": -0.5}) for s in range(0, 100, 10)]
    assert all(a == [] for a in bad_early)
    assert [a.metric for a in mon.check(100, {"train/mfu": 0.1})] == ["train/mfu"]
    # a trend rule has data from warm-up as soon as it ends: 10 flat token losses logged during warm-up
    mon = monitor(warmup_steps=100)
    for s in range(90, 100):
        assert mon.check(s, {"mc/token_loss": 3.0}) == []
    assert [a.metric for a in mon.check(100, {"mc/token_loss": 3.0})] == ["mc/token_loss"]
    # bands without warm-up fire at once (a variants count of 0 is wrong from step 0)
    assert [a.metric for a in monitor(warmup_steps=100).check(1, {"mc/variants_total": 0})] == ["mc/variants_total"]


def test_rate_limit_once_per_metric_per_window():
    mon = monitor(repeat_every=50)
    fired = {s: [a.metric for a in mon.check(s, {"train/mfu": 0.2, "mc/residency": 0.5})] for s in range(100, 201)}
    assert [s for s, m in fired.items() if "train/mfu" in m] == [100, 150, 200]
    assert [s for s, m in fired.items() if "mc/residency" in m] == [100, 150, 200]
    # recovering in between does not reset the window
    mon = monitor(repeat_every=50)
    assert mon.check(100, {"train/mfu": 0.2})
    assert mon.check(101, {"train/mfu": 0.5}) == []
    assert mon.check(120, {"train/mfu": 0.2}) == []
    assert mon.check(150, {"train/mfu": 0.2})


def test_mfu_skipped_off_cuda_and_said_so():
    mon = BandMonitor("cpu", 2, 4, warmup_steps=0)
    assert mon.check(5, {"train/mfu": 0.01}) == []
    assert "train/mfu" in mon.skipped and "cpu" in mon.skipped["train/mfu"]
    assert "train/mfu skipped" in mon.describe()
    assert "train/mfu" not in [b.metric for b in mon.bands()]
    assert BandMonitor("cuda", warmup_steps=0).check(5, {"train/mfu": 0.01})


def test_only_and_absent_metrics():
    mon = BandMonitor("cuda", only=("train/mfu",), warmup_steps=0)
    assert [a.metric for a in mon.check(1, {"train/mfu": 0.1, "mc/variants_total": 0})] == ["train/mfu"]
    assert mon.check(2, {"train/loss": 3.0}) == []  # nothing it knows: quiet
    with pytest.raises(ValueError, match="no band for"):
        BandMonitor("cuda", only=("train/nope",))
    with pytest.raises(ValueError, match="repeat_every"):
        BandMonitor("cuda", repeat_every=0)


def test_vanilla_monitor_has_no_expected_variant_count():
    mon = BandMonitor("cuda", warmup_steps=0)
    assert mon.expected_variants is None
    assert mon.check(1, {"mc/variants_total": 6}) == []
    assert mon.check(2, {"mc/variants_total": 0})


def test_non_finite_and_tensor_values():
    torch = pytest.importorskip("torch")
    mon = monitor(warmup_steps=0)
    assert mon.check(1, {"train/mfu": math.nan, "mc/residency": float("inf"), "mc/swap_rate": "x"}) == []
    assert [a.metric for a in mon.check(2, {"train/mfu": torch.tensor(0.1)})] == ["train/mfu"]


def test_configurable_thresholds():
    assert monitor(controller_ms_limit=1000).check(100, {"mc/time_controller_ms": 450}) == []
    assert monitor(pref_corr_min=0.6).check(100, {"mc/preference_corr_mean": 0.5})


def test_alerts_become_telemetry_events():
    class Recorder:
        def __init__(self):
            self.events = []

        def emit(self, event):
            self.events.append(event)

    rec = Recorder()
    mon = monitor(telemetry=rec, warmup_steps=0, repeat_every=10)
    for s in range(5):
        mon.check(s, {"mc/residency": 0.5})
    (event,) = rec.events  # rate-limited like the printed line
    assert event.event_type == "mc_alert"
    assert event.attributes["metric"] == "mc/residency" and event.attributes["step"] == 0
    assert event.attributes["value"] == 0.5 and event.attributes["severity"] == "alert"
    T.validate_attributes("mc_alert", event.attributes)
    mon = monitor(telemetry=T.NoOpTelemetryProvider(), warmup_steps=0)
    assert mon.check(1, {"mc/time_controller_ms": 900.0})[0].severity == "warn"


def test_documented_table_matches_code():
    text = open(os.path.join(ROOT, "obsidian", "architecture", "Telemetry.md"), encoding="utf-8").read()
    assert bands_table() in text, "re-paste mc.ops.alerts.bands_table() into Telemetry.md's Band alerts section"
    assert len(BANDS) == len(BANDS_BY_METRIC)
