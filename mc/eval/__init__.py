"""
Evaluation: the long-context evaluation of scripts/mc_eval.py (conditions at equal budget, recall, long-range R).

    data                 evaluation items: token sequences with their answers and facts located
    tasks                associative recall items (K key -> value pairs far behind the window)
    conditions           FULL, RECENCY, RECENCY-EQ, MEANPOOL, MC, MC-fixed, MC-LensNet, ORACLE as plans
    keymatch_condition   MC-KEYMATCH: the parameter-free focus baseline at the same budget
    run                  the batched evaluator: every condition's plan for a batch of items, scored
    report, stats        per-item measurements -> exact match, R with bootstrap CIs, the validity verdict
    table, plot          the markdown table and the figure (exact match vs history length)

May import: the core (mc/*.py), mc.infer, mc.ops and nanochat. Never mc.train.
"""
