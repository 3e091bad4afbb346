"""
Chat data for midtraining and SFT: conversations in, [B, T] (inputs, targets) batches out, with the
loss restricted to what the assistant must learn to say.

One conversation -> one token sequence. RustBPETokenizer.render_conversation() gives ids and a mask
(1 = a token the assistant produces: its text, its tool calls, <|assistant_end|>; 0 = BOS, user turns,
special tokens that open a turn, and tool outputs, which come from the interpreter). For a sequence
`ids` of length n the model reads x = ids[:-1] and is scored on y = ids[1:], so position t predicts
ids[t+1]; that target counts only where mask[t+1] = 1:

    y[t] = ids[t+1] if mask[t+1] == 1 else -1          (-1 = ignored by the loss)

Rows. A row holds T+1 tokens (x and y of length T). Two ways to fill rows, both deterministic:
  - pack=True  (midtraining): whole conversations are laid one after another into the row while they
    fit; the first one that does not fit starts the next row (conversations are never split, so each
    answer keeps its question). Leftover space at the end of a row is padding: x = BOS, y = -1.
    A single conversation longer than T+1 tokens is truncated to T+1 (counted in `truncated`).
    Rows are always T long (fixed shapes, compile-friendly).
  - pack=False (SFT): one conversation per row (truncated to T+1), and a micro-batch is padded to its
    longest row only (less wasted compute on short chats).
A conversation is ordinary causal text, so packed neighbours can be attended to; each starts with BOS.

Which rows a rank gets (the same rule as nanochat.dataloader): the rows form one global stream and
call c of next_batch() on rank r returns global rows [c*world*B + r*B, c*world*B + (r+1)*B). So an
optimizer step of grad_accum micro-batches consumes the same global rows whatever the split into
device batch size × processes × accumulation steps. With pack=True every rank walks the whole stream
(where a row ends depends on every conversation before it); with pack=False a rank renders only its own.

Resuming. The stream position is one integer, `cursor` = how many conversations were placed into
rows so far (a conversation that did not fit is not consumed). state_dict() = {"cursor", "rows"};
a loader built with that state continues exactly. The dataset is walked in order and wraps around
(epoch = cursor // len(dataset)); shuffling belongs to the dataset (tasks.common.TaskMixture).
"""

import torch

STATE_VERSION = 1


def render(tokenizer, conversation, max_tokens: int):
    """(ids, mask) of one conversation, truncated to max_tokens; ValueError names the bad conversation."""
    try:
        return tokenizer.render_conversation(conversation, max_tokens=max_tokens)
    except ValueError as e:
        raise ValueError(f"cannot render conversation {str(conversation)[:200]!r}: {e}") from e


def shift_targets(ids, mask) -> list[int]:
    """Targets of x = ids[:-1]: y[t] = ids[t+1] where mask[t+1] == 1, else -1 (see module docstring)."""
    return [tok if m else -1 for tok, m in zip(ids[1:], mask[1:])]


def collate(rows, pad_id: int, length: int | None = None, device="cpu"):
    """rows: list of (ids, mask) with len(ids) >= 1 -> x, y long tensors [B, L] on device.

    L = length, or the longest len(ids) - 1 among the rows. Each row is left-aligned; the tail is
    padding (x = pad_id, y = -1), so padding never changes the prediction of a real position (causal).
    A row of a single token (or an all-zero mask) contributes no targets at all: y is all -1 there."""
    if not rows:
        raise ValueError("collate needs at least one row")
    L = length if length is not None else max(max(len(ids) - 1 for ids, _ in rows), 1)
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        if len(ids) != len(mask):
            raise ValueError(f"row {i}: {len(ids)} ids but {len(mask)} mask entries")
        n = len(ids) - 1
        if n > L:
            raise ValueError(f"row {i} has {n + 1} tokens, more than length + 1 = {L + 1}")
        if n > 0:
            x[i, :n] = torch.tensor(ids[:-1], dtype=torch.long)
            y[i, :n] = torch.tensor(shift_targets(ids, mask), dtype=torch.long)
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class ChatLoader:
    """Endless (x, y) micro-batches of chat rows for one rank; see the module docstring for the rules.

    dataset: anything with len() and [i] -> conversation dict (a tasks.common.Task / TaskMixture).
    B rows per micro-batch, rows of T+1 tokens. Attributes for logging: epoch, truncated (conversations
    cut to T+1 tokens so far on this rank's walk), cursor."""

    def __init__(self, dataset, tokenizer, B: int, T: int, rank: int = 0, world_size: int = 1, device="cpu",
                 pack: bool = True, state: dict | None = None):
        if B < 1 or T < 1:
            raise ValueError(f"need B >= 1 and T >= 1, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 (world_size={world_size})")
        self.n = len(dataset)
        if self.n == 0:
            raise ValueError("the chat dataset is empty: check the task mixture (every task has 0 examples)")
        self.dataset, self.tokenizer, self.B, self.T = dataset, tokenizer, B, T
        self.rank, self.world_size, self.device, self.pack = rank, world_size, torch.device(device), pack
        self.bos = tokenizer.get_bos_token_id()
        self.cursor, self.rows = 0, 0  # conversations consumed, global rows produced
        if state is not None:
            self.load_state_dict(state)
        self.truncated = 0
        self._pending = None  # (index, rendered) of a conversation rendered but not yet placed

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "cursor": self.cursor, "rows": self.rows, "pack": self.pack,
                "T": self.T}

    def load_state_dict(self, state: dict):
        try:
            version, cursor, rows = state["version"], int(state["cursor"]), int(state["rows"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad ChatLoader state {state!r} ({e}); start without --resume") from e
        if version != STATE_VERSION or state.get("pack") != self.pack or state.get("T") != self.T:
            raise ValueError(f"ChatLoader state {state!r} was written with other settings (pack={state.get('pack')}, "
                             f"T={state.get('T')}, version={version}); this run has pack={self.pack}, T={self.T}")
        self.cursor, self.rows = cursor, rows
        self._pending = None

    @property
    def epoch(self) -> int:
        return self.cursor // self.n

    # ---------------------------------------------------------------------------------------- rows
    def _render(self, index):
        if self._pending is not None and self._pending[0] == index:
            return self._pending[1]
        ids, mask = render(self.tokenizer, self.dataset[index % self.n], self.T + 2)  # +1 to notice a cut
        if len(ids) > self.T + 1:
            self.truncated += 1
            ids, mask = ids[:self.T + 1], mask[:self.T + 1]
        self._pending = (index, (ids, mask))
        return ids, mask

    def _next_packed_row(self):
        """Whole conversations while they fit into T+1 tokens (the first one always goes in, truncated)."""
        ids, mask = [], []
        while True:
            c_ids, c_mask = self._render(self.cursor)
            if ids and len(ids) + len(c_ids) > self.T + 1:
                return ids, mask
            ids += c_ids
            mask += c_mask
            self.cursor += 1
            self._pending = None
            if len(ids) >= self.T + 1:
                return ids, mask

    def next_batch(self):
        """x, y: [B, T] (pack) or [B, longest row - 1] (no pack) long tensors on the device."""
        mine = []
        first, last = self.rank * self.B, (self.rank + 1) * self.B
        for j in range(self.world_size * self.B):
            if self.pack:
                row = self._next_packed_row()
            else:
                row = self._render(self.cursor) if first <= j < last else None
                self.cursor += 1
                self._pending = None
            if first <= j < last:
                mine.append(row)
        self.rows += self.world_size * self.B
        return collate(mine, self.bos, self.T if self.pack else None, self.device)
