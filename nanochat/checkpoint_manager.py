"""
Atomic checkpoints: save/load the model, the optimizers, per-rank state (loader position, RNG) and meta.

Layout (one folder per step; `source` is base | mid | chatsft | chatrl):

    $NANOCHAT_BASE_DIR/<source>_checkpoints/<model_tag>/step_000123/
        model.pt            rank 0: the model state_dict
        optim_rank0.pt ...  each rank: list of its optimizers' state_dicts (sharded optimizers differ per rank)
        rank0.json ...      each rank: extra JSON state (data loader position, RNG, ...)
        meta.json           written LAST: the caller's meta + "_checkpoint": {step, world_size, files: {name: bytes},
                            sha256: {name: hex digest}}

Why a crash can never leave a half checkpoint that looks complete:
  1. rank 0 creates `step_000123.tmp` (removing stale leftovers); every rank writes its files into it,
     each one as <name>.part → flush → fsync → os.replace(<name>) (a file is either absent or whole);
  2. after a barrier, rank 0 writes meta.json (with every file's size) the same way, fsyncs the folder,
     then os.replace()s `step_000123.tmp` → `step_000123` and fsyncs the parent. A rename is atomic, so
     `step_000123` appears all at once. Overwriting an existing step renames the old one aside to
     `step_000123.old` first, then deletes it (a crash in that instant loses that one step, never an
     earlier one).
  3. latest_step() only looks at folders named exactly `step_<digits>` that hold a meta.json. `*.tmp` and
     `*.old` folders are ignored, and removed by the next save. A `step_N` folder without meta.json was
     not written by this module: latest_step() skips it with a warning; load_checkpoint() on it raises.
If files go bad later (disk trouble, manual copying), load_checkpoint() checks presence and sizes against
meta.json and wraps torch.load errors into one CheckpointError that names the file and the fix.

Checksums: every file's sha256 is computed while it is written (the bytes pass through a hashing writer, so a
save costs no extra read) and recorded in meta.json; load_checkpoint() re-hashes each file it loads and refuses a
mismatch (one extra sequential read of the file, ~1 s/GB, usually from the page cache). verify_checkpoint()
stays cheap (sizes only). Checkpoints saved before checksums existed have no "sha256" entry and load unchecked.
Everything is loaded with torch.load(weights_only=True): optimizer state_dicts are plain dicts/lists/numbers/
tensors, so nothing in a checkpoint can run code when it is loaded.

Model tags: tag_dir() builds <root>/<tag> and refuses a tag that would leave <root> ('../x', '/abs', 'a/b').

Test hook (tests/test_fault_resume.py): NANOCHAT_TEST_CHECKPOINT_PAUSE=<step>[:<seconds>] makes the save of
that step stop for <seconds> (default 600) after every rank's files are in `step_N.tmp`, before meta.json and
the rename, announcing it on stderr, so a test can SIGKILL the process in the middle of a checkpoint write.
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import time

import torch
import torch.distributed as dist

from nanochat import tokenizer as tokenizer_module
from nanochat.common import get_base_dir, print0
from nanochat.gpt import GPT, GPTConfig

STEP_RE = re.compile(r"^step_(\d+)$")
EXTRA_PREFIX = "mc."  # model-state entries of modules above this floor (build_model hands them back as they are)

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model/tokenizer (message says the fix)."""


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path):
    """Make a rename/creation inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """File wrapper that hashes what passes through write(); torch.save writes a stream front to back."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def file_sha256(path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def _write_atomic(path, write_fn) -> str:
    """write_fn(f) into <path>.part, fsync, then rename over <path>: readers see nothing or the whole file.
    Returns the sha256 of the bytes written."""
    part = path + ".part"
    with open(part, "wb") as f:
        w = _HashingWriter(f)
        write_fn(w)
        f.flush()
        os.fsync(f.fileno())
    # a writer that seeked back would make the streamed hash wrong: then hash the file itself
    digest = w.sha.hexdigest() if w.nbytes == os.path.getsize(part) else file_sha256(part)
    os.replace(part, path)
    return digest


def tag_dir(root, tag, flag="--model_tag") -> str:
    """<root>/<tag>, refusing (ValueError naming `flag`) a tag that would put the folder anywhere but directly
    inside root ('../x', '/abs', 'a/b', '..'), so no tag can make a script read or write outside
    $NANOCHAT_BASE_DIR. The check is on the path as written: a symlink that an operator placed inside root
    (e.g. base_checkpoints/d20 -> a bigger disk) keeps working."""
    tag = "" if tag is None else str(tag)
    resolved = os.path.normpath(os.path.join(os.path.abspath(root), tag))
    if not tag or tag in (".", "..") or "/" in tag or "\\" in tag or os.sep in tag or "\0" in tag \
            or os.path.dirname(resolved) != os.path.normpath(os.path.abspath(root)):
        raise ValueError(f"{flag}={tag!r} does not name a folder directly inside {root}; pass a plain name such as "
                         f"d12 (letters, digits, '_', '-', '.'; the folders there are the tags)")
    return os.path.join(root, tag)


