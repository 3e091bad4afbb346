"""
MCEngine: nanochat.engine.Engine's generate() contract over an MC checkpoint's inference session
(mc/infer/session.py), with no context limit. The chat front ends (chat_cli --mc, chat_web --mc) use it.

generate(tokens) ingests the tokens the session has not seen (with reuse_session, a conversation that
extends the previous call's history token for token continues that session; anything else starts a new
one), refocuses (a user turn), and then decodes one sample: sampled and forced (calculator) tokens alike
are appended to the session. num_samples must be 1. Only a history so long that even its most
compressed working context no longer fits W raises (HistoryTooLongError, a ContextTooLongError).
The tool-use state machine (Row, Engine._choose) is the vanilla Engine's.
"""

import torch

from mc.infer.session import MCSession
from nanochat.engine import Engine, Row
from nanochat.gpt import sample_next_token


class MCEngine(Engine):
    """Engine-compatible generation over a MegaContext session (module docstring). session_kwargs go to
    mc.infer.session.MCSession (W, refocus_interval, telemetry, ...). reuse_session=False: every generate()
    builds a fresh session from its tokens (stateless servers: same request, same answer)."""

    unbounded = True  # callers: no sequence_len limit on prompt + reply

    def __init__(self, model, tokenizer, reuse_session: bool = True, store=None, checkpoint: dict | None = None,
                 **session_kwargs):
        """store (mc.infer.store.SessionStore) + checkpoint (its identity): generate(..., session_id=ID) then
        continues, and saves, the conversation of that id (chat_web --session_dir)."""
        super().__init__(model, tokenizer)
        self.session_kwargs, self.reuse_session = session_kwargs, reuse_session
        self.store, self.checkpoint = store, checkpoint
        self.session = self._new_session()  # fails now, clearly, for a vanilla checkpoint or bad W

    def _new_session(self):
        return MCSession(self.model, getattr(self.model, "mc_modules", None), getattr(self.model, "mc_config", None),
                         **self.session_kwargs)

    def _prepare(self, tokens, reuse=None):
        """Bring the session to `tokens` (reuse it when they extend its history), refocus, return it."""
        s = self.session
        T = s.num_tokens
        reuse = self.reuse_session if reuse is None else reuse
        same = (reuse and 0 < T <= len(tokens)
                and torch.equal(s.token_ids(), torch.tensor(tokens[:T], dtype=torch.int32)))
        if not same:
            s = self.session = self._new_session() if T else s
            T = 0
        s.ingest(tokens[T:])
        s.refocus()  # a user turn
        return s

    def _saved(self, session_id: str, tokens):
        """Prepare the saved conversation `session_id` for `tokens` and save it: the fast path reuses it (this
        worker's copy when it is the one on disk, else reopened from disk) and ingests only what `tokens`
        add; when `tokens` do not continue it (another history, or a reply re-encoded differently), it is
        rebuilt from `tokens`, exactly as a stateless request would, and replaces the saved one."""
        if self.store is None:
            raise ValueError("this server saves no conversations: start it with --session_dir to use session_id")
        on_disk = self.store.committed_tokens(session_id)
        mine = self.session.session_id == session_id and self.store.knows(session_id)
        if on_disk is not None and not (mine and self.session.num_tokens == on_disk):
            self.session = self.store.open(session_id, self.model, self.checkpoint,
                                           telemetry=self.session_kwargs.get("telemetry"))
        elif on_disk is None:
            self.session = self._new_session()
        s = self._prepare(list(tokens), reuse=True)
        if s.session_id != session_id or not self.store.knows(session_id):  # new, or rebuilt
            self.store.create(s, self.checkpoint, session_id=session_id, replace=True)
        else:
            self.store.commit(s)
        return s

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
                 session_id=None):
        """As Engine.generate, one sample, no context limit; max_tokens=None = sequence_len tokens. The
        prompt is ingested here, so errors (HistoryTooLongError) come before the first step. session_id: the
        saved conversation to continue (see _saved); it is saved once the prompt is in, and again when the
        reply ends, however it ends (a request whose next messages differ rebuilds it)."""
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError("tokens must be a non-empty list of token ids (start with the BOS token)")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ValueError(f"tokens must be ints in [0, {vocab}) (the model's vocab_size)")
        if num_samples != 1:
            raise ValueError(f"MegaContext generation (--mc) runs one sample per session; num_samples must be 1, "
                             f"got {num_samples!r} (drop --mc to sample several replies within the context)")
        if max_tokens is None:
            max_tokens = self.model.config.sequence_len
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0 or None, got {max_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        with torch.inference_mode():
            session = self._saved(session_id, tokens) if session_id is not None else self._prepare(list(tokens))
        return self._generate_mc(session, max_tokens, temperature, top_k, seed, save=session_id is not None)

    @torch.inference_mode()
    def _generate_mc(self, session, max_tokens, temperature, top_k, seed, save=False):
        rng = torch.Generator(device=session.device)
        rng.manual_seed(seed)
        row = Row()
        try:
            for _ in range(max_tokens):
                if row.forced:  # a forced tool token needs no logits: it is fed with the next forward
                    tok, mask = self._choose(row, None)
                else:
                    sampled = int(sample_next_token(session.next_logits()[None], rng, temperature, top_k)[0, 0])
                    tok, mask = self._choose(row, sampled)
                session.append_token(tok)  # before yielding: a caller that stops here leaves it in the history
                yield [tok], [mask]
                if row.done:
                    break
        finally:
            if save:
                self.store.commit(session)
