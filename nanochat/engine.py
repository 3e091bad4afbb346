"""
Batched generation with a KV cache, and the calculator tool the chat model can call.

Engine(model, tokenizer).generate(tokens, num_samples, max_tokens, temperature, top_k, seed) yields one
column of tokens per step (one token per sample) and a mask column (1 = sampled, 0 = forced):

1. Prefill: the prompt runs through the model ONCE with batch 1, filling a batch-1 KV cache.
2. Replicate: a num_samples-row cache copies that prefix into every row (KVCache.prefill broadcasts),
   so the prompt costs one forward whatever the number of samples.
3. First token: the prefill's last logits [1, V] are expanded to [num_samples, V] and sampled per row,
   so samples diverge from their very first token (with temperature > 0).
4. Decode: every step feeds the column of chosen tokens ([num_samples, 1]) back through the model.
   The decode cache starts with room for the prompt + `decode_room` tokens and grows (reallocates 2x,
   copies) when a reply runs longer: a short reply never pays for a long max_tokens x num_samples.
5. Tool use (per row): tokens between <|python_start|> and <|python_end|> are an expression; at
   <|python_end|> it is evaluated by the calculator below and <|output_start|> result <|output_end|>
   is forced into that row over the next steps (mask 0: the model did not choose those tokens).
6. A row stops when it samples <|assistant_end|> or <|bos|>; generation ends when every row stopped
   or after max_tokens steps. A stopped row repeats its stop token with mask 0 in later columns.

prompt + max_tokens must fit model.config.sequence_len (the length the model was trained on), else
ContextTooLongError; longer chats are what the MegaContext session (--mc) is for.

The same generate() contract over a MegaContext session, with no context limit, is mc.infer.engine.MCEngine:
it builds on Engine (Row, _choose: the tool-use state machine) from the floor above; this module never
imports mc.

Utf8StreamDecoder turns streamed token ids into text pieces that never split a UTF-8 character.

The calculator (evaluate_expression / use_calculator) never calls eval(): it walks the Python AST of
the expression and allows only number/string literals, + - * / // % ** and unary +/-, and calls of a
few pure str methods ("strawberry".count("r")). No names, builtins, imports or other attributes exist
in that language. Every operation is size-checked BEFORE it runs (ints at most MAX_INT_BITS bits,
strings at most MAX_STR_LEN chars), so no single step can take long or allocate much; the walk itself
checks a deadline at every node, so the whole evaluation is bounded by `timeout`. (A signal alarm
could not interrupt one long C-level operation such as 9**9**9 anyway, and only works in the main
thread; the size checks + deadline work in any thread, e.g. inside a web server.)
"""

import ast
import math
import operator
import re
import time
import warnings
from collections import deque

import torch

from nanochat.gpt import sample_next_token
from nanochat.kv_cache import KVCache

# ---------------------------------------------------------------------------------------------------
# Calculator

MAX_EXPR_CHARS = 1000
MAX_STR_LEN = 10_000
MAX_INT_BITS = 4096  # 2**4096 has 1234 decimal digits: cheap to compute and to print
STR_METHODS = frozenset({
    "count", "find", "rfind", "index", "rindex", "startswith", "endswith", "upper", "lower", "title",
    "capitalize", "swapcase", "strip", "lstrip", "rstrip", "replace", "split", "isdigit", "isalpha",
    "isalnum", "isupper", "islower", "isspace", "join",
})
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


class CalculatorError(ValueError):
    """The expression is not allowed, too big, or failed to evaluate."""


class CalculatorTimeout(CalculatorError):
    """Evaluation passed its deadline."""


def _is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_size(x):
    """Reject values beyond the size limits (the inputs of every next operation stay cheap)."""
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"integer result over {MAX_INT_BITS} bits")
    if isinstance(x, str) and len(x) > MAX_STR_LEN:
        raise CalculatorError(f"string result over {MAX_STR_LEN} characters")
    if isinstance(x, complex):
        raise CalculatorError("complex results are not supported")
    return x


def _binop(op, a, b):
    """a <op> b after checking that the result's size is bounded (estimated from the operands)."""
    if _is_num(a) and _is_num(b):
        if op is ast.Mult and isinstance(a, int) and isinstance(b, int):
            if a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:  # bits(a*b) <= bits(a) + bits(b)
                raise CalculatorError(f"integer result over {MAX_INT_BITS} bits")
        if op is ast.Pow and isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
            # bits(a**b) ~ b * log2|a|; check before computing (9**9**9 would take minutes)
            if b * math.log2(abs(a)) > MAX_INT_BITS:
                raise CalculatorError(f"integer result over {MAX_INT_BITS} bits")
        return _BINOPS[op](a, b)
    if op is ast.Add and isinstance(a, str) and isinstance(b, str):
        if len(a) + len(b) > MAX_STR_LEN:
            raise CalculatorError(f"string result over {MAX_STR_LEN} characters")
        return a + b
    if op is ast.Mult and {type(a), type(b)} == {str, int}:
        s, n = (a, b) if isinstance(a, str) else (b, a)
        if len(s) * max(n, 0) > MAX_STR_LEN:
            raise CalculatorError(f"string result over {MAX_STR_LEN} characters")
        return s * n
    raise CalculatorError(f"unsupported operand types for {op.__name__}: {type(a).__name__}, {type(b).__name__}")


