"""
Evaluate a chat model (mid / SFT / RL checkpoint) on chat tasks and report ChatCORE.

    python -m scripts.chat_eval -i sft                                   # offline default tasks
    python -m scripts.chat_eval -i sft -a "ARC-Easy|MMLU|GSM8K" --max-problems 200
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i sft -a "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval|SpellingBee"

Flags use hyphens as in upstream (`--max-problems`) and accept underscores too (`--max_problems`).

How a problem is scored:
  - categorical tasks (answer = one of conversation["letters"]): render the conversation up to the
    assistant's turn (render_for_completion), run one forward pass, and at the last prompt position
    compare the logits of the letter tokens only; the argmax letter is the answer. No sampling, so
    a model that has never learned to "say a letter" is still measured on what it knows. Prompts of
    a batch are right-padded; with causal attention padding after a position cannot change it.
  - generative tasks: sample a reply with nanochat.engine.Engine (greedy at --temperature 0) and let
    the task judge it (task.evaluate). With --num-samples k > 1 a problem counts as solved if any
    of the k samples is correct (pass@k).
A prompt that does not fit the model's context (categorical: longer than sequence_len; generative:
no room left for a reply, whose length is capped at the room left) is scored wrong and counted in
the "too long" column (the model never sees it; a MegaContext session is the way to answer those).

ChatCORE. Each task's accuracy is centered on its chance level b:
    centered = (acc - b) / (1 - b)
with b = mean over the evaluated problems of 1 / (number of choices) for categorical tasks (0.25 for
4-choice MMLU; ARC has 3-5 choices) and b = 0 for generative tasks. ChatCORE = mean of the centered
accuracies over the tasks evaluated: 0 = chance, 1 = perfect. (Upstream reports it over the six
standard tasks; the table says which tasks went in.)

Distributed: problems are dealt round-robin over ranks (problem i -> rank i % world) and the counts
are all-reduced, so every rank prints the same totals. Results: a table on stdout and the report
section "Chat evaluation <mid|sft|rl>".
"""

import argparse
import time

import torch
import torch.distributed as dist

from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import CheckpointError, load_model
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, die, print0
from nanochat.engine import Engine
from nanochat.report import get_report
from tasks import arc, gsm8k, humaneval, mmlu
from tasks.common import hub_kw
from tasks.spellingbee import SpellingBee
from tasks.synthetic_chat import SyntheticRecallChat, SyntheticRecallMC

OFFLINE_TASKS = ["SyntheticRecallChat", "SyntheticRecallMC", "SpellingBee"]
ONLINE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]


