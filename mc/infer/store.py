"""
Durable MC sessions: a conversation saved under a folder and reopened by id after a restart, or after a
kill -9 at any moment (chat_cli --mc --session_dir DIR [--session ID]).

    store = SessionStore(DIR)
    sid = store.create(session, checkpoint)       # checkpoint: what the session runs on (source, tag, step)
    ... session.ingest(...) / generate ...
    store.commit(session)                         # after each user message is ingested, after each reply
    session = store.open(sid, model, checkpoint)  # later, in another process: the same history and focus

On disk, <DIR>/<id>/:
    tokens.bin   the history's token ids, int32, append-only (a replaced conversation: tokens.<random>.bin,
                 the file the state names)
    state.bin    the last commit: 8 bytes of header length, a JSON header (committed token count, the
                 session's W / refocus interval / focus / tree levels / refocus counter / allocator RNG state,
                 the checkpoint it runs on), then the plan and the allocator's hysteresis, one int8 per token

Commit: append the ids that arrived since the last commit to tokens.bin and fsync, then write state.bin to
a temporary file, fsync, and rename it over the old one (atomic). A kill before the rename leaves the old
state, whose token count is the one reopen trusts (ids past it are cut off); a kill after it leaves the new
one. Either way the history that was committed is whole, so a crash loses at most what arrived since the
last commit: the reply being generated.

Reopen: a new MCSession with the saved settings; the ids re-ingested in chunks (GistNet recomputes the
gists: the tree itself is not stored, it is a function of the ids and the checkpoint), the levels grown as
they were, the plan, hysteresis, refocus counter and RNG installed; the KV cache starts empty, so the next
next_logits() prefills the working context. Its logits equal the ones before the restart up to float
round-off (GistNet and the prefill see other batch shapes). The checkpoint must be the one the session was
made with (a clear error says which otherwise). Cost of a commit: O(new tokens) appended plus the plan and
hysteresis rewritten (2 bytes per history token).
"""

import dataclasses
import json
import os
import re
import struct
import uuid

import numpy as np
import torch

from mc.infer.session import MCSession

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEADER = struct.Struct("<Q")  # the JSON header's length


def checkpoint_identity(meta: dict) -> dict:
    """What a saved session runs on: the checkpoint's step and its model file's sha256 (meta["_checkpoint"],
    nanochat/checkpoint_manager.py), so a renamed folder still matches and a retrained one does not."""
    ck = meta.get("_checkpoint", {})
    model = {k: v for k, v in ck.get("sha256", {}).items() if k.startswith("model")}
    return {"step": ck.get("step"), "model_sha256": model}


