"""
Chat RL: policy-gradient fine-tuning of the SFT model on a task with a checkable answer.

    python -m scripts.chat_rl                       # offline default: SyntheticRecallChat (reward = exact answer)
    python -m scripts.chat_rl --task gsm8k          # GSM8K (needs the HF hub)
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl --task gsm8k

The algorithm (REINFORCE with a mean baseline, on-policy, no KL term, no ratio clipping):
  for each of --examples_per_step questions q (dealt round-robin over processes):
      sample n = --num_samples replies y_1..y_n ~ π(·|q) with Engine.generate_batch
      r_i = task.reward(q, y_i);   advantage A_i = r_i - mean_j r_j
  objective J = Σ_{q,i} A_i Σ_{t ∈ sampled tokens of y_i} log π(y_{i,t} | q, y_{i,<t}) / N
with N = the number of sampled tokens in the whole step (all processes). We minimise -J. The mean
baseline makes a group where every reply scores the same contribute nothing (no signal, no noise);
replies better than their siblings are pushed up, worse ones down. Only sampled tokens carry
gradient: prompt tokens and tool outputs forced into the reply by the engine (mask 0) are -1 targets.
The rollouts of a step are all generated first, so N is known (one all-reduce) before any backward;
each micro-batch of --device_batch_size rows backpropagates its share × world_size / N, gradients
are averaged across processes before clipping (as in base_train), then one optimizer step.

Learning rate: --init_lr_frac × the base rates, decaying linearly to 0 over the run.
Cadences count optimizer steps when bare, as upstream (--eval_every=60), or rollout tokens (prompt + reply,
summed over all processes) with a unit (2M, 500K, 131072tok); -1 = off (nanochat/cadence.py; a step's
token count varies here, so each cadence keeps its unit): --eval_every runs pass@k on the first
--eval_examples held-out questions (k = 1..--eval_samples samples at --temperature), --save_every saves
a checkpoint. Output: chatrl_checkpoints/<tag>,
report/chat_rl_curve.jsonl (train_loss = -J, plus mean reward), report section "Chat RL".
--resume=auto continues from this stage's newest checkpoint (a finished run exits: "already complete"); a
NaN/inf loss or gradient stops training with a debug checkpoint, or skips the step (--nonfinite=skip).
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from mc.infer.checkpoint import build_model
from nanochat import cli_checks as ck
from nanochat.adamw import average_gradients
from nanochat.cadence import CADENCE_FLAGS, parse_cadence
from nanochat.chat_data import collate
from nanochat.chat_train import (
    mc_meta,
    mc_optimizer_params,
    mc_parts,
    model_state_for_save,
    trainable_params,
)
from nanochat.checkpoint_manager import (
    SOURCE_DIRS,
    CheckpointError,
    find_last_model_tag,
    latest_step,
    load_checkpoint,
    save_checkpoint,
    step_dir,
    tag_dir,
)
from nanochat.common import (
    autocast_ctx,
    compute_cleanup,
    compute_init,
    die,
    get_base_dir,
    init_wandb,
    print0,
)
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.training import (
    CurveLog,
    NonFiniteGuard,
    complete,
    restore_rng,
    resume_problem,
    resume_step,
    rng_state,
)
from tasks import gsm8k
from tasks.common import hub_kw
from tasks.synthetic_chat import SyntheticRecallChat

RESUME_MUST_MATCH = ("task", "examples_per_step", "num_samples", "seed", "init_lr_frac", "max_new_tokens",
                     "temperature", "top_k", "num_iterations")


def build_parser():
    p = argparse.ArgumentParser(description="Policy-gradient RL on a chat task.", allow_abbrev=False)
    a = p.add_argument
    a("--run", default="dummy", help="W&B run name ('dummy' = no W&B)")
    a("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--seed", type=int, default=42)
    a("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint stage to start from")
    a("--source_tag", type=ck.model_tag, default="", help="model tag of the source checkpoint (default: most recent)")
    a("--source_step", type=ck.nonneg_int_or_off, default=-1, help="step of the source checkpoint (-1 = latest)")
    a("--task", default="synthetic", choices=["synthetic", "gsm8k"], help="synthetic = SyntheticRecallChat (offline)")
    a("--data_dir", default="", help="local hub snapshot root for --task gsm8k (<dir>/openai/gsm8k/...)")
    a("--train_examples", type=ck.positive_int, default=2000,
      help="SyntheticRecallChat train questions (--task synthetic)")
    a("--recall_context_chars", type=ck.positive_int, default=2000, help="context characters per recall question")
    a("--num_iterations", type=ck.positive_int_or_off, default=-1,
      help="optimizer steps (-1 = one pass over the train questions)")
    a("--examples_per_step", type=ck.positive_int, default=16, help="questions per step, all processes together")
    a("--num_samples", type=ck.positive_int, default=16, help="rollouts per question")
    a("--device_batch_size", type=ck.positive_int, default=8, help="rows per generation call and per forward/backward")
    a("--max_new_tokens", type=ck.positive_int, default=256)
    a("--temperature", type=ck.temperature, default=1.0)
    a("--top_k", type=ck.top_k, default=50)
    a("--embedding_lr", type=ck.nonneg_float, default=0.2)
    a("--unembedding_lr", type=ck.nonneg_float, default=0.004)
    a("--matrix_lr", type=ck.nonneg_float, default=0.02)
    a("--init_lr_frac", type=ck.nonneg_float, default=0.05, help="all learning rates × this")
    a("--weight_decay", type=ck.nonneg_float, default=0.0)
    a("--grad_clip", type=ck.nonneg_float, default=1.0, help="clip the global grad norm (0 = off)")
    a("--eval_every", type=parse_cadence, default="2M",
      help="pass@k cadence (steps, or rollout tokens: 2M; -1 = final only)")
    a("--eval_examples", type=ck.nonneg_int, default=200, help="held-out questions per pass@k evaluation")
    a("--eval_samples", type=ck.positive_int, default=4, help="k of pass@k: samples per held-out question")
    a("--save_every", type=parse_cadence, default="-1",
      help="checkpoint cadence (steps, or rollout tokens: 2M; -1 = end only)")
    a("--model_tag", type=ck.model_tag, default="", help="output checkpoint folder name (default: the source's tag)")
    a("--resume", default="", help="'' = fresh run, 'auto' = latest checkpoint of this stage if any, or a step")
    a("--keep_last", type=ck.positive_int_or_off, default=-1, help="keep only the newest N checkpoints (-1 = keep all)")
    a("--nonfinite", default="stop", choices=["stop", "skip"],
      help="a NaN/inf loss or gradient: stop (debug checkpoint, exit 2) or skip the step (no update, counted)")
    a("--debug_inject_nan_step", type=ck.nonneg_int_or_off, default=-1,
      help="testing knob: make step N's loss NaN (-1 = off)")
    return p


def build_tasks(args):
    """(train task, held-out task) for --task."""
    if args.task == "gsm8k":
        kw = hub_kw(args.data_dir, gsm8k.HUB_PATH)
        return gsm8k.GSM8K("main", "train", **kw), gsm8k.GSM8K("main", "test", **kw)
    return (SyntheticRecallChat("train", args.train_examples, args.recall_context_chars, seed=2),
            SyntheticRecallChat("val", max(args.eval_examples, 1), args.recall_context_chars, seed=2))


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[n] rewards of one question's samples -> r - mean(r) (zero when all samples score the same)."""
    return rewards - rewards.mean()