def build_task(name: str, recall_context_chars: int = 2000, data_dir: str = ""):
    """The evaluation split of one task by its report name. Online tasks load from the Hugging Face hub,
    or from local snapshots under data_dir (<data_dir>/<hub id>/..., see nanochat.chat_train.hub_kw)."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        return arc.ARC(subset=name, split="test", **hub_kw(data_dir, arc.HUB_PATH))
    if name == "MMLU":
        return mmlu.MMLU(subset="all", split="test", **hub_kw(data_dir, mmlu.HUB_PATH))
    if name == "GSM8K":
        return gsm8k.GSM8K(subset="main", split="test", **hub_kw(data_dir, gsm8k.HUB_PATH))
    if name == "HumanEval":
        return humaneval.HumanEval(**hub_kw(data_dir, humaneval.HUB_PATH))
    if name == "SpellingBee":
        return SpellingBee(split="test", num_examples=256)
    if name == "SyntheticRecallChat":
        return SyntheticRecallChat(split="test", context_chars=recall_context_chars)
    if name == "SyntheticRecallMC":
        return SyntheticRecallMC(split="test", context_chars=recall_context_chars)
    known = sorted(set(OFFLINE_TASKS + ONLINE_TASKS))
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(known)}")


def letter_token_ids(tokenizer, letters) -> list[int]:
    """The single token id of each answer letter (as the assistant writes it right after <|assistant_start|>)."""
    ids = []
    for letter in letters:
        toks = tokenizer.encode(letter)
        if len(toks) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(toks)} tokens with this tokenizer; categorical "
                             f"evaluation needs one token per letter")
        ids.append(toks[0])
    return ids


@torch.no_grad()
def score_categorical(model, tokenizer, task, conversations, device) -> list[int | None]:
    """Predicted-letter correctness (1/0) for a batch of categorical conversations; None = prompt too long."""
    T = model.config.sequence_len
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    keep = [i for i, p in enumerate(prompts) if len(p) <= T]
    out: list[int | None] = [None] * len(prompts)
    if not keep:
        return out
    L = max(len(prompts[i]) for i in keep)
    ids = torch.full((len(keep), L), tokenizer.get_bos_token_id(), dtype=torch.long)
    for row, i in enumerate(keep):
        ids[row, :len(prompts[i])] = torch.tensor(prompts[i])
    with autocast_ctx(torch.device(device).type):
        logits = model(ids.to(device))  # [b, L, V]
    for row, i in enumerate(keep):
        conv = conversations[i]
        letters = conv["letters"]
        letter_logits = logits[row, len(prompts[i]) - 1, letter_token_ids(tokenizer, letters)]
        out[i] = int(task.evaluate(conv, letters[int(letter_logits.argmax())]))
    return out


def score_generative(engine, task, tokenizer, conversation, num_samples, max_new_tokens, temperature, top_k,
                     seed) -> int | None:
    """1 if any of num_samples sampled replies is correct (task.evaluate), 0 if none, None if the prompt
    leaves no room for a reply in the model's context. Replies are capped at the room left."""
    prompt = tokenizer.render_for_completion(conversation)
    max_tokens = min(max_new_tokens, engine.model.config.sequence_len - len(prompt))
    if max_tokens < 1:
        return None
    with autocast_ctx(engine.model.get_device().type):
        results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed)
    replies = [tokenizer.decode(r[len(prompt):]) for r in results]
    return int(any(task.evaluate(conversation, reply) for reply in replies))