class SessionStoreError(ValueError):
    """A session that cannot be opened or saved (the message says why and what to do)."""


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SessionStore:
    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        self._committed = {}  # session id -> token count of its last commit (this process)
        self._checkpoint = {}  # session id -> the checkpoint it runs on
        self._tokens_file = {}  # session id -> the file holding its ids (tokens.bin, or a replacement's)

    def path(self, session_id: str) -> str:
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise SessionStoreError(f"session id {session_id!r} must be 1-64 letters, digits, '_' or '-'")
        return os.path.join(self.root, session_id)

    def knows(self, session_id: str) -> bool:
        """Whether this store created or opened the session (so commit() may write it)."""
        return session_id in self._committed

    def ids(self) -> list[str]:
        """The saved sessions, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = [d for d in os.listdir(self.root) if SESSION_ID.match(d)
                 and os.path.isfile(os.path.join(self.root, d, "state.bin"))]
        return sorted(found, key=lambda d: os.path.getmtime(os.path.join(self.root, d, "state.bin")))

    # ------------------------------------------------------------------ saving
    def create(self, session: MCSession, checkpoint: dict, session_id: str | None = None,
               replace: bool = False) -> str:
        """Start saving `session` (any history it already holds included) under a new id; returns the id.
        replace=True: the id may exist; its saved conversation is replaced by this one (chat_web, when a
        request's messages no longer continue what was saved). The ids go to a new file that the new state
        names, so a crash leaves either the old conversation or the new one, whole."""
        sid = session_id or uuid.uuid4().hex[:12]
        folder = self.path(sid)
        old = None
        if os.path.exists(folder):
            if not replace:
                raise SessionStoreError(f"session {sid} already exists under {self.root}; reopen it "
                                        f"(--session {sid}) or pick another id")
            old = self._read_state(folder)[0].get("tokens_file", "tokens.bin")
        os.makedirs(folder, exist_ok=True)
        name = "tokens.bin" if old is None else f"tokens.{uuid.uuid4().hex[:8]}.bin"
        open(os.path.join(folder, name), "wb").close()
        self._committed[sid], self._checkpoint[sid], self._tokens_file[sid] = 0, checkpoint, name
        session.session_id = sid
        self.commit(session)
        if old is not None and old != name:
            os.remove(os.path.join(folder, old))
        _fsync_dir(self.root)
        return sid

    def committed_tokens(self, session_id: str) -> int | None:
        """The token count of the session's last commit on disk (None: no such session)."""
        folder = self.path(session_id)
        if not os.path.isfile(os.path.join(folder, "state.bin")):
            return None
        return self._read_state(folder)[0]["tokens"]

    def commit(self, session: MCSession):
        """Make everything the session holds durable (the commit protocol in the module docstring)."""
        sid = session.session_id
        folder = self.path(sid)
        if sid not in self._committed:
            raise SessionStoreError(f"session {sid} was not created or opened through this store")
        done = self._committed[sid]
        ids = session.token_ids()
        with open(os.path.join(folder, self._tokens_file[sid]), "r+b") as f:
            f.truncate(4 * done)  # a crash may have left ids past the last commit: they are not history
            f.seek(4 * done)
            f.write(ids[done:].numpy().astype("<i4").tobytes())
            f.flush()
            os.fsync(f.fileno())
        header = {"version": 1, "tokens": session.num_tokens, "tokens_file": self._tokens_file[sid],
                  "checkpoint": self._checkpoint[sid], "W": session.W,
                  "refocus_interval": session.refocus_interval, "focus": session.cfg.infer_focus, "tree": session.cfg.tree,
                  "max_lod": session.max_lod, "infer_max_lod": session.cfg.infer_max_lod,
                  "since_refocus": session._since_refocus, "totals": session.totals,
                  "state_tokens": 0 if session.state is None else session.state.size(1),
                  "generator": session.generator.get_state().tolist()}
        state = session.state if session.state is not None else torch.zeros(1, 0, dtype=torch.int8)
        body = json.dumps(header).encode()
        tmp = os.path.join(folder, "state.bin.tmp")
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(len(body)) + body)
            f.write(session.plan[0].numpy().tobytes())
            f.write(state[0].to(torch.int8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, "state.bin"))
        _fsync_dir(folder)
        self._committed[sid] = session.num_tokens

    # ------------------------------------------------------------------ reopening
    @staticmethod
    def _read_state(folder: str):
        path = os.path.join(folder, "state.bin")
        try:
            with open(path, "rb") as f:
                data = f.read()
            (n,) = _HEADER.unpack_from(data)
            header = json.loads(data[_HEADER.size:_HEADER.size + n])
        except (OSError, struct.error, ValueError) as e:
            raise SessionStoreError(f"cannot read {path}: {e}") from None
        body = data[_HEADER.size + n:]
        T, S = header["tokens"], header["state_tokens"]
        if len(body) != T + S:
            raise SessionStoreError(f"{path} is damaged: {len(body)} bytes of plan and allocator state for {T} tokens")
        plan = torch.from_numpy(np.frombuffer(body[:T], dtype=np.int8).copy())
        state = torch.from_numpy(np.frombuffer(body[T:], dtype=np.int8).copy()) if S else None
        return header, plan, state

    def open(self, session_id: str, model, checkpoint: dict, telemetry=None, chunk: int = 65536) -> MCSession:
        """The saved session, rebuilt on `model` (which must be the checkpoint it was made with)."""
        folder = self.path(session_id)
        if not os.path.isfile(os.path.join(folder, "state.bin")):
            known = ", ".join(self.ids()[-5:]) or "none"
            raise SessionStoreError(f"no saved session {session_id!r} under {self.root} (the newest: {known})")
        header, plan, state = self._read_state(folder)
        if header["checkpoint"] != checkpoint:
            raise SessionStoreError(f"session {session_id} runs on checkpoint {header['checkpoint']}, not {checkpoint}; "
                                    f"load that one (-i/-g/-s) to reopen it")
        T = header["tokens"]
        tokens_file = header.get("tokens_file", "tokens.bin")
        with open(os.path.join(folder, tokens_file), "rb") as f:
            raw = f.read(4 * T)
        if len(raw) < 4 * T:
            raise SessionStoreError(f"{folder}/{tokens_file} holds {len(raw) // 4} ids, the last commit {T}: the "
                                    f"history was truncated outside this program")
        ids = torch.from_numpy(np.frombuffer(raw, dtype="<i4").astype(np.int32))
        s = MCSession(model, W=header["W"], refocus_interval=header["refocus_interval"], telemetry=telemetry,
                      session_id=session_id, focus=header["focus"], max_lod=header["infer_max_lod"],
                      tree=header.get("tree", "ram"))
        with torch.inference_mode():
            for part in ids.split(chunk):
                s._add(part)  # no refocus: the plan comes from the commit
            while s.max_lod < header["max_lod"]:  # the levels the session had grown (MCSession._grow_to_fit)
                s.tree.grow()
                s.max_lod += 1
                s.cfg = dataclasses.replace(s.cfg, max_lod=s.max_lod,
                                            allocator_iterations=max(s.cfg.allocator_iterations, s.max_lod))
            s._set_plan(plan[None])
        s.state = state[None] if state is not None else None
        s._since_refocus = header["since_refocus"]
        s.totals.update(header["totals"])
        s.generator.set_state(torch.tensor(header["generator"], dtype=torch.uint8))
        self._committed[session_id], self._checkpoint[session_id] = T, checkpoint
        self._tokens_file[session_id] = tokens_file
        return s