def _str_method(name, s, args):
    """A whitelisted str method, called on the str type itself (never on an attribute lookup of ours)."""
    if not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in args):
        raise CalculatorError(f"arguments of .{name}() must be strings or integers")
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        n = s.count(args[0]) if args[0] else len(s) + 1  # replacing "" inserts between every char
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        if len(s) + n * max(len(args[1]) - len(args[0]), 0) > MAX_STR_LEN:
            raise CalculatorError(f"string result over {MAX_STR_LEN} characters")
    if name == "join" and len(args) == 1 and isinstance(args[0], str):  # '-'.join('word') spells a word out
        if len(s) * max(len(args[0]) - 1, 0) + len(args[0]) > MAX_STR_LEN:
            raise CalculatorError(f"string result over {MAX_STR_LEN} characters")
    return getattr(str, name)(s, *args)


def _walk(node, deadline):
    if time.monotonic() > deadline:
        raise CalculatorTimeout("the calculator ran out of time")
    if isinstance(node, ast.Constant):
        if not (_is_num(node.value) or isinstance(node.value, str)):
            raise CalculatorError(f"literal {node.value!r} is not allowed")
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        x = _walk(node.operand, deadline)
        if not _is_num(x):
            raise CalculatorError("unary +/- needs a number")
        return -x if isinstance(node.op, ast.USub) else x
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _walk(node.left, deadline), _walk(node.right, deadline)
        return _check_size(_binop(type(node.op), a, b))
    if isinstance(node, ast.Call):
        f = node.func
        if not (isinstance(f, ast.Attribute) and f.attr in STR_METHODS) or node.keywords \
                or any(isinstance(a, ast.Starred) for a in node.args):
            raise CalculatorError("only calls like 'text'.count('t') are allowed "
                                  f"(str methods: {', '.join(sorted(STR_METHODS))})")
        s = _walk(f.value, deadline)
        if not isinstance(s, str):
            raise CalculatorError(f".{f.attr}() can only be called on a string")
        args = [_walk(a, deadline) for a in node.args]
        out = _str_method(f.attr, s, args)
        return [_check_size(x) for x in out] if isinstance(out, list) else _check_size(out)
    raise CalculatorError(f"{type(node).__name__} is not allowed in a calculator expression")


def evaluate_expression(expr: str, timeout: float = 1.0):
    """Evaluate an arithmetic / string-method expression safely. Raises CalculatorError (or
    CalculatorTimeout) for anything disallowed, too large, failing, or slower than `timeout` seconds."""
    if not isinstance(expr, str):
        raise CalculatorError(f"expression must be a str, got {type(expr).__name__}")
    if len(expr) > MAX_EXPR_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPR_CHARS} characters")
    deadline = time.monotonic() + timeout
    try:
        with warnings.catch_warnings():  # e.g. SyntaxWarning for "\d" in model-written text: not our user's concern
            warnings.simplefilter("ignore")
            tree = ast.parse(expr.strip(), mode="eval")
        return _walk(tree.body, deadline)
    except CalculatorError:
        raise
    except (SyntaxError, ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as e:
        raise CalculatorError(f"{type(e).__name__}: {e}") from None


def use_calculator(expr: str, timeout: float = 1.0) -> str | None:
    """The tool as the model sees it: expression text in, result text out (None = nothing to show).
    Thousands separators between digits ("1,234") are dropped first."""
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)
    try:
        return str(evaluate_expression(expr, timeout=timeout))
    except CalculatorError:
        return None


# ---------------------------------------------------------------------------------------------------
# Streaming text out of generated tokens (chat_web; chat_cli does the same inline)


class Utf8StreamDecoder:
    """Turns a stream of token ids into text pieces that never split a multi-byte UTF-8 character.

    Byte-level BPE tokens are byte strings: "é" (2 bytes) or an emoji (4 bytes) can be spread over
    several tokens. Decoding a token alone then yields U+FFFD. So tokens collect in `pending` until
    their decoded text no longer ends in U+FFFD; flush() emits whatever is left at the end.
    (An invalid byte in the middle stays U+FFFD once later text follows: nothing waits forever.)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []

    def push(self, token_id) -> str:
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:  # a character has at most 4 bytes
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tokenizer.decode(self.pending) if self.pending else "", []
        return text


# ---------------------------------------------------------------------------------------------------
# Engine


class ContextTooLongError(ValueError):
    """prompt + max_tokens does not fit the model's context (sequence_len)."""


