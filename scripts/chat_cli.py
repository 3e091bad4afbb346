"""
Chat with a trained model in the terminal, streaming the reply as it is generated.

    python -m scripts.chat_cli                       # interactive, latest SFT checkpoint
    python -m scripts.chat_cli -i mid -g d12 -s 500  # a given stage / model tag / step
    python -m scripts.chat_cli -p "Why is the sky blue?"   # one question, answer, exit
    python -m scripts.chat_cli --mc                  # MegaContext session: chats longer than the context
    python -m scripts.chat_cli --mc --mc_stats       # ... and print the session's numbers after each reply

Interactive commands: 'quit' (or 'exit', Ctrl-D) leaves, 'clear' starts a new conversation.

The conversation is kept as tokens in the chat format of nanochat.tokenizer (<|bos|>, then
<|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|> per turn), and every turn
the whole conversation is the prompt of nanochat.engine.Engine. A plain GPT only sees
model.config.sequence_len tokens: a reply gets at most the room left in that context, and a
conversation that no longer fits ends with a message (type 'clear', or restart with --mc) instead of a
crash. With --mc the checkpoint's MegaContext modules carry the chat instead: mc.infer.engine.MCEngine
keeps ONE mc.infer.session.MCSession for the whole conversation (each turn ingests only the new user message,
refocuses, and generates; 'clear' starts a new session), so replies are never cut by the context.
--mc_infer_wc_length / --mc_infer_refocus_interval override the checkpoint's working-context cap W
and refocus interval (W must fit the model's sequence_len); MC_OTEL_ENDPOINT sends the
session's telemetry (inference_update, focus_allocator, ...) like training does.
"""

import argparse
import os
import sys