def evaluate_task(name, task, model, tokenizer, engine, args, rank, world_size, device) -> dict:
    """Counts for one task on this rank's share of problems, all-reduced: correct, total, too_long, baseline."""
    n = len(task) if args.max_problems <= 0 else min(len(task), args.max_problems)
    mine = list(range(rank, n, world_size))
    correct = too_long = 0
    baseline_sum = 0.0
    t0 = time.time()
    if task.eval_type == "categorical":
        for k in range(0, len(mine), args.batch_size):
            convs = [task[i] for i in mine[k:k + args.batch_size]]
            for conv, ok in zip(convs, score_categorical(model, tokenizer, task, convs, device)):
                correct += ok or 0
                too_long += ok is None
                baseline_sum += 1.0 / len(conv["letters"])
    else:
        for i in mine:
            ok = score_generative(engine, task, tokenizer, task[i], args.num_samples, args.max_new_tokens,
                                  args.temperature, args.top_k, seed=args.seed + i)
            correct += ok or 0
            too_long += ok is None
    counts = torch.tensor([correct, len(mine), too_long, baseline_sum], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, total, too_long, baseline_sum = counts.tolist()
    acc = correct / total if total else 0.0
    baseline = baseline_sum / total if (total and task.eval_type == "categorical") else 0.0
    return {"task": name, "type": task.eval_type, "total": int(total), "correct": int(correct),
            "too_long": int(too_long), "accuracy": acc, "baseline": baseline,
            "centered": (acc - baseline) / (1 - baseline), "seconds": time.time() - t0}


def format_table(rows, chatcore) -> str:
    lines = ["| Task | type | problems | correct | too long | accuracy | baseline | centered |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['type']} | {r['total']} | {r['correct']} | {r['too_long']} | "
                     f"{r['accuracy']:.4f} | {r['baseline']:.4f} | {r['centered']:.4f} |")
    lines.append(f"| **ChatCORE** ({len(rows)} tasks) | | | | | | | {chatcore:.4f} |")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a chat model; prints a table and ChatCORE.", allow_abbrev=False)
    a = p.add_argument
    a("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="checkpoint stage to evaluate")
    a("-a", "--task-name", "--task_name", dest="task_name", default="",
      help=f"tasks separated by '|' or ',' (default offline: {'|'.join(OFFLINE_TASKS)}; "
           f"with --online: {'|'.join(ONLINE_TASKS)})")
    a("--online", action="store_true", help="default to the standard online task list (needs the HF hub)")
    a("-g", "--model-tag", "--model_tag", type=ck.model_tag, dest="model_tag", default=None,
      help="checkpoint tag (default: latest)")
    a("-s", "--step", type=ck.nonneg_int, default=None, help="checkpoint step (default: latest)")
    a("-x", "--max-problems", "--max_problems", dest="max_problems", type=ck.positive_int_or_off, default=-1,
      help="problems per task (-1 = all)")
    a("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=ck.positive_int, default=512)
    a("-t", "--temperature", type=ck.temperature, default=0.0)
    a("-k", "--top-k", "--top_k", dest="top_k", type=ck.top_k, default=50)
    a("-n", "--num-samples", "--num_samples", dest="num_samples", type=ck.positive_int, default=1,
      help="samples per generative problem (pass@n)")
    a("-b", "--batch-size", "--batch_size", dest="batch_size", type=ck.positive_int, default=8,
      help="problems per forward pass (categorical tasks)")
    a("--device-type", "--device_type", dest="device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--data-dir", "--data_dir", dest="data_dir", default="",
      help="local hub snapshots for the online tasks (<dir>/<hub id>/...); default: the Hugging Face hub")
    a("--recall-context-chars", "--recall_context_chars", dest="recall_context_chars", type=ck.positive_int,
      default=2000,
      help="context characters of the SyntheticRecall questions (match what the model was trained on)")
    a("--seed", type=int, default=42)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.num_samples < 1:
        die("--batch-size and --num-samples must be >= 1")
    if args.num_samples > 1 and args.temperature == 0:
        die("--num-samples > 1 with --temperature 0 gives identical samples; set a temperature > 0")
    names = [s.strip() for s in args.task_name.replace(",", "|").split("|") if s.strip()] or \
        (ONLINE_TASKS if args.online else OFFLINE_TASKS)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    try:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        die(str(e))
    tasks = {}
    for name in names:
        try:
            tasks[name] = build_task(name, args.recall_context_chars, args.data_dir)
        except (ValueError, RuntimeError, FileNotFoundError, ImportError) as e:
            die(f"cannot load task {name}: {e}")
    engine = None
    if any(t.eval_type != "categorical" for t in tasks.values()):
        engine = Engine(model, tokenizer)

    rows = []
    for name, task in tasks.items():
        r = evaluate_task(name, task, model, tokenizer, engine, args, rank, world_size, device)
        print0(f"{name}: {r['correct']}/{r['total']} = {r['accuracy']:.4f} ({r['seconds']:.1f}s)")
        rows.append(r)
    chatcore = sum(r["centered"] for r in rows) / len(rows)
    table = format_table(rows, chatcore)
    print0(table)
    config = {"Source": args.source, "Model tag": args.model_tag or "latest", "Step": meta.get("step"),
              "Tasks": "|".join(names), "Max problems": args.max_problems, "Temperature": args.temperature,
              "Num samples": args.num_samples, "Max new tokens": args.max_new_tokens, "World size": world_size}
    results = {r["task"]: r["accuracy"] for r in rows}
    results["ChatCORE metric"] = chatcore
    get_report().log(section=f"Chat evaluation {args.source}", data=[config, results, table])
    compute_cleanup()
    return rows, chatcore


if __name__ == "__main__":
    main()
