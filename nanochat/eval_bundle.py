"""
Where CORE bundles come from (the harness that scores them is nanochat/core_eval.py).

- download_eval_bundle(url, dest): the official DCLM-derived bundle zip. Streams into `<dest>.zip.part`,
  resuming with an HTTP Range request after an interruption (a server that ignores Range just restarts
  the file), checks the size against Content-Length, then unzips into `<dest>.unzip-tmp` (refusing paths
  that escape it) and os.replace()s the folder holding core.yaml to `dest`: `dest` is complete or absent.
- build_synthetic_bundle(dest, ...): the OFFLINE default. A core.json bundle cut from validation documents
  of the synthetic corpus (nanochat.synthetic): each item is an excerpt that starts at a fact's statement
  and ends just before a later recall of that fact's value, short enough to fit the model's context.
      synthetic_recall_mc    multiple_choice: the true value vs n_choices-1 distractors of the same
                             category (other passkeys of the same length, other cities, ...)
      synthetic_fact_schema  schema: the same recall after n_choices excerpts whose fact states different
                             values; only the excerpt that states the recalled value is right (a model
                             that ignores the fact scores at chance, whatever its priors over values)
      synthetic_recall_lm    language_modeling: greedy completion must reproduce the value exactly
                             ("complete the passkey"); random baseline 0
  Deterministic given its arguments. Numbers are comparable only between runs with the same bundle
  arguments (core.json records them under "source").
- resolve_bundle(name): "synthetic" | "official" | a directory -> a ready bundle directory; rank 0
  builds/downloads, the other ranks wait at a barrier. Synthetic bundles are cached in
  $NANOCHAT_BASE_DIR/eval_bundle_synthetic_ctx<model sequence_len>_n<examples per task>/ and rebuilt when
  the recorded arguments (e.g. the tokenizer's vocab size) differ.
"""

import json
import os
import random
import shutil
import urllib.error
import urllib.request
import zipfile

import torch.distributed as dist

from nanochat import synthetic
from nanochat.common import get_base_dir, get_dist_info

OFFICIAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


# ------------------------------------------------------------------------------------------------
# Official bundle download


