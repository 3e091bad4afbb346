"""
Inference: a chat or document of any length, decoded at a bounded cost (chat_cli/chat_web --mc, mc_eval's session path).

    session      MCSession: ingest -> refocus (LensNet + the allocator) -> decode over a working context of <= W entries
    engine       MCEngine: nanochat.engine.Engine's generate() contract over a session
    store        saved conversations: commit a session to disk (kill -9 safe), reopen it by id
    checkpoint   loading an MC checkpoint: the GPT from nanochat.checkpoint_manager, GistNet/LensNet attached
    buffer       AppendBuffer: per-token arrays that grow in amortised O(1)

May import: the core (mc/*.py), mc.ops and nanochat. Never mc.train or mc.eval.
"""
