"""
What every SFT / eval task shares: the Task base class, mixtures and sequences of tasks, loading a
dataset's rows from the Hugging Face hub or from local files, and small formatting helpers.

- Task: a list of conversations with slicing (start/stop/step), `eval_type` ("categorical" = the
  answer is one of `conversation["letters"]`; "generative" = free text), evaluate() -> 0/1, and
  reward() -> float for RL (default = evaluate).
- TaskMixture(tasks, seed): every (task, example) pair of every task, shuffled once with
  random.Random(seed). One pass over the mixture is one epoch: each example appears exactly once
  (list a task twice to see it twice per epoch). Same seed -> same order in every process.
- TaskSequence(tasks): the tasks one after the other, in order (for curricula).
- load_rows(): the rows of a dataset as dicts, from `datasets.load_dataset` (online) or from local
  jsonl/parquet files with the same columns (`data_files=` / `data_dir=`; offline and tests).
- render_mc(): a multiple-choice question with lettered choices (shared by MMLU, ARC, SyntheticRecallMC).
- validate_messages(): the message-list checks shared by SmolTalk, CustomJSON and Identity.
- final_answer(): the text after the last "####" marker (GSM8K, SpellingBee).
- hub_kw(): data_dir= for a hub task when the user keeps local snapshots (--data_dir).
"""

import glob
import hashlib
import json
import math
import os
import random

LETTERS = "ABCDEFGHIJ"
ANSWER_MARKER = "####"


class Task:
    """A sliceable list of conversations. Subclasses define num_examples(), get_example(), evaluate()."""

    eval_type = "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start}, stop={stop}, step={step}: "
                             f"need 0 <= start <= stop and step >= 1")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        """Number of underlying examples, before slicing. Hub-backed tasks keep their rows in self.rows;
        tasks that generate examples override this."""
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        """Underlying example `index` as {"messages": [...], optional "letters", metadata...}."""
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, math.ceil((stop - self.start) / self.step))

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__} index {i} out of range (len {n})")
        return self.get_example(self.start + i * self.step)

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        """1 if the response answers the conversation correctly, else 0."""
        raise NotImplementedError(f"{type(self).__name__} is a training-only task: it has no evaluation rule")

    def reward(self, conversation: dict, assistant_response: str) -> float:
        """RL reward; by default the evaluation outcome as a float."""
        return float(self.evaluate(conversation, assistant_response))


class CategoricalTask(Task):
    """A task whose assistant reply is a single letter out of conversation["letters"]."""

    eval_type = "categorical"

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        return int(assistant_response.strip() == conversation["messages"][-1]["content"])


class TaskMixture(Task):
    """All examples of all tasks in one deterministic shuffled order (seeded, same on every rank)."""

    def __init__(self, tasks: list, seed: int = 42, **slice_kw):
        super().__init__(**slice_kw)
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        t, i = self.index[index]
        return self.tasks[t][i]

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError("TaskMixture mixes tasks with different rules: evaluate each task on its own")


class TaskSequence(Task):
    """The tasks concatenated in order: all of tasks[0], then all of tasks[1], ..."""

    def __init__(self, tasks: list, **slice_kw):
        super().__init__(**slice_kw)
        if not tasks:
            raise ValueError("TaskSequence needs at least one task")
        self.tasks = list(tasks)
        self.lengths = [len(t) for t in self.tasks]

    def num_examples(self) -> int:
        return sum(self.lengths)

    def get_example(self, index: int) -> dict:
        for task, n in zip(self.tasks, self.lengths):
            if index < n:
                return task[index]
            index -= n
        raise IndexError(f"TaskSequence index out of range (len {self.num_examples()})")

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError("TaskSequence chains tasks with different rules: evaluate each task on its own")


# ----------------------------------------------------------------------------------- loading rows
def _read_local(path: str) -> list[dict]:
    """Rows of one .jsonl/.json (one JSON object per line) or .parquet file, as dicts."""
    if path.endswith(".parquet"):
        # heavy, and only for local parquet snapshots
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if path.endswith((".jsonl", ".json")):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {lineno}: not valid JSON ({e})") from e
        return rows
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .json (one object per line) or .parquet")


def _files_in_dir(data_dir: str, subset: str | None, split: str) -> list[str]:
    """Files of `split` in a hub-style snapshot: <dir>[/<subset>]/<split>*.{parquet,jsonl,json}."""
    dirs = ([os.path.join(data_dir, subset)] if subset else []) + [data_dir]
    for d in dirs:
        found = sorted(p for ext in ("parquet", "jsonl", "json") for p in glob.glob(os.path.join(d, f"{split}*.{ext}")))
        if found:
            return found
    raise FileNotFoundError(f"no {split}*.parquet/.jsonl files in {' or '.join(dirs)}: put the split's files "
                            f"there (as in the hub repository) or pass data_files= instead")