def _fetch(url: str, part: str, timeout: float) -> None:
    """One attempt: append to `part` from where it stops (Range), or restart it if the server sends it all."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part file is already whole (size checked by caller)
            return
        raise
    with resp:
        if resp.status == 206:
            total = int(resp.headers.get("Content-Range", "*/0").rsplit("/", 1)[1] or 0)
            mode = "ab"
        else:  # 200: the server ignored Range (or we had nothing): start over
            total, mode = int(resp.headers.get("Content-Length") or 0), "wb"
        with open(part, mode) as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
    size = os.path.getsize(part)
    if total and size != total:
        raise IOError(f"download of {url} stopped at {size} of {total} bytes")


def download_eval_bundle(url: str = OFFICIAL_BUNDLE_URL, dest: str | None = None, expected_size: int | None = None,
                         retries: int = 3, timeout: float = 60.0) -> str:
    """Download + unzip the bundle into `dest` (default $NANOCHAT_BASE_DIR/eval_bundle) unless it is already
    there. Returns dest. Offline -> RuntimeError saying how to proceed."""
    dest = dest or os.path.join(get_base_dir(), "eval_bundle")
    if any(os.path.isfile(os.path.join(dest, f)) for f in ("core.yaml", "core.json")):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    zip_path, part = dest + ".zip", dest + ".zip.part"
    if not os.path.isfile(zip_path):
        for attempt in range(1, retries + 1):
            try:
                _fetch(url, part, timeout)
                break
            except (urllib.error.URLError, OSError) as e:
                if attempt == retries:
                    raise RuntimeError(
                        f"could not download the CORE eval bundle from {url} ({e}). No network? Use --bundle=synthetic "
                        f"(the offline default), or fetch the zip elsewhere and unzip it so {dest}/core.yaml exists; "
                        f"a partial download in {part} resumes on the next try") from e
        got = os.path.getsize(part)
        if expected_size is not None and got != expected_size:
            os.remove(part)
            raise RuntimeError(f"{url}: got {got} bytes, expected {expected_size}; deleted the file, run again")
        os.replace(part, zip_path)
    tmp = dest + ".unzip-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for name in zf.namelist():
                target = os.path.realpath(os.path.join(tmp, name))
                if not target.startswith(os.path.realpath(tmp) + os.sep):
                    raise RuntimeError(f"{zip_path}: entry {name!r} would unpack outside the bundle; refusing")
            zf.extractall(tmp)
    except zipfile.BadZipFile as e:
        os.remove(zip_path)
        raise RuntimeError(f"{zip_path} is not a valid zip ({e}); deleted it, run again to re-download") from e
    root = next((r for r, _, files in os.walk(tmp) if "core.yaml" in files or "core.json" in files), None)
    if root is None:
        shutil.rmtree(tmp)
        raise RuntimeError(f"{url} holds no core.yaml/core.json; is it a CORE eval bundle?")
    os.replace(root, dest)
    shutil.rmtree(tmp, ignore_errors=True)
    os.remove(zip_path)
    return dest


# ------------------------------------------------------------------------------------------------
# Synthetic bundle


def _category(answer: str, kind: str) -> tuple:
    """Which values can stand in for `answer` as distractors: digits of the same length, else the word list of
    nanochat.synthetic that holds it (CITIES, PETS, ...), else the recall kind."""
    if answer.isdigit():
        return ("digits", len(answer))
    try:
        for name, val in vars(synthetic).items():
            if name.isupper() and isinstance(val, list) and answer in val:
                return ("list", name)
    except ImportError:
        pass
    return ("kind", kind)


def _distractors(answer, category, pool, n, rng):
    """n values of the answer's category other than the answer (None if there are not enough)."""
    values = set(pool.get(category, set()))
    if category[0] == "list":
        values |= set(getattr(synthetic, category[1]))
    cands = sorted(values - {answer})
    if len(cands) < n and category[0] == "digits":
        while len(cands) < n:
            v = "".join(rng.choice("0123456789") for _ in range(category[1]))
            if v != answer and v not in cands:
                cands.append(v)
    return rng.sample(cands, n) if len(cands) >= n else None


def _collect_items(document_fn, n_items, seed, max_chars, fits, max_docs, per_doc=4):
    """Excerpts [fact_start, answer_start) + answer from val documents until n_items are found."""
    items = []
    for index in range(max_docs):
        doc = document_fn(index, split="val", seed=seed, target_chars=max(2 * max_chars, 2000))
        taken = 0
        for r in doc.recalls:
            if taken == per_doc:  # spread items over many documents (people, passkeys, ledgers differ)
                break
            answer = doc.text[r.answer_start:r.answer_end]
            context = doc.text[r.fact_start:r.answer_start]
            if not answer.strip() or r.answer_end - r.fact_start > max_chars or not fits(context + answer):
                continue
            items.append({"context": context, "answer": answer, "kind": r.kind, "doc": index})
            taken += 1
            if len(items) >= n_items:
                return items
    return items


