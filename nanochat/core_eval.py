"""
The CORE metric: in-context-learning evaluation of a base model (the DCLM "core" task suite style).

Three task types, each example scored with one forward pass (all its choices in one batch):
- multiple_choice  row {"query", "choices": [...], "gold": i}: prompts `query + delim + choice`;
  the model picks the choice with the lowest MEAN per-token loss over the choice tokens (mean, not sum,
  so long choices are not penalized for being long).
- schema           row {"context_options": [...], "continuation", "gold": i}: prompts
  `option + delim + continuation`; the option under which the shared continuation has the lowest mean
  loss wins (the continuation tokens are identical in every prompt, so mean and sum pick the same).
- language_modeling row {"context", "continuation"}: correct iff the greedy argmax prediction at every
  continuation position equals the reference token (teacher-forced exact match).
Few-shot: `num_fewshot` solved examples (drawn with random.Random(FEWSHOT_SEED + example index), never the
example itself) are prepended, separated by blank lines. Tokenization: the context's trailing whitespace
is moved onto the continuation, then <|bos|> + encode(context) + encode(continuation), so the scored span
is exact. Prompts longer than model.config.sequence_len are cropped from the LEFT (the continuation stays).
Choices are right-padded into one [n_choices, T] batch; causal attention means padding changes nothing.

CORE = mean over tasks of the centered accuracy (acc - baseline) / (1 - baseline): 0 = chance, 1 = perfect.

Bundle formats (a directory):
- ours: `core.json` = {"tasks": [{"label", "type", "dataset_uri" (jsonl path relative to the bundle),
  "num_fewshot" (int), "continuation_delimiter" (str), "random_baseline" (fraction in [0, 1))}, ...]}.
- official (https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip): `core.yaml` with
  icl_tasks [{label, dataset_uri, num_fewshot: [k], icl_task_type, continuation_delimiter}], data under
  `eval_data/<dataset_uri>`, and `eval_meta_data.csv` whose "Random baseline" column is in PERCENT.
  core.yaml is read with PyYAML when installed, else with the small parser `parse_simple_yaml` below
  (enough for that file: a mapping holding a list of flat mappings) — no new hard dependency.
Getting bundles (download with resume, the synthetic offline bundle) lives in nanochat/eval_bundle.py.
"""

import csv
import json
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

# getting bundles lives in its own module; re-exported here so `core_eval.download_eval_bundle` etc. work
from nanochat.eval_bundle import OFFICIAL_BUNDLE_URL, build_synthetic_bundle, download_eval_bundle, resolve_bundle  # noqa: F401

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234
SUBSET_SEED = 1337  # --max_per_task takes the first N of one fixed shuffle (tasks are often sorted)


@dataclass
class TaskSpec:
    label: str
    type: str
    dataset_path: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # a fraction: 0.25 for 4-way multiple choice


# ------------------------------------------------------------------------------------------------
# Reading a bundle