def _gather(obj, world_size) -> list:
    """[obj of rank 0, obj of rank 1, ...]; doubles as the barrier after every rank's files are written."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        out = [None] * world_size
        dist.all_gather_object(out, obj)
        return out
    _barrier()
    return [obj]


def step_dir(checkpoint_dir, step) -> str:
    return os.path.join(checkpoint_dir, f"step_{int(step):06d}")


def _complete_steps(checkpoint_dir) -> list[int]:
    """Sorted steps whose folder is named step_<digits> and holds a meta.json."""
    if not os.path.isdir(checkpoint_dir):
        return []
    steps = []
    for name in os.listdir(checkpoint_dir):
        m = STEP_RE.match(name)
        if not m or not os.path.isdir(os.path.join(checkpoint_dir, name)):
            continue
        if os.path.isfile(os.path.join(checkpoint_dir, name, "meta.json")):
            steps.append(int(m.group(1)))
        else:
            print0(f"warning: ignoring {os.path.join(checkpoint_dir, name)}: it has no meta.json (not a complete checkpoint)")
    return sorted(steps)


def latest_step(checkpoint_dir) -> int | None:
    """Highest complete step in checkpoint_dir, or None if there is none."""
    steps = _complete_steps(checkpoint_dir)
    return steps[-1] if steps else None


def _remove_stale(checkpoint_dir):
    """Delete leftovers of interrupted saves (*.tmp, *.old folders). Only rank 0 saves, so none is in use."""
    for name in os.listdir(checkpoint_dir):
        if STEP_RE.match(name.rsplit(".", 1)[0]) and name.endswith((".tmp", ".old")):
            shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)


def _test_pause(step, tmp):
    """The NANOCHAT_TEST_CHECKPOINT_PAUSE hook (module docstring); unset = nothing."""
    hook = os.environ.get("NANOCHAT_TEST_CHECKPOINT_PAUSE", "")
    if hook and int(hook.split(":")[0]) == int(step):
        seconds = float(hook.split(":")[1]) if ":" in hook else 600.0
        print(f"NANOCHAT_TEST_CHECKPOINT_PAUSE: pausing {seconds:g}s in {tmp} before meta.json and the rename",
              file=sys.stderr, flush=True)
        time.sleep(seconds)


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_states: list | None, meta: dict,
                    rank=0, world_size=1, extra_rank_state: dict | None = None, keep_last_n: int | None = None):
    """Save one step atomically (see module docstring). Call on every rank: rank 0 writes model.pt and
    meta.json, every rank writes optim_rank<r>.pt (if optimizer_states) and rank<r>.json (if extra_rank_state,
    which must be JSON-serializable). keep_last_n > 0 then deletes all but the newest n complete steps."""
    final = step_dir(checkpoint_dir, step)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        _remove_stale(checkpoint_dir)
        os.makedirs(tmp)
    _barrier()
    digests = {}  # this rank's files -> sha256, gathered to rank 0 for meta.json
    if rank == 0 and model_state is not None:
        digests["model.pt"] = _write_atomic(os.path.join(tmp, "model.pt"), lambda f: torch.save(model_state, f))
    if optimizer_states is not None:
        name = f"optim_rank{rank}.pt"
        digests[name] = _write_atomic(os.path.join(tmp, name), lambda f: torch.save(list(optimizer_states), f))
    if extra_rank_state is not None:
        try:
            blob = json.dumps(extra_rank_state).encode()
        except TypeError as e:
            raise CheckpointError(f"extra_rank_state must be JSON-serializable ({e}); convert tensors with .tolist()")
        digests[f"rank{rank}.json"] = _write_atomic(os.path.join(tmp, f"rank{rank}.json"), lambda f: f.write(blob))
    all_digests = _gather(digests, world_size)
    if rank == 0:
        _test_pause(step, tmp)
        files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp)) if not n.endswith(".part")}
        sha256 = {n: h for d in all_digests for n, h in d.items() if n in files}
        for n in files.keys() - sha256.keys():  # a rank whose digests did not reach us (no process group)
            sha256[n] = file_sha256(os.path.join(tmp, n))
        full_meta = dict(meta)
        full_meta["_checkpoint"] = {"step": int(step), "world_size": world_size, "files": files,
                                    "sha256": dict(sorted(sha256.items())),
                                    "saved_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        blob = json.dumps(full_meta, indent=2, default=str).encode()
        _write_atomic(os.path.join(tmp, "meta.json"), lambda f: f.write(blob))
        _fsync_dir(tmp)
        if os.path.exists(final):  # overwrite: move the old one aside, swap in the new one, delete the old
            os.replace(final, final + ".old")
        os.replace(tmp, final)
        _fsync_dir(checkpoint_dir)
        shutil.rmtree(final + ".old", ignore_errors=True)
        if keep_last_n is not None and keep_last_n > 0:
            for old_step in _complete_steps(checkpoint_dir)[:-keep_last_n]:
                shutil.rmtree(step_dir(checkpoint_dir, old_step), ignore_errors=True)
    _barrier()


def _corrupt(checkpoint_dir, step, path, reason):
    earlier = [s for s in _complete_steps(checkpoint_dir) if s < step]
    fallback = f"step {earlier[-1]}" if earlier else "a fresh start (no earlier checkpoint exists)"
    resume = f"--resume={earlier[-1]}" if earlier else "--resume=<earlier step>"
    return CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason}); delete {step_dir(checkpoint_dir, step)} "
                           f"to fall back to {fallback}, or pass {resume}")


def read_meta(checkpoint_dir, step) -> dict:
    """meta.json of one step, validated (raises CheckpointError)."""
    d = step_dir(checkpoint_dir, step)
    if not os.path.isdir(d):
        have = _complete_steps(checkpoint_dir)
        raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir} (complete steps there: {have or 'none'})")
    path = os.path.join(d, "meta.json")
    if not os.path.isfile(path):
        raise _corrupt(checkpoint_dir, step, path, "meta.json is missing, so the save never finished")
    try:
        with open(path) as f:
            meta = json.load(f)
        files = meta["_checkpoint"]["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise _corrupt(checkpoint_dir, step, path, f"unreadable meta.json: {type(e).__name__}: {e}")
    return meta


def verify_checkpoint(checkpoint_dir, step) -> dict:
    """meta.json of one step, after checking that every file it lists is present with its recorded size (cheap:
    nothing is loaded). Raises CheckpointError naming the first bad file."""
    meta = read_meta(checkpoint_dir, step)
    for name, expected in meta["_checkpoint"]["files"].items():
        path = os.path.join(step_dir(checkpoint_dir, step), name)
        if not os.path.isfile(path):
            raise _corrupt(checkpoint_dir, step, path, "file is missing")
        if os.path.getsize(path) != expected:
            raise _corrupt(checkpoint_dir, step, path, f"size {os.path.getsize(path)} bytes, meta.json says {expected}")
    return meta


def _load_file(checkpoint_dir, step, meta, name, device):
    path = os.path.join(step_dir(checkpoint_dir, step), name)
    expected = meta["_checkpoint"]["files"].get(name)
    if expected is None or not os.path.isfile(path):
        what = "not listed in meta.json" if expected is None else "missing"
        if name.startswith("optim_rank"):
            raise CheckpointError(f"{path} is {what}: this checkpoint was saved by {meta['_checkpoint']['world_size']} "
                                  f"process(es); resume with that many, or load without the optimizer state")
        raise _corrupt(checkpoint_dir, step, path, f"file is {what}")
    size = os.path.getsize(path)
    if size != expected:
        raise _corrupt(checkpoint_dir, step, path, f"size {size} bytes, meta.json says {expected}")
    want = meta["_checkpoint"].get("sha256", {}).get(name)  # absent in checkpoints saved before checksums
    if want is not None:
        got = file_sha256(path)
        if got != want:
            raise _corrupt(checkpoint_dir, step, path, f"its sha256 is {got[:16]}..., meta.json recorded "
                                                       f"{str(want)[:16]}... at save time: the file changed since")
    try:
        if name.endswith(".json"):
            with open(path) as f:
                return json.load(f)
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise _corrupt(checkpoint_dir, step, path, f"{type(e).__name__}: {e}")


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_state, optim_states | None, meta, extra_rank_state | None) of one step (step=None: the latest).
    Validates meta.json, presence and sizes of files; any problem raises CheckpointError naming the file."""
    if step is None:
        step = latest_step(checkpoint_dir)
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {checkpoint_dir}; train one first or check the path")
    meta = read_meta(checkpoint_dir, step)
    model_state = _load_file(checkpoint_dir, step, meta, "model.pt", device)
    optim_states = None
    if load_optimizer:
        optim_states = _load_file(checkpoint_dir, step, meta, f"optim_rank{rank}.pt", device)
    extra = None
    if f"rank{rank}.json" in meta["_checkpoint"]["files"]:
        extra = _load_file(checkpoint_dir, step, meta, f"rank{rank}.json", device)
    return model_state, optim_states, meta, extra