def build_synthetic_bundle(dest: str, n_per_task: int = 500, seed: int = 0, max_chars: int = 1500,
                           tokenizer=None, max_tokens: int | None = None, n_choices: int = 4,
                           document_fn=None, max_docs: int | None = None) -> str:
    """Write the synthetic CORE bundle (see module docstring) to `dest` atomically; returns dest.
    With tokenizer + max_tokens, only excerpts of at most max_tokens tokens (<|bos|> included) are kept."""
    if document_fn is None:
        document_fn = synthetic.synthetic_document
    fits = (lambda s: len(tokenizer.encode(s)) + 1 <= max_tokens) if tokenizer is not None and max_tokens else (lambda s: True)
    items = _collect_items(document_fn, n_per_task, seed, max_chars, fits, max_docs or 50 * n_per_task + 100)
    if not items:
        raise ValueError(f"no synthetic recall fits in max_chars={max_chars} / max_tokens={max_tokens}; "
                         f"the model context is too short for the synthetic CORE bundle (use a longer --max_seq_len)")
    pool = {}
    for it in items:
        it["category"] = _category(it["answer"], it["kind"])
        pool.setdefault(it["category"], set()).add(it["answer"])
    mc, schema, lm = [], [], []
    for k, it in enumerate(items):
        rng = random.Random(seed * 1_000_003 + k)
        ans, ctx = it["answer"], it["context"]
        lm.append({"context": ctx, "continuation": ans, "kind": it["kind"]})
        others = _distractors(ans, it["category"], pool, n_choices - 1, rng)
        if others is None:
            continue
        choices = [ans] + others
        rng.shuffle(choices)
        mc.append({"query": ctx, "choices": choices, "gold": choices.index(ans), "kind": it["kind"]})
        if ctx.count(ans) == 1:  # the value appears once: in the fact statement. Swap it per option.
            pos = ctx.index(ans)
            options = [ctx[:pos] + c + ctx[pos + len(ans):] for c in choices]
            schema.append({"context_options": options, "continuation": ans, "gold": choices.index(ans), "kind": it["kind"]})
    tasks = [("synthetic_recall_mc", "multiple_choice", mc, 1.0 / n_choices),
             ("synthetic_fact_schema", "schema", schema, 1.0 / n_choices),
             ("synthetic_recall_lm", "language_modeling", lm, 0.0)]
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    core = {"source": _source_args(n_per_task, seed, max_chars, tokenizer, max_tokens, n_choices), "tasks": []}
    for label, kind, rows, baseline in tasks:
        if not rows:
            continue
        with open(os.path.join(tmp, f"{label}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        core["tasks"].append({"label": label, "type": kind, "dataset_uri": f"{label}.jsonl", "num_fewshot": 0,
                              "continuation_delimiter": "", "random_baseline": baseline})
    with open(os.path.join(tmp, "core.json"), "w", encoding="utf-8") as f:
        json.dump(core, f, indent=2)
    old = dest + ".old"
    if os.path.exists(dest):
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _source_args(n_per_task, seed, max_chars, tokenizer, max_tokens, n_choices) -> dict:
    return {"generator": "nanochat.synthetic", "split": "val", "n_per_task": n_per_task, "seed": seed,
            "max_chars": max_chars, "max_tokens": max_tokens, "n_choices": n_choices,
            "vocab_size": tokenizer.get_vocab_size() if tokenizer is not None else None}


# ------------------------------------------------------------------------------------------------


def resolve_bundle(bundle: str = "synthetic", model=None, tokenizer=None, n_per_task: int = 500) -> str:
    """A ready bundle directory for "synthetic" (built, or reused when core.json's "source" matches),
    "official" (downloaded once), or a path. Under torch.distributed call it on every rank."""
    base = get_base_dir()
    rank = get_dist_info()[1]
    if bundle == "synthetic":
        max_tokens = getattr(getattr(model, "config", None), "sequence_len", None)
        # one folder per shape, so runs with different contexts never rebuild each other's bundle
        dest = os.path.join(base, f"eval_bundle_synthetic_ctx{max_tokens or 'any'}_n{n_per_task}")
        max_chars = min(4000, 4 * max_tokens) if max_tokens else 1500
        want = _source_args(n_per_task, 0, max_chars, tokenizer, max_tokens, 4)
        if rank == 0:
            try:
                with open(os.path.join(dest, "core.json")) as f:
                    fresh = json.load(f).get("source") == want
            except (OSError, ValueError):
                fresh = False
            if not fresh:
                build_synthetic_bundle(dest, n_per_task=n_per_task, max_chars=max_chars, tokenizer=tokenizer,
                                       max_tokens=max_tokens)
    elif bundle == "official":
        dest = os.path.join(base, "eval_bundle")
        if rank == 0:
            download_eval_bundle(OFFICIAL_BUNDLE_URL, dest)
    else:
        dest = bundle
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if not os.path.isdir(dest):
        raise FileNotFoundError(f"--bundle={bundle}: {dest} is not a directory; use synthetic, official or a bundle path")
    return dest