def _scalar(text: str):
    """A YAML scalar: quoted string (with escapes), [flow, list], int, float, bool, or a bare string."""
    text = text.strip()
    if text.startswith('"'):
        return json.loads(text)  # YAML double-quoted escapes (\n, \", \\) match JSON's for this use
    if text.startswith("'"):
        return text[1:-1].replace("''", "'")
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(t) for t in text[1:-1].split(",") if t.strip()]
    if text in ("true", "false"):
        return text == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _strip_comment(line: str) -> str:
    """Drop a trailing `# comment` that is outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote and line[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def parse_simple_yaml(text: str) -> dict:
    """The YAML subset of core.yaml: top-level `key: value` and `key:` followed by `- k: v` list items
    (or a bare `-` line, then indented `k: v` lines). Not a general YAML parser."""
    out, cur_list, cur_item = {}, None, None
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        stripped = line.lstrip()
        if not line[0].isspace() and not stripped.startswith("-"):  # top-level key
            key, _, val = stripped.partition(":")
            if val.strip():
                out[key.strip()] = _scalar(val)
                cur_list = None
            else:
                cur_list = out[key.strip()] = []
            continue
        if cur_list is None:
            raise ValueError(f"unsupported YAML line (outside a list): {raw!r}")
        if stripped.startswith("-"):
            cur_item = {}
            cur_list.append(cur_item)
            stripped = stripped[1:].strip()
            if not stripped:
                continue
        key, sep, val = stripped.partition(":")
        if not sep or cur_item is None:
            raise ValueError(f"unsupported YAML line: {raw!r}")
        cur_item[key.strip()] = _scalar(val)
    return out


def _read_yaml(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        # PyYAML only for the official bundle's core.yaml (the synthetic bundle is JSON)
        import yaml
    except ImportError:
        return parse_simple_yaml(text)
    return yaml.safe_load(text)


def load_bundle(bundle_dir: str) -> list[TaskSpec]:
    """The task list of a bundle directory (core.json, or the official core.yaml + eval_meta_data.csv)."""
    json_path, yaml_path = os.path.join(bundle_dir, "core.json"), os.path.join(bundle_dir, "core.yaml")
    specs = []
    if os.path.isfile(json_path):
        with open(json_path, encoding="utf-8") as f:
            tasks = json.load(f)["tasks"]
        for t in tasks:
            specs.append(TaskSpec(t["label"], t["type"], os.path.join(bundle_dir, t["dataset_uri"]),
                                  int(t.get("num_fewshot", 0)), t.get("continuation_delimiter", " "),
                                  float(t["random_baseline"])))
    elif os.path.isfile(yaml_path):
        baselines = {}
        with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
            for row in csv.DictReader(f):
                baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100.0  # percent -> fraction
        for t in _read_yaml(yaml_path)["icl_tasks"]:
            k = t.get("num_fewshot", [0])
            if t["label"] not in baselines:
                raise ValueError(f"task {t['label']!r} has no 'Random baseline' in {bundle_dir}/eval_meta_data.csv")
            specs.append(TaskSpec(t["label"], t["icl_task_type"], os.path.join(bundle_dir, "eval_data", t["dataset_uri"]),
                                  int(k[0] if isinstance(k, list) else k), t.get("continuation_delimiter", " "),
                                  baselines[t["label"]]))
    else:
        raise FileNotFoundError(f"{bundle_dir} is not a CORE bundle (no core.json or core.yaml); use --bundle=synthetic "
                                f"or --bundle=official, or point --bundle at a bundle directory")
    for s in specs:
        if s.type not in TASK_TYPES:
            raise ValueError(f"task {s.label!r}: unknown type {s.type!r}; expected one of {TASK_TYPES}")
        if not 0.0 <= s.random_baseline < 1.0:
            raise ValueError(f"task {s.label!r}: random_baseline {s.random_baseline} must be a fraction in [0, 1)")
    return specs


_REQUIRED = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
             "language_modeling": ("context", "continuation")}


def load_rows(task: TaskSpec) -> list[dict]:
    """The task's jsonl rows, validated (a bad row raises naming file and line)."""
    if not os.path.isfile(task.dataset_path):
        raise FileNotFoundError(f"task {task.label!r}: dataset {task.dataset_path} is missing; re-create the bundle")
    rows = []
    with open(task.dataset_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in _REQUIRED[task.type] if k not in row]
            options = row.get("choices", row.get("context_options"))
            if missing or (options is not None and not (isinstance(row["gold"], int) and 0 <= row["gold"] < len(options))):
                raise ValueError(f"{task.dataset_path}:{lineno}: bad {task.type} row (missing {missing} or gold out of range)")
            rows.append(row)
    if not rows:
        raise ValueError(f"{task.dataset_path} has no rows")
    return rows


# ------------------------------------------------------------------------------------------------
# Prompts, tokens, scoring


def render_example(task: TaskSpec, rows: list[dict], idx: int) -> list[tuple[str, str]]:
    """(context, continuation) per scored sequence: one per choice/option, or one for language_modeling."""
    d, row = task.continuation_delimiter, rows[idx]
    demos = []
    if task.num_fewshot > 0:
        rng = random.Random(FEWSHOT_SEED + idx)
        pool = [j for j in range(len(rows)) if j != idx]
        for j in rng.sample(pool, min(task.num_fewshot, len(pool))):
            r = rows[j]
            if task.type == "multiple_choice":
                demos.append(r["query"] + d + r["choices"][r["gold"]])
            elif task.type == "schema":
                demos.append(r["context_options"][r["gold"]] + d + r["continuation"])
            else:
                demos.append(r["context"] + d + r["continuation"])
    prefix = "".join(demo + "\n\n" for demo in demos)
    if task.type == "multiple_choice":
        return [(prefix + row["query"] + d, c) for c in row["choices"]]
    if task.type == "schema":
        return [(prefix + opt + d, row["continuation"]) for opt in row["context_options"]]
    return [(prefix + row["context"] + d, row["continuation"])]


