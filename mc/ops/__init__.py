"""
Operations: what a run reports about itself, for people and dashboards.

    telemetry       structured events from training and inference, exported as OpenTelemetry (or a no-op)
    alerts          the ops guide's telemetry bands as code (BandMonitor)
    report_curves   the report's "MegaContext curves" section (mc_curves.png) from a training log

May import: the core (mc/*.py) and nanochat. Never mc.train, mc.infer or mc.eval (they all report through it).
"""
