"""
The tokenizer: byte-level BPE trained with `rustbpe`, encoded with `tiktoken`, plus the chat format.

- Training (RustBPETokenizer.train_from_iterator): rustbpe learns `vocab_size - len(SPECIAL_TOKENS)`
  byte-level tokens (256 single bytes + merges, in merge order) over text pre-split by a GPT-4-style
  regex. The learned "mergeable ranks" (token bytes -> id, lower id = merged earlier) are exactly
  what tiktoken needs, so we hand them to a tiktoken.Encoding for fast (multi-threaded) encoding.
- Special tokens (SPECIAL_TOKENS) take the ids right after the BPE vocab, so the model's vocab is
  `get_vocab_size()`, exactly the number requested at training time. Ordinary text never produces
  them: encode() uses tiktoken's encode_ordinary, so a document containing "<|bos|>" is just text.
  If the corpus runs out of merges before vocab_size (a small or closed-vocabulary corpus), training
  fails with a clear error, or with pad_vocab=True the tail is filled with "<|reserved_k|>" ids.
- Storage: <tokenizer_dir>/tokenizer.pkl (pattern, ranks, specials) and token_bytes.pt (for bpb).
- Chat: render_conversation() turns {"messages": [...]} into (ids, mask) where mask=1 marks the
  tokens the model is trained to produce (assistant content), render_for_completion() primes a reply.
- get_tokenizer() / get_token_bytes() load the project tokenizer from $NANOCHAT_BASE_DIR/tokenizer.
"""

import copy
import os
import pickle
import tempfile

import rustbpe
import tiktoken
import torch

from nanochat.common import get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output (comes from outside, never trained on)
]

# GPT-4 (cl100k) split pattern, except digits group in runs of at most 2 (not 3): with a small vocab
# fewer digit-run tokens are needed, and numbers split more regularly.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"
_FORMAT_VERSION = 1


class TokenizerError(RuntimeError):
    """The tokenizer on disk is missing or unreadable (the message says how to fix it)."""


