"""
Chat with a trained model in the terminal, streaming the reply as it is generated.

    python -m scripts.chat_cli                       # interactive, latest SFT checkpoint
    python -m scripts.chat_cli -i mid -g d12 -s 500  # a given stage / model tag / step
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one question, answer, exit
    python -m scripts.chat_cli --mc                  # MegaContext session: chats longer than the context

Interactive commands: 'quit' (or 'exit', Ctrl-D) leaves, 'clear' starts a new conversation.

The conversation is kept as tokens in the chat format of nanochat.tokenizer (<|bos|>, then
<|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|> per turn), and every turn
the whole conversation is the prompt of nanochat.engine.Engine. A plain GPT only sees
model.config.sequence_len tokens: a reply gets at most the room left in that context, and a
conversation that no longer fits ends with a message (type 'clear', or restart with --mc) instead of a
crash. With --mc the checkpoint's MegaContext modules and the MC inference session (mc.session.MCSession,
an Engine-compatible generator without that limit) carry the chat instead.
"""

import argparse
import sys

from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import autocast_ctx, compute_init, die
from nanochat.engine import ContextTooLongError, Engine
from nanochat.tokenizer import TokenizerError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a nanochat model.", allow_abbrev=False)
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                   help="which training stage's checkpoints to load")
    p.add_argument("-g", "--model_tag", default=None, help="model tag (default: the most recent one)")
    p.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-p", "--prompt", default="", help="answer this one prompt and exit (no interactive loop)")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("-k", "--top_k", type=int, default=50, help="sample among the k likeliest tokens (<= 0: all)")
    p.add_argument("-m", "--max_tokens", type=int, default=512, help="longest reply, in tokens")
    p.add_argument("--device_type", default="", choices=["", "cuda", "cpu", "mps"],
                   help="cuda | cpu | mps (empty = autodetect)")
    p.add_argument("--mc", action="store_true", help="use the MegaContext inference session (unbounded chats)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (each turn uses seed + turn number)")
    args = p.parse_args(argv)
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_tokens < 1:
        p.error(f"--max_tokens must be >= 1, got {args.max_tokens}")
    return args


class ContextFull(Exception):
    """The conversation no longer fits the model's context (the message says what to do)."""


def make_generator(model, tokenizer, use_mc: bool):
    """An Engine, or with --mc the MegaContext session (Engine-compatible .generate); clear errors otherwise."""
    if not use_mc:
        return Engine(model, tokenizer)
    if getattr(model, "mc_modules", None) is None:
        die("--mc needs a checkpoint trained with MegaContext (it holds GistNet/LensNet weights, meta['mc_config']); "
            "this checkpoint has no MC modules. Drop --mc to chat within the model's context of "
            f"{model.config.sequence_len} tokens, or load an MC-trained checkpoint (-i/-g/-s).")
    try:
        from mc.session import MCSession
    except ModuleNotFoundError as e:
        if e.name not in ("mc", "mc.session"):
            raise
        die("the MegaContext inference session (mc/session.py) has not landed in this version yet, so --mc chats "
            f"are not available; drop --mc to chat within the model's context of {model.config.sequence_len} tokens.")
    return MCSession(model, tokenizer)


class Chat:
    """A conversation as tokens + the generator that continues it."""

    def __init__(self, generator, tokenizer, sequence_len, args, device_type, unbounded=False):
        self.generator, self.tokenizer, self.args = generator, tokenizer, args
        self.sequence_len, self.device_type, self.unbounded = sequence_len, device_type, unbounded
        sp = tokenizer.encode_special
        self.user_start, self.user_end = sp("<|user_start|>"), sp("<|user_end|>")
        self.assistant_start, self.assistant_end = sp("<|assistant_start|>"), sp("<|assistant_end|>")
        self.stop_tokens = {self.assistant_end, tokenizer.get_bos_token_id()}
        self.turn = 0
        self.fix_hint = "Type 'clear' to start a new chat"  # what the user can do when the context is full
        self.clear()

    def clear(self):
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def _budget(self, prompt):
        """Max reply tokens for this prompt; ContextFull if nothing fits."""
        if self.unbounded:
            return self.args.max_tokens
        room = self.sequence_len - len(prompt)
        if room <= 0:
            raise ContextFull(
                f"[this conversation is {len(prompt)} tokens with your message, more than the model's context of "
                f"{self.sequence_len} tokens. {self.fix_hint}, or restart with --mc to use MegaContext for "
                f"conversations longer than the context.]")
        return min(self.args.max_tokens, room)

    def reply(self, text: str, out, header: str = "") -> str:
        """Add the user's message, stream `header` and then the assistant's reply to `out`, return the reply
        text. Raises ContextFull (nothing printed, the conversation unchanged) when it no longer fits."""
        prompt = self.tokens + [self.user_start] + self.tokenizer.encode(text) + [self.user_end, self.assistant_start]
        max_tokens = self._budget(prompt)
        out.write(header)
        out.flush()
        a = self.args
        reply, printed, stopped = [], "", False
        try:
            with autocast_ctx(self.device_type):
                for column, masks in self.generator.generate(prompt, num_samples=1, max_tokens=max_tokens,
                                                             temperature=a.temperature,
                                                             top_k=a.top_k if a.top_k > 0 else None,
                                                             seed=a.seed + self.turn):
                    tok = column[0]
                    if masks[0] == 1 and tok in self.stop_tokens:
                        stopped = True
                        break
                    reply.append(tok)
                    text_so_far = self.tokenizer.decode(reply)
                    if not text_so_far.endswith("\ufffd"):  # hold back half of a multi-byte character
                        out.write(text_so_far[len(printed):])
                        out.flush()
                        printed = text_so_far
        except ContextTooLongError as e:  # the generator's own check (should not trigger after _budget)
            raise ContextFull(f"[{e}]") from None
        final = self.tokenizer.decode(reply)
        out.write(final[len(printed):] + "\n")
        if not stopped and len(reply) == max_tokens and max_tokens < a.max_tokens:
            out.write(f"[reply cut off: the model's context of {self.sequence_len} tokens is full. {self.fix_hint}, "
                      f"or restart with --mc for conversations longer than the context.]\n")
        out.flush()
        self.tokens = prompt + reply + [self.assistant_end]
        self.turn += 1
        return final


def interactive(chat: Chat):
    print("Chat started. Type 'quit' to exit, 'clear' to start a new conversation.", flush=True)
    while True:
        try:
            line = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text.lower() in ("quit", "exit"):
            return
        if text.lower() == "clear":
            chat.clear()
            print("[new conversation]", flush=True)
            continue
        try:
            chat.reply(text, sys.stdout, header="\nAssistant: ")
        except ContextFull as e:
            print(e, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _, _, _, _, device = compute_init(args.device_type)
    except (ValueError, RuntimeError) as e:
        die(str(e))
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (CheckpointError, TokenizerError, ValueError) as e:
        die(str(e))
    generator = make_generator(model, tokenizer, args.mc)
    chat = Chat(generator, tokenizer, model.config.sequence_len, args, device.type, unbounded=args.mc)
    if args.prompt:
        chat.fix_hint = "Shorten the prompt"
        try:
            chat.reply(args.prompt, sys.stdout)
        except ContextFull as e:
            print(e, file=sys.stderr, flush=True)
            return 1
        return 0
    interactive(chat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