def check_context(prompt_len: int, max_tokens: int, sequence_len: int):
    """Raise ContextTooLongError unless prompt_len + max_tokens <= sequence_len."""
    if prompt_len + max_tokens > sequence_len:
        raise ContextTooLongError(
            f"prompt of {prompt_len} tokens + max_tokens={max_tokens} = {prompt_len + max_tokens} tokens exceeds "
            f"the model's context of {sequence_len} tokens (sequence_len); start a new chat, shorten the prompt or "
            f"lower max_tokens, or use --mc (MegaContext) for conversations longer than the context")


class Row:
    """Per-sample state: stopped or not, the python expression being written, tokens still to force."""

    def __init__(self):
        self.done = False
        self.stop_token = None
        self.in_python = False
        self.expr_tokens = []
        self.forced = deque()


class Engine:
    """KV-cache generation for a nanochat GPT (see the module docstring for the algorithm)."""

    decode_room = 256  # decode-cache positions allocated up front beyond the prompt (it grows past this)

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        sp = tokenizer.encode_special
        self.python_start, self.python_end = sp("<|python_start|>"), sp("<|python_end|>")
        self.output_start, self.output_end = sp("<|output_start|>"), sp("<|output_end|>")
        self.stop_tokens = {sp("<|assistant_end|>"), tokenizer.get_bos_token_id()}

    def _new_cache(self, batch_size, length, device):
        c = self.model.config
        return KVCache(batch_size, c.n_kv_head, length, c.n_embd // c.n_head, c.n_layer, device=device)

    def _validate(self, tokens, num_samples, max_tokens):
        if not isinstance(tokens, (list, tuple)) or not tokens:
            raise ValueError("tokens must be a non-empty list of token ids (start with the BOS token)")
        vocab = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ValueError(f"tokens must be ints in [0, {vocab}) (the model's vocab_size)")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        seq_len = self.model.config.sequence_len
        if max_tokens is None:  # fill the context; a prompt that already fills it leaves no room: error
            max_tokens = max(seq_len - len(tokens), 1)
        if not isinstance(max_tokens, int):
            raise ValueError(f"max_tokens must be an int >= 0 or None, got {max_tokens!r}")
        if len(tokens) > seq_len:  # (a caller's max_tokens = sequence_len - len(prompt) is negative then)
            check_context(len(tokens), max(max_tokens, 0), seq_len)
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be an int >= 0 or None, got {max_tokens!r}")
        check_context(len(tokens), max_tokens, seq_len)
        return max_tokens

    def _choose(self, row, sampled_token):
        """(token, mask) for one row this step, and advance its tool state machine."""
        if row.done:
            return row.stop_token, 0
        if row.forced:
            return row.forced.popleft(), 0
        tok = sampled_token
        if tok in self.stop_tokens:
            row.done, row.stop_token = True, tok
        elif tok == self.python_start:
            row.in_python, row.expr_tokens = True, []
        elif tok == self.python_end and row.in_python:
            row.in_python = False
            result = use_calculator(self.tokenizer.decode(row.expr_tokens))
            if result is not None:
                row.forced.extend([self.output_start] + self.tokenizer.encode(result) + [self.output_end])
        elif row.in_python:
            row.expr_tokens.append(tok)
        return tok, 1

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yield (token_column, mask_column), each a list of num_samples ints, once per step.
        max_tokens=None: until the context (sequence_len) is full. temperature 0 = greedy.
        Bad arguments and ContextTooLongError are raised here, before the first step is requested."""
        max_tokens = self._validate(tokens, num_samples, max_tokens)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return self._generate(list(tokens), num_samples, max_tokens, temperature, top_k, seed)

    @torch.inference_mode()
    def _generate(self, tokens, num_samples, max_tokens, temperature, top_k, seed):
        if max_tokens == 0:
            return
        device = self.model.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)

        # 1. prefill the prompt once, batch 1
        prefill_cache = self._new_cache(1, len(tokens), device)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :]  # [1, V]
        # 2. replicate it into every sample's row
        cache = self._new_cache(num_samples, len(tokens) + min(max_tokens, self.decode_room), device)
        cache.prefill(prefill_cache)
        del prefill_cache
        # 3. the first token is sampled independently per row from the shared prefill logits
        logits = logits.expand(num_samples, -1)

        rows = [Row() for _ in range(num_samples)]
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = zip(*(self._choose(row, s) for row, s in zip(rows, sampled)))
            column, masks = list(column), list(masks)
            yield column, masks
            if all(row.done for row in rows) or step + 1 == max_tokens:
                break
            # 4. decode: feed the chosen column back (forced tool tokens included)
            ids = torch.tensor(column, dtype=torch.long, device=device)[:, None]
            logits = self.model(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """(results, masks): per sample the full sequence (prompt + completion, stop token excluded) and
        its mask (0 over the prompt and forced tokens, 1 over sampled tokens)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, m) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                if m == 1 and tok in self.stop_tokens:
                    done[i] = True
                    continue
                results[i].append(tok)
                masks[i].append(m)
            if all(done):
                break
        return results, masks