from mc.config import add_session_flags, given_session_flags, session_overrides
from mc.infer.checkpoint import load_model
from mc.infer.engine import MCEngine
from mc.infer.session import MCSessionError
from mc.infer.store import SessionStore, SessionStoreError, checkpoint_identity
from mc.ops.telemetry import provider_from_env
from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import CheckpointError
from nanochat.common import autocast_ctx, compute_init, die
from nanochat.engine import ContextTooLongError, Engine
from nanochat.tokenizer import TokenizerError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with a nanochat model.", allow_abbrev=False)
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"],
                   help="which training stage's checkpoints to load")
    p.add_argument("-g", "--model_tag", type=ck.model_tag, default=None,
                   help="model tag (default: the most recent one)")
    p.add_argument("-s", "--step", type=ck.nonneg_int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("-p", "--prompt", default="", help="answer this one prompt and exit (no interactive loop)")
    p.add_argument("-t", "--temperature", type=ck.temperature, default=0.6, help="sampling temperature (0 = greedy)")
    p.add_argument("-k", "--top_k", type=ck.top_k, default=50, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("-m", "--max_tokens", type=ck.positive_int, default=512, help="longest reply, in tokens")
    p.add_argument("--device_type", default="", choices=["", "cuda", "cpu", "mps"],
                   help="cuda | cpu | mps (empty = autodetect)")
    p.add_argument("--mc", action="store_true", help="use the MegaContext inference session (unbounded chats)")
    p.add_argument("--mc_stats", action="store_true", help="--mc: print the session's numbers after each reply")
    p.add_argument("--session_dir", default="", help="--mc: save the conversation under this folder after every "
                   "message (a kill -9 loses at most the reply being written); reopen it with --session ID")
    p.add_argument("--session", default="", help="--mc --session_dir: reopen this saved conversation")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (each turn uses seed + turn number)")
    add_session_flags(p)  # --mc_infer_wc_length, --mc_infer_refocus_interval, --mc_infer_focus, --mc_infer_max_lod,
    #                       --mc_tree
    args = p.parse_args(argv)
    for flag in given_session_flags(args) + [f"--{n}" for n in ("mc_stats", "session_dir", "session") if getattr(args, n)]:
        if not args.mc:
            p.error(f"{flag} only applies to MegaContext chats: add --mc")
    if args.session and not args.session_dir:
        p.error("--session reopens a conversation saved under --session_dir: add --session_dir DIR")
    return args


class ContextFull(Exception):
    """The conversation no longer fits the model's context (the message says what to do)."""


def make_generator(model, tokenizer, use_mc: bool, args=None, telemetry=None):
    """An Engine, or with --mc an MCEngine over one MegaContext session; clear errors otherwise."""
    if not use_mc:
        return Engine(model, tokenizer)
    if getattr(model, "mc_modules", None) is None:
        die("--mc needs a checkpoint trained with MegaContext (it holds GistNet/LensNet weights, meta['mc_config']); "
            "this checkpoint has no MC modules. Drop --mc to chat within the model's context of "
            f"{model.config.sequence_len} tokens, or train one with `python -m scripts.base_train --mc_enabled=1` "
            "(`bash run10.sh --profile mc`) and load it (-i/-g/-s).")

    try:
        overrides = session_overrides(args) if args is not None else {}
        return MCEngine(model, tokenizer, reuse_session=True, telemetry=telemetry, **overrides)
    except MCSessionError as e:
        die(str(e))


def mc_stats_line(session) -> str:
    """One line of the session's numbers (--mc_stats)."""
    st = session.stats()
    return (f"[mc: history {st['history_tokens']} tokens, WC {st['wc_entries']}/{st['W']} entries "
            f"(lod {st['lod_histogram']}), {st['refocuses']} refocuses, mean swap rate {st['mean_swap_rate']:.3f}, "
            f"re-prefill {st['reprefill_per_token']:.2f} entries/token, KV <= {st['max_kv_entries']} entries, "
            f"tree {st['tree_bytes'] / 1024:.1f} KiB" +
            (f" + {st['mapped_bytes'] / 1024:.1f} KiB on disk]" if st["mapped_bytes"] else "]"))


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
        self.store, self.checkpoint = None, None  # --session_dir: mc.infer.store.SessionStore, checkpoint identity
        self.clear()

    def clear(self):
        self.tokens = [self.tokenizer.get_bos_token_id()]

    def save_to(self, store, checkpoint, session_id: str = "") -> str:
        """--session_dir: save this conversation (reopen `session_id`, else start saving the current one); returns
        its id. A reopened conversation continues where its last commit ended; a reply that was being written
        then is lost, and its turn is closed."""
        self.store, self.checkpoint = store, checkpoint
        if not session_id:
            return store.create(self.generator.session, checkpoint)
        s = self.generator.session = store.open(session_id, self.generator.model, checkpoint,
                                                telemetry=self.generator.session_kwargs.get("telemetry"))
        history = s.token_ids().tolist()
        if history and history[-1] not in (self.assistant_end, self.tokenizer.get_bos_token_id()):
            print("[the reply being written when this conversation stopped was lost; its turn is closed]", flush=True)
            s.ingest([self.assistant_end])
            store.commit(s)
            history.append(self.assistant_end)
        self.tokens, self.turn = history, history.count(self.assistant_end)
        return session_id

    def _commit(self):
        """Make the session durable (--session_dir); a conversation started by 'clear' gets saved as a new one."""
        if self.store is None:
            return
        s = self.generator.session
        if self.store.knows(s.session_id):
            self.store.commit(s)
        else:
            print(f"[new conversation saved as session {self.store.create(s, self.checkpoint)}]", flush=True)

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
                stream = self.generator.generate(prompt, num_samples=1, max_tokens=max_tokens,
                                                 temperature=a.temperature, top_k=a.top_k if a.top_k > 0 else None,
                                                 seed=a.seed + self.turn)
                self._commit()  # the message is in the history now (MCEngine ingests it in generate())
                for column, masks in stream:
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
        if getattr(a, "mc_stats", False) and getattr(self.generator, "session", None) is not None:
            out.write(mc_stats_line(self.generator.session) + "\n")
        if not stopped and len(reply) == max_tokens and max_tokens < a.max_tokens:
            out.write(f"[reply cut off: the model's context of {self.sequence_len} tokens is full. {self.fix_hint}, "
                      f"or restart with --mc for conversations longer than the context.]\n")
        out.flush()
        self.tokens = prompt + reply + [self.assistant_end]
        self.turn += 1
        self._commit()
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
    telemetry = None
    if args.mc:
        try:
            telemetry = provider_from_env("megacontext-chat")
        except (ValueError, RuntimeError) as e:
            die(str(e))
    generator = make_generator(model, tokenizer, args.mc, args, telemetry)
    chat = Chat(generator, tokenizer, model.config.sequence_len, args, device.type, unbounded=args.mc)
    if args.session_dir:
        try:
            sid = chat.save_to(SessionStore(args.session_dir), checkpoint_identity(meta), args.session)
        except (SessionStoreError, OSError) as e:
            die(str(e))
        print(f"[session {sid}, saved under {os.path.abspath(args.session_dir)} after every message; reopen with "
              f"--session {sid}]", flush=True)
    try:
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
    finally:
        if telemetry is not None:
            telemetry.shutdown()


if __name__ == "__main__":
    sys.exit(main())