def load_rows(hub_path: str, subset: str | None, split: str, data_files=None, data_dir: str | None = None):
    """Rows (each a dict of the dataset's columns) with len() and [i].

    data_files (a path or list of paths) or data_dir (a hub-style snapshot folder) read local files;
    otherwise `datasets.load_dataset(hub_path, subset, split=split)` (needs the hub or its cache)."""
    if data_files is not None and data_dir is not None:
        raise ValueError("pass data_files= or data_dir=, not both")
    if data_dir is not None:
        data_files = _files_in_dir(data_dir, subset, split)
    if data_files is not None:
        paths = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        if not paths:
            raise ValueError("data_files is empty")
        rows = []
        for p in map(str, paths):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"data file {p} does not exist")
            rows.extend(_read_local(p))
        return rows
    try:
        # Hugging Face datasets is heavy and only needed for the online tasks
        import datasets
        return datasets.load_dataset(hub_path, subset, split=split)
    except Exception as e:
        raise RuntimeError(f"could not load {hub_path} ({subset}, split {split}) from the Hugging Face hub: {e}. "
                           f"Offline? Pass data_files=/data_dir= with local copies of its rows, or use the "
                           f"offline tasks in tasks/synthetic_chat.py") from e


def unwrap_row(row: dict, key: str) -> dict:
    """Some hub subsets nest each row under one column (MMLU auxiliary_train: {"train": {...}})."""
    return row[key] if set(row) == {key} and isinstance(row[key], dict) else row


# ----------------------------------------------------------------------------------- formatting
def stable_seed(*parts) -> int:
    """64-bit seed from blake2b of the parts: the same in every process (unlike the salted hash())."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def render_mc(question: str, choices: list[str], letters: str | list[str] | None = None) -> str:
    """'question\\n\\nA. first\\nB. second\\n...\\n\\nAnswer with the letter of the correct choice.'"""
    letters = list(letters or LETTERS[:len(choices)])
    if len(choices) != len(letters) or not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"need 2..{len(LETTERS)} choices with one letter each, got {len(choices)} choices "
                         f"and letters {letters}")
    lines = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    return f"{question.strip()}\n\n{lines}\n\nAnswer with the letter of the correct choice."


def mc_conversation(question: str, choices: list[str], answer_index: int, **meta) -> dict:
    """A categorical conversation: user asks render_mc(...), assistant replies with the answer letter."""
    if not 0 <= answer_index < len(choices):
        raise ValueError(f"answer index {answer_index} out of range for {len(choices)} choices")
    letters = list(LETTERS[:len(choices)])
    return {"messages": [{"role": "user", "content": render_mc(question, choices, letters)},
                         {"role": "assistant", "content": letters[answer_index]}],
            "letters": letters, **meta}


def validate_messages(messages, where: str) -> list[dict]:
    """Check a chat: optional leading system message, then user/assistant alternating starting with
    user, at least one of each, every content a str. Raises ValueError naming `where` and the message."""
    if not isinstance(messages, list):
        raise ValueError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}, message {i}: expected {{'role': str, 'content': str}}, got {m!r:.200}")
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if len(body) < 2:
        raise ValueError(f"{where}: a conversation needs at least a user and an assistant message")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"{where}, message {i + offset}: role {m['role']!r} but roles must alternate "
                             f"user/assistant starting with user (after an optional system message); expected {want!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def final_answer(text: str) -> str | None:
    """The text after the last '####' marker, stripped to its first line; None if there is no marker."""
    k = text.rfind(ANSWER_MARKER)
    if k < 0:
        return None
    rest = text[k + len(ANSWER_MARKER):].strip()
    return rest.splitlines()[0].strip() if rest else ""


def assistant_text(conversation: dict) -> str:
    """All text of the last assistant message (text parts joined; python/tool parts left out)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def hub_kw(data_root: str, hub_path: str) -> dict:
    """{"data_dir": <data_root>/<hub_path>} when data_root is set (a local snapshot laid out like the hub
    repository, e.g. <root>/allenai/ai2_arc/ARC-Easy/test-*.parquet), else {} (load from the hub)."""
    return {"data_dir": os.path.join(data_root, hub_path)} if data_root else {}