def _atomic_write(path, write_fn):
    """Write via a temp file in the same directory + os.replace, so readers never see half a file."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class RustBPETokenizer:
    """A tiktoken.Encoding built from rustbpe-learned merges, with the nanochat special tokens."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>"):
        self.enc = enc
        self._special = {name: enc.encode_single_token(name) for name in SPECIAL_TOKENS}
        self.bos_token_id = self._special[bos_token]
        self.num_reserved = 0  # padding ids after SPECIAL_TOKENS (set by _from_parts)

    # ------------------------------------------------------------------ construction
    @classmethod
    def _from_parts(cls, pattern: str, mergeable_ranks: dict, num_reserved: int = 0):
        """ids: [0, n_bpe) BPE tokens, then SPECIAL_TOKENS, then num_reserved never-produced padding ids."""
        n_bpe = len(mergeable_ranks)
        names = SPECIAL_TOKENS + [f"<|reserved_{i}|>" for i in range(num_reserved)]
        special_tokens = {name: n_bpe + i for i, name in enumerate(names)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                special_tokens=special_tokens)
        tok = cls(enc)
        tok.num_reserved = num_reserved
        return tok

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size: int, pad_vocab: bool = False) -> "RustBPETokenizer":
        """Learn a BPE vocab of exactly `vocab_size` ids (BPE tokens + the special tokens).

        rustbpe stops merging once every pre-split chunk of the text is a single token, so a small or
        closed-vocabulary corpus (the synthetic one has ~2.3k distinct chunks) cannot fill a big vocab.
        Then: pad_vocab=False raises a ValueError; pad_vocab=True fills the gap with reserved ids after
        the special tokens (never produced by encode(), 0 bytes; see `num_reserved`)."""
        n_bpe = vocab_size - len(SPECIAL_TOKENS)
        if n_bpe < 256:
            raise ValueError(f"vocab_size={vocab_size} is too small: it must be at least "
                             f"{256 + len(SPECIAL_TOKENS)} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, n_bpe, pattern=SPLIT_PATTERN)
        ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError("rustbpe returned non-contiguous token ranks; cannot build a tiktoken encoding")
        if len(ranks) < n_bpe and not pad_vocab:
            raise ValueError(f"the training text only supports {len(ranks)} BPE tokens but vocab_size={vocab_size} "
                             f"needs {n_bpe}: train on more (or more varied) text, e.g. raise --max_chars, "
                             f"or lower --vocab_size to at most {len(ranks) + len(SPECIAL_TOKENS)}, "
                             f"or pad the vocab with reserved ids (--pad_vocab 1)")
        return cls._from_parts(trainer.get_pattern(), ranks, num_reserved=n_bpe - len(ranks))

    @classmethod
    def from_directory(cls, tokenizer_dir) -> "RustBPETokenizer":
        path = os.path.join(tokenizer_dir, TOKENIZER_FILE)
        fix = "run `python -m scripts.tok_train` to (re)train it"
        if not os.path.isfile(path):
            raise TokenizerError(f"no tokenizer at {path}: {fix}")
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
            if not isinstance(data, dict) or data.get("format") != _FORMAT_VERSION:
                raise ValueError(f"unexpected contents (format {data.get('format') if isinstance(data, dict) else None!r})")
            if data["special_tokens"] != SPECIAL_TOKENS:
                raise ValueError("its special tokens differ from nanochat.tokenizer.SPECIAL_TOKENS")
            tok = cls._from_parts(data["pattern"], data["mergeable_ranks"], int(data["num_reserved"]))
            if tok.get_vocab_size() != data["vocab_size"]:
                raise ValueError(f"vocab size {tok.get_vocab_size()} != recorded {data['vocab_size']}")
            return tok
        except Exception as e:
            raise TokenizerError(f"no tokenizer at {path} (file is corrupt or incompatible: {e}): {fix}") from e

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl and token_bytes.pt into tokenizer_dir, each atomically."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        n_bpe = self.get_vocab_size() - len(SPECIAL_TOKENS) - self.num_reserved
        # tiktoken keeps the ranks in a private attribute; rebuild them if a future version renames it
        ranks = getattr(self.enc, "_mergeable_ranks", None) or {
            self.enc.decode_single_token_bytes(i): i for i in range(n_bpe)}
        data = {"format": _FORMAT_VERSION, "pattern": self.enc._pat_str, "mergeable_ranks": dict(ranks),
                "special_tokens": list(SPECIAL_TOKENS), "num_reserved": self.num_reserved,
                "vocab_size": self.get_vocab_size()}
        _atomic_write(os.path.join(tokenizer_dir, TOKEN_BYTES_FILE), lambda f: torch.save(self.token_bytes(), f))
        _atomic_write(os.path.join(tokenizer_dir, TOKENIZER_FILE), lambda f: pickle.dump(data, f))

    # ------------------------------------------------------------------ vocabulary
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(SPECIAL_TOKENS)

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, text: str) -> int:
        """Id of one special token, e.g. encode_special("<|user_start|>")."""
        if text not in self._special:
            raise KeyError(f"{text!r} is not a special token; known: {SPECIAL_TOKENS}")
        return self._special[text]

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """[V] int64: UTF-8 byte length of each token, 0 for special and reserved ids (they encode no text).
        bits-per-byte = sum(loss nats) / (ln 2 * sum(token_bytes[targets])) is vocab-independent."""
        n_bpe = self.get_vocab_size() - len(SPECIAL_TOKENS) - self.num_reserved  # specials + reserved follow BPE
        lens = [len(self.enc.decode_single_token_bytes(i)) if i < n_bpe else 0 for i in range(self.get_vocab_size())]
        return torch.tensor(lens, dtype=torch.int64)

    # ------------------------------------------------------------------ encode / decode
    def _as_id(self, tok) -> int:
        return self.encode_special(tok) if isinstance(tok, str) else int(tok)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]]. prepend/append: a token id or special string."""
        pre = None if prepend is None else self._as_id(prepend)
        post = None if append is None else self._as_id(append)
        if isinstance(text, str):
            docs, single = [text], True
        elif isinstance(text, (list, tuple)):
            docs, single = list(text), False
        else:
            raise TypeError(f"encode() takes a str or a list of str, got {type(text).__name__}")
        if single:
            out = [self.enc.encode_ordinary(text)]
        else:
            out = self.enc.encode_ordinary_batch(docs, num_threads=num_threads)
        for ids in out:
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
        return out[0] if single else out

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    # ------------------------------------------------------------------ chat format
    @staticmethod
    def _parts(content, where: str):
        """Message content -> list of (type, text). A str is one text part."""
        if isinstance(content, str):
            return [("text", content)]
        if not isinstance(content, list):
            raise ValueError(f"{where}: content must be a str or a list of parts, got {type(content).__name__}")
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output") \
                    or not isinstance(part.get("text"), str):
                raise ValueError(f"{where}, part {j}: expected {{'type': 'text'|'python'|'python_output', "
                                 f"'text': str}}, got {part!r}")
            parts.append((part["type"], part["text"]))
        return parts

    def _normalized_messages(self, conversation):
        """Validate roles; merge a leading system message into the first user message."""
        if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
            raise ValueError("conversation must be a dict {'messages': [...]}")
        msgs = [dict(m) for m in conversation["messages"]]
        if not msgs:
            raise ValueError("conversation has no messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if msgs[0]["role"] == "system":
            if len(msgs) < 2 or msgs[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message (it is merged into it)")
            merged = self._parts(msgs[0]["content"], "message 0 (system)") + [("text", "\n\n")] + \
                self._parts(msgs[1]["content"], "message 1 (user)")
            msgs = [{"role": "user", "content": [{"type": t, "text": s} for t, s in merged]}] + msgs[2:]
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ValueError(f"message {i} (after merging any leading system message) has role {m['role']!r} "
                                 f"but roles must alternate user/assistant starting with user; expected {want!r}")
        return msgs

    def _render(self, msgs):
        ids, mask = [self.bos_token_id], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self._special
        for i, msg in enumerate(msgs):
            parts = self._parts(msg["content"], f"message {i} ({msg['role']})")
            if msg["role"] == "user":
                if any(t != "text" for t, _ in parts):
                    raise ValueError(f"message {i} (user): only text parts are allowed in user messages")
                add([sp["<|user_start|>"]] + self.encode("".join(s for _, s in parts)) + [sp["<|user_end|>"]], 0)
            else:
                add([sp["<|assistant_start|>"]], 0)
                for kind, text in parts:
                    if kind == "text":
                        add(self.encode(text), 1)
                    elif kind == "python":  # the model writes the tool call: supervised
                        add([sp["<|python_start|>"]] + self.encode(text) + [sp["<|python_end|>"]], 1)
                    else:  # python_output comes from the interpreter at inference: never supervised
                        add([sp["<|output_start|>"]] + self.encode(text) + [sp["<|output_end|>"]], 0)
                add([sp["<|assistant_end|>"]], 1)
        return ids, mask

    def render_conversation(self, conversation, max_tokens: int = 2048):
        """-> (ids, mask): <|bos|> <|user_start|>..<|user_end|> <|assistant_start|>..<|assistant_end|> ...
        mask[i] = 1 where ids[i] is a token the assistant must learn to produce, else 0. Truncated to max_tokens."""
        ids, mask = self._render(self._normalized_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation) -> list[int]:
        """Ids of the conversation without its final assistant reply, ending in <|assistant_start|>."""
        conversation = copy.deepcopy(conversation)
        msgs = conversation.get("messages") if isinstance(conversation, dict) else None
        if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
            msgs.pop()
        ids, _ = self._render(self._normalized_messages(conversation))
        return ids + [self._special["<|assistant_start|>"]]

    def visualize_tokenization(self, ids, mask=None) -> str:
        """Debug view: each token in brackets; supervised tokens (mask=1) in green, others in red."""
        out = []
        for i, t in enumerate(ids):
            s = self.id_to_token(t)
            if mask is None:
                out.append(f"[{s}]")
            else:
                color = "\033[92m" if mask[i] else "\033[91m"
                out.append(f"{color}[{s}]\033[0m")
        return "".join(out)


# ---------------------------------------------------------------------- the project tokenizer
def get_tokenizer_dir() -> str:
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer() -> RustBPETokenizer:
    """The tokenizer trained by scripts.tok_train, from $NANOCHAT_BASE_DIR/tokenizer."""
    return RustBPETokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu") -> torch.Tensor:
    """[V] int64 UTF-8 byte length per token (0 for specials), loaded from token_bytes.pt.
    Recomputed from the tokenizer (and re-saved) if the file is absent, unreadable or the wrong size."""
    tok_dir = get_tokenizer_dir()
    path = os.path.join(tok_dir, TOKEN_BYTES_FILE)
    tokenizer = get_tokenizer()  # also validates that a tokenizer exists at all
    token_bytes = None
    if os.path.isfile(path):
        try:
            token_bytes = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            token_bytes = None
    if not (isinstance(token_bytes, torch.Tensor) and token_bytes.dtype == torch.int64
            and token_bytes.shape == (tokenizer.get_vocab_size(),)):
        token_bytes = tokenizer.token_bytes()
        _atomic_write(path, lambda f: torch.save(token_bytes, f))
    return token_bytes.to(device)