def sample_replies(engine, prompt, num_samples, max_tokens, temperature, top_k, seed):
    """num_samples replies from Engine.generate: per reply its tokens and mask (1 = sampled, 0 = forced tool
    output), INCLUDING the stop token the model sampled (<|assistant_end|> or <|bos|>). Engine.generate_batch
    drops that token; policy gradient needs it, or "when to stop" would never be rewarded or punished."""
    replies = [[] for _ in range(num_samples)]
    masks = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    with autocast_ctx(engine.model.get_device().type):
        for column, mask_column in engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens,
                                                   temperature=temperature, top_k=top_k, seed=seed):
            for i, (tok, m) in enumerate(zip(column, mask_column)):
                if not done[i]:
                    replies[i].append(tok)
                    masks[i].append(m)
                    done[i] = m == 1 and tok in engine.stop_tokens
    return replies, masks


def rollout(engine, tokenizer, task, conversation, num_samples, batch_size, args, seed):
    """Sample num_samples replies (in generation calls of <= batch_size) and score them.
    -> list of (ids, mask, reward): ids = prompt + reply, mask 1 on sampled reply tokens only.
    [] when the prompt leaves no room in the model's context for a reply."""
    prompt = tokenizer.render_for_completion(conversation)
    max_tokens = min(args.max_new_tokens, engine.model.config.sequence_len - len(prompt))
    if max_tokens < 1:
        return []
    out = []
    for k in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - k)
        replies, masks = sample_replies(engine, prompt, n, max_tokens, args.temperature, args.top_k, seed + k)
        for reply, mask in zip(replies, masks):
            text = tokenizer.decode([t for t in reply if t not in engine.stop_tokens])
            reward = float(task.reward(conversation, text))
            out.append((prompt + reply, [0] * len(prompt) + mask, reward))  # the prompt never carries gradient
    return out