def load_gpt_weights(model, checkpoint_dir, device) -> str:
    """Load the GPT weights of the latest checkpoint in checkpoint_dir into `model`, to start a new run from
    trained weights (base_train --init_from); returns a line saying what was loaded. MegaContext modules
    ("mc.*") are left out: the new run brings its own. Another model shape raises CheckpointError."""
    model_state, _, meta, _ = load_checkpoint(checkpoint_dir, None, device)
    saved, ours = meta.get("model_config", {}), dataclasses.asdict(model.config)
    diffs = [f"{k}={saved.get(k)!r} (this run {v!r})" for k, v in ours.items() if saved.get(k, v) != v]
    if diffs:
        raise CheckpointError(f"{checkpoint_dir} holds a different model: {', '.join(diffs)}; "
                              f"use the flags it was trained with")
    model.load_state_dict({k: v for k, v in model_state.items() if not k.startswith(EXTRA_PREFIX)}, strict=True)
    return f"initialized the GPT from {checkpoint_dir} step {meta['step']}"


def find_last_model_tag(checkpoints_dir) -> str:
    """The most recently modified model tag (sub-folder) in e.g. $NANOCHAT_BASE_DIR/base_checkpoints."""
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))] \
        if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise CheckpointError(f"no model tags in {checkpoints_dir}; train a model first (e.g. python -m scripts.base_train)")
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def build_model(checkpoint_dir, step, device, phase="eval"):
    """(model, tokenizer, meta): a nanochat.gpt.GPT rebuilt from meta["model_config"] with the saved weights,
    in eval() or train() mode, plus the project tokenizer (its vocab size must equal the model's).

    The one seam for the floor above: model-state entries under EXTRA_PREFIX ("mc.": MegaContext's GistNet
    and LensNet, saved beside the GPT) are not the GPT's. They come back untouched in
    meta["extra_state"] ({} when there are none) with the device the model is on; mc.infer.checkpoint builds
    its modules from them and meta["mc_config"]. This loader never imports mc: an MC checkpoint loads
    here as the plain GPT it contains."""
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    device = torch.device(device)
    model_state, _, meta, _ = load_checkpoint(checkpoint_dir, step, device)
    if "model_config" not in meta:
        raise CheckpointError(f"{step_dir(checkpoint_dir, meta['_checkpoint']['step'])}/meta.json has no 'model_config'; "
                              f"it was not written by a nanochat trainer")
    meta_path = os.path.join(step_dir(checkpoint_dir, meta["_checkpoint"]["step"]), "meta.json")
    try:
        config = GPTConfig(**meta["model_config"])
    except (TypeError, ValueError) as e:  # unknown fields / nonsense sizes (GPTConfig.__post_init__)
        raise CheckpointError(f"{meta_path}: model_config does not describe a valid nanochat.gpt.GPTConfig ({e}); "
                              f"the file was edited or written by another version: restore it or re-save the "
                              f"checkpoint")
    # torch.compile wraps modules as `_orig_mod`, DDP as `module`: strip those prefixes.
    model_state = {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in model_state.items()}
    meta["extra_state"] = {k: v for k, v in model_state.items() if k.startswith(EXTRA_PREFIX)}
    model_state = {k: v for k, v in model_state.items() if not k.startswith(EXTRA_PREFIX)}
    try:
        with torch.device(device):
            model = GPT(config)
    except ValueError as e:  # shape rules GPT checks itself (n_embd divisible by n_head, ...)
        raise CheckpointError(f"{meta_path}: model_config cannot build a GPT ({e}); restore the file or re-save the "
                              f"checkpoint")
    model.init_weights()  # also fills non-persistent buffers (rotary tables); the weights are overwritten next
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {checkpoint_dir} do not fit the model built from meta.json: {e}")
    model.train(phase == "train")
    tokenizer = tokenizer_module.get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointError(f"tokenizer vocab size {tokenizer.get_vocab_size()} != model vocab size {config.vocab_size} "
                              f"({checkpoint_dir}); the tokenizer in $NANOCHAT_BASE_DIR/tokenizer is not the one this "
                              f"model was trained with: restore it, or retrain the model")
    return model, tokenizer, meta


def load_model(source, device, phase, model_tag=None, step=None):
    """build_model() for a pipeline stage: source base|mid|sft|rl; model_tag=None = the most recently
    modified tag; step=None = its latest complete step."""
    if source not in SOURCE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; use one of {sorted(SOURCE_DIRS)}")
    root = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    model_tag = model_tag or find_last_model_tag(root)
    checkpoint_dir = tag_dir(root, model_tag)
    if step is None:
        step = latest_step(checkpoint_dir)
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {checkpoint_dir}; train one first or pick another --model_tag")
    print0(f"loading {checkpoint_dir} step {step}")
    return build_model(checkpoint_dir, step, device, phase)