def encode_pair(tokenizer, context: str, continuation: str, max_len: int | None) -> tuple[list[int], int]:
    """(ids, start): ids[start:] are the continuation tokens. Trailing whitespace of the context moves onto
    the continuation (" Paris" is one token, "" + " " + "Paris" would be two). Too long -> crop from the left."""
    n_ws = len(context) - len(context.rstrip())
    if n_ws:
        context, continuation = context[:-n_ws], context[-n_ws:] + continuation
    ctx = [tokenizer.get_bos_token_id()] + tokenizer.encode(context)
    cont = tokenizer.encode(continuation)
    if not cont:
        raise ValueError(f"empty continuation after context {context[-60:]!r}")
    ids, start = ctx + cont, len(ctx)
    if max_len is not None and len(ids) > max_len:
        drop = len(ids) - max_len
        ids, start = ids[drop:], max(start - drop, 1)
    return ids, start


@torch.no_grad()
def score_sequences(model, seqs: list[tuple[list[int], int]], device, pad_id: int = 0):
    """One forward over right-padded sequences. Returns (mean continuation loss per sequence, whether the
    greedy prediction matches every continuation token). Token ids[t] is predicted by logits[t - 1]."""
    T = max(len(ids) for ids, _ in seqs)
    batch = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for b, (ids, _) in enumerate(seqs):
        batch[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    batch = batch.to(device)
    logits = model(batch)  # [B, T, V]
    losses, exact = [], []
    for b, (ids, start) in enumerate(seqs):
        pred_logits = logits[b, start - 1:len(ids) - 1].float()  # rows that predict the continuation
        targets = batch[b, start:len(ids)]
        losses.append(F.cross_entropy(pred_logits, targets).item())
        exact.append(bool((pred_logits.argmax(dim=-1) == targets).all().item()))
    return losses, exact


def evaluate_example(model, tokenizer, task: TaskSpec, rows: list[dict], idx: int, device) -> bool:
    config = getattr(model, "config", None)
    max_len = getattr(config, "sequence_len", None)
    seqs = [encode_pair(tokenizer, c, k, max_len) for c, k in render_example(task, rows, idx)]
    losses, exact = score_sequences(model, seqs, device, pad_id=tokenizer.get_bos_token_id())
    if task.type == "language_modeling":
        return exact[0]
    return min(range(len(losses)), key=losses.__getitem__) == rows[idx]["gold"]


def evaluate_task(model, tokenizer, task: TaskSpec, device, max_per_task: int = -1) -> tuple[float, int]:
    """(accuracy, examples). Under torch.distributed examples are split over ranks and counts all-reduced."""
    rows = load_rows(task)
    order = list(range(len(rows)))
    if 0 < max_per_task < len(rows):
        random.Random(SUBSET_SEED).shuffle(order)
        order = order[:max_per_task]
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    correct = sum(evaluate_example(model, tokenizer, task, rows, i, device) for i in order[rank::world])
    counts = torch.tensor([correct, len(order[rank::world])], dtype=torch.long, device=device)
    if ddp:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts[0].item() / max(counts[1].item(), 1), counts[1].item()


def centered(accuracy: float, random_baseline: float) -> float:
    """(acc - baseline) / (1 - baseline): 0 at chance, 1 at perfect, negative below chance."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def evaluate_core(model, tokenizer, bundle_dir: str, device, max_per_task: int = -1, log=None) -> dict:
    """Every task of a bundle. Returns {"results": {label: acc}, "centered_results": {label: centered},
    "random_baselines", "counts", "core_metric": mean centered accuracy, "bundle_dir"}."""
    out = {"results": {}, "centered_results": {}, "random_baselines": {}, "counts": {}, "bundle_dir": bundle_dir}
    for task in load_bundle(bundle_dir):
        acc, n = evaluate_task(model, tokenizer, task, device, max_per_task)
        out["results"][task.label] = acc
        out["centered_results"][task.label] = centered(acc, task.random_baseline)
        out["random_baselines"][task.label] = task.random_baseline
        out["counts"][task.label] = n
        if log:
            log(f"{task.label:<32} acc {acc:.4f}  centered {out['centered_results'][task.label]:+.4f}  (n={n})")
    c = out["centered_results"]
    out["core_metric"] = sum(c.values()) / len(c) if c else float("nan")
    return out


def evaluate_core_bundle(model, tokenizer, device, bundle: str = "synthetic", max_per_task: int = -1, log=None) -> dict:
    """evaluate_core() on a named bundle: "synthetic" (built offline from nanochat.synthetic, sized to the
    model's context), "official" (downloaded once), or a bundle directory path. Call on every rank."""
    bundle_dir = resolve_bundle(bundle, model=model, tokenizer=tokenizer,
                                n_per_task=max_per_task if max_per_task > 0 else 500)
    return evaluate_core(model, tokenizer, bundle_dir, device, max_per_task=max_per_task, log=log)