def policy_gradient_backward(model, rows, num_sampled: float, world_size: int, batch_size: int, pad_id: int, device,
                             guard=None, step: int = 0):
    """Backpropagate -J for rows [(ids, mask, advantage)] in micro-batches of batch_size rows.
    J_local = Σ_rows A Σ_{t: mask[t+1]=1} log π(ids[t+1] | ids[:t+1]); each micro-batch backpropagates
    -J_micro × world_size / num_sampled (num_sampled = N of the whole step, all processes), so after the
    gradient average over processes the gradient is that of -J / N. Returns J_local (detached, float64).
    guard: a NonFiniteGuard that watches each micro-batch's loss of optimizer step `step` (1-based)."""
    objective = torch.zeros((), dtype=torch.float64, device=device)
    for k in range(0, len(rows), batch_size):
        chunk = rows[k:k + batch_size]
        x, y = collate([(ids, m) for ids, m, _ in chunk], pad_id, device=device)
        adv = torch.tensor([a for _, _, a in chunk], dtype=torch.float32, device=device)
        with autocast_ctx(torch.device(device).type):
            logp = -model(x, y, loss_reduction="none")  # [b, L] log-probs of the targets, 0 where y == -1
        term = (logp * adv[:, None]).sum()
        loss = -term * (world_size / max(num_sampled, 1))
        if guard is not None:
            loss = guard.poison(loss, step, k // batch_size)
            guard.watch(k // batch_size, loss)
        loss.backward()
        objective += term.detach().double()
    return objective


@torch.no_grad()
def pass_at_k(engine, tokenizer, task, args, rank, world_size, device) -> list[float]:
    """pass@1..k on the first eval_examples questions: the fraction solved by any of the first j samples."""
    n = min(len(task), args.eval_examples)
    solved = torch.zeros(args.eval_samples + 1, dtype=torch.float64, device=device)  # [0] = question count
    for i in range(rank, n, world_size):
        samples = rollout(engine, tokenizer, task, task[i], args.eval_samples, args.device_batch_size, args, seed=10**6 + i)
        if not samples:
            continue  # too long for the context: not counted
        hits = [r > 0 for _, _, r in samples]
        solved[0] += 1
        for j in range(1, args.eval_samples + 1):
            solved[j] += any(hits[:j])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(solved, op=dist.ReduceOp.SUM)
    return [(solved[j] / max(solved[0], 1)).item() for j in range(1, args.eval_samples + 1)]


def main(argv=None):
    args = build_parser().parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type, seed=args.seed)
    master = rank == 0
    base_dir = get_base_dir()
    user_config = vars(args).copy()
    user_config.update({k: str(v) for k, v in user_config.items() if k in CADENCE_FLAGS})  # "60" / "2000000tok"
    if args.examples_per_step % world_size:
        die(f"--examples_per_step={args.examples_per_step} must be a multiple of the process count {world_size}")
    if min(args.examples_per_step, args.num_samples, args.device_batch_size, args.eval_samples) < 1:
        die("--examples_per_step, --num_samples, --device_batch_size and --eval_samples must be >= 1")

    # ----------------------------------------------------------------------------------------------
    # Model: the source checkpoint, or (resume) this stage's own with its optimizers.
    src_root = os.path.join(base_dir, SOURCE_DIRS[args.source])
    try:
        src_tag = args.source_tag or find_last_model_tag(src_root)
    except CheckpointError as e:
        die(f"{e} (--source={args.source})")
    try:
        checkpoint_dir = tag_dir(os.path.join(base_dir, SOURCE_DIRS["rl"]), args.model_tag or src_tag,
                                 "--model_tag" if args.model_tag else "--source_tag")
        src_dir = tag_dir(src_root, src_tag, "--source_tag")
    except ValueError as e:
        die(str(e))
    start_step, meta, optim_states = 0, None, None
    step_to_load = resume_step(args.resume, checkpoint_dir)
    if step_to_load is not None:
        try:
            _, optim_states, meta, rank_state = load_checkpoint(checkpoint_dir, step_to_load, device,
                                                                load_optimizer=True, rank=rank)
            model, tokenizer, _ = build_model(checkpoint_dir, step_to_load, device, phase="train")
        except (CheckpointError, FileNotFoundError) as e:
            die(str(e))
        problem = resume_problem(meta, user_config, RESUME_MUST_MATCH, world_size)
        if problem:
            die(f"cannot resume {checkpoint_dir} step {step_to_load}: {problem}")
        start_step = meta["step"]
        restore_rng(rank_state, device)
    if meta is None:
        src_step = args.source_step if args.source_step >= 0 else latest_step(src_dir)
        if src_step is None:
            die(f"no complete checkpoint in {src_dir}; train the {args.source} stage first")
        try:
            model, tokenizer, src_meta = build_model(src_dir, src_step, device, phase="train")
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            die(str(e))
        print0(f"starting from {src_dir} step {src_step}")
    # the checkpoint convention: the MC step's state (LensNet's EMAs) passes through RL untouched, like the weights
    mc_train_state = (meta if meta is not None else src_meta).get("mc_train_state")
    mc_modules, _ = mc_parts(model)
    mc_matrix, mc_adam = mc_optimizer_params(mc_modules)
    f = args.init_lr_frac
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr * f, embedding_lr=args.embedding_lr * f,
                                        matrix_lr=args.matrix_lr * f, weight_decay=args.weight_decay,
                                        extra_matrix_params=mc_matrix, extra_adam_params=mc_adam, average_grads=False)
    if optim_states is not None:
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
        print0(f"resumed from {checkpoint_dir} step {start_step}")
    all_params = trainable_params(model)
    if mc_modules is not None:
        print0("MegaContext modules: carried through unchanged (RL samples with the plain GPT)")

    engine = Engine(model, tokenizer)
    try:
        train_task, eval_task = build_tasks(args)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as e:
        die(f"cannot load the {args.task} task: {e}")
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, len(train_task) // args.examples_per_step)
    if meta is not None and complete("chat_rl", checkpoint_dir, start_step, num_iterations):
        compute_cleanup()
        return
    guard = NonFiniteGuard(args.nonfinite, device, model, mc_modules, args.debug_inject_nan_step)

    # ----------------------------------------------------------------------------------------------
    wandb_run = init_wandb(args.run, "nanochat-rl", user_config, master)
    print0(f"Chat RL on {args.task}: {len(train_task):,} questions, {args.examples_per_step} per step × "
           f"{args.num_samples} samples, {num_iterations} steps")
    log_curve = CurveLog(os.path.join(base_dir, "report", "chat_rl_curve.jsonl"), master, start_step).log

    def save(step, directory=checkpoint_dir, extra_meta=None):
        m = {"step": step, "model_config": vars(model.config), "user_config": user_config, "world_size": world_size,
             "tokens": tokens, "source": args.source, "source_tag": src_tag, "pass_at_k": last_pass, **mc_meta(model),
             **({"mc_train_state": mc_train_state} if mc_train_state is not None else {}), **(extra_meta or {})}
        save_checkpoint(directory, step, model_state_for_save(model), [o.state_dict() for o in optimizers], m,
                        rank=rank, world_size=world_size, extra_rank_state=rng_state(device),
                        keep_last_n=args.keep_last if directory == checkpoint_dir else None)
        print0(f"saved checkpoint {step_dir(directory, step)}")
        return step_dir(directory, step)

    def save_debug(step, message):  # the state before `step` (1-based), under debug/: resume never loads it
        return save(step, os.path.join(checkpoint_dir, "debug"), {"step": step - 1, "nonfinite": message})

    # ----------------------------------------------------------------------------------------------
    # The loop. Step s evaluates/saves the model as it is after s steps, then trains step s+1.
    tokens = meta.get("tokens", 0) if meta else 0
    tokens_prev = tokens - 1 if start_step == 0 else tokens
    last_pass, rewards_log, t_start, skipped = (meta or {}).get("pass_at_k"), [], time.time(), 0
    progress = tqdm(total=num_iterations, initial=start_step, desc="chat_rl", unit="step",
                    disable=None if master else True, file=sys.stderr, mininterval=2.0, dynamic_ncols=True)
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations
        steps_prev = step if step == start_step > 0 else step - 1  # a resumed step was evaluated before its save
        if last_step or args.eval_every.due(steps_prev, step, tokens_prev, tokens):
            model.eval()
            last_pass = pass_at_k(engine, tokenizer, eval_task, args, rank, world_size, device)
            model.train()
            print0(f"step {step:05d} | tokens {tokens:,} | " + " ".join(f"pass@{k + 1} {p:.3f}" for k, p in enumerate(last_pass)))
            wandb_run.log({"step": step, **{f"eval/pass@{k + 1}": p for k, p in enumerate(last_pass)}})
            log_curve({"step": step, "tokens": tokens, **{f"pass_at_{k + 1}": p for k, p in enumerate(last_pass)}})
        if step > start_step and (last_step or args.save_every.due(steps_prev, step, tokens_prev, tokens)):
            save(step)
        if last_step:
            break

        # ---- rollouts ----------------------------------------------------------------------------
        t0 = time.time()
        model.eval()
        rows, step_rewards, n_sampled_local, n_tokens_local, skipped_local = [], [], 0, 0, 0
        for j in range(rank, args.examples_per_step, world_size):
            index = (step * args.examples_per_step + j) % len(train_task)
            samples = rollout(engine, tokenizer, train_task, train_task[index], args.num_samples,
                              args.device_batch_size, args, seed=args.seed + 7919 * index + step)
            if not samples:
                skipped_local += 1
                continue
            r = torch.tensor([s[2] for s in samples], dtype=torch.float32)
            for (ids, mask, _), adv in zip(samples, advantages(r).tolist()):
                n_sampled_local += sum(mask[1:])
                n_tokens_local += len(ids)
                if adv != 0:  # a zero advantage contributes exactly nothing: skip its forward/backward
                    rows.append((ids, mask, adv))
            step_rewards += r.tolist()
        model.train()
        # ---- policy gradient: N = sampled tokens of the step, all processes ----------------------
        counts = torch.tensor([n_sampled_local, n_tokens_local, sum(step_rewards), len(step_rewards), skipped_local],
                              dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        n_sampled, n_tokens, reward_sum, n_rollouts, skipped_now = counts.tolist()
        skipped += int(skipped_now)
        objective = policy_gradient_backward(model, rows, n_sampled, world_size, args.device_batch_size,
                                             tokenizer.get_bos_token_id(), device, guard, step + 1)
        if ddp:
            average_gradients(all_params)
            dist.all_reduce(objective, op=dist.ReduceOp.SUM)
        lrm = 1.0 - step / num_iterations
        finite = guard.check(step + 1, all_params, args.grad_clip, save_debug)  # finite → clip; else stop or skip
        for opt in optimizers:
            if finite:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                opt.step()
            opt.zero_grad(set_to_none=True)
        tokens_prev, tokens = tokens, tokens + int(n_tokens)
        progress.update(1)
        if not finite:
            continue
        loss = -(objective.item() / max(n_sampled, 1))
        mean_reward = reward_sum / max(n_rollouts, 1)
        if not math.isfinite(loss):
            die(f"non-finite policy-gradient loss at step {step + 1}; lower --init_lr_frac")
        rewards_log.append(mean_reward)
        if master:
            tqdm.write(f"step {step + 1:05d}/{num_iterations} | reward {mean_reward:.3f} | pg loss {loss:.4f} | "
                       f"sampled tokens {int(n_sampled):,} | dt {(time.time() - t0) * 1000:.0f}ms")
        wandb_run.log({"step": step + 1, "train/reward": mean_reward, "train/pg_loss": loss, "train/tokens": tokens,
                       "train/lrm": lrm})
        log_curve({"step": step + 1, "tokens": tokens, "train_loss": loss, "reward": mean_reward})
    progress.close()

    summary = {"Task": args.task, "Source": f"{args.source}/{src_tag}", "Iterations": num_iterations,
               "Examples per step": args.examples_per_step, "Samples per example": args.num_samples,
               "Rollout tokens": tokens, "Questions skipped (too long)": skipped, "Skipped non-finite steps": guard.skipped, "First mean reward": rewards_log[0] if rewards_log else None,
               "Last mean reward": rewards_log[-1] if rewards_log else None,
               **{f"pass@{k + 1}": p for k, p in enumerate(last_pass or [])},
               "Training time (min)": round((time.time() - t_start) / 60, 2)}
    print0("summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    get_report().log(section="Chat RL", data=[user_config, summary])
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
