"""
Training: the MC step that co-trains GistNet and LensNet with the GPT (scripts/base_train.py, the chat stages).

    variants     the working contexts each training row is scored on: the recency baseline + N random compressions
    controller   MCController.process_batch: tree -> variants -> packed forwards -> LM + variant + LensNet losses
    lens_loss    LensNet's preference loss from the measured ΔNLL of the variants
    auto_batch   the micro-batch split that keeps an MC step inside the vanilla run's memory
    train_step   MCTrainStep: the trainer's side of a micro-step (row ids, EMA commits, logging)
    timing       per-phase timers and memory snapshots that never force a device sync

May import: the core (mc/*.py), mc.ops (telemetry, alerts) and nanochat. Never mc.infer or mc.eval.
"""
