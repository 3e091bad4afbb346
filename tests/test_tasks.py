"""
Tests for tasks/: slicing, mixtures, local-file loading, every task's parsing from small fixture
files (same columns as the hub datasets), evaluate/reward on right and wrong answers, GSM8K tool
calls, SpellingBee tool calls, the offline synthetic recall tasks, and chat rendering masks.
"""

import json
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.synthetic import synthetic_texts
from nanochat.tokenizer import RustBPETokenizer
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, TaskSequence, final_answer, load_rows, render_mc
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, parse_answer
from tasks.humaneval import HumanEval, build_program
from tasks.identity import Identity
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SpellingBee, default_words
from tasks.synthetic_chat import SyntheticRecallChat, SyntheticRecallMC


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


class ListTask(Task):
    def __init__(self, items, **kw):
        super().__init__(**kw)
        self.items = items

    def num_examples(self):
        return len(self.items)

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": self.items[index]},
                             {"role": "assistant", "content": "ok"}]}


def users(task):
    return [ex["messages"][0]["content"] for ex in task]


# ----------------------------------------------------------------------------------- base classes
def test_slicing():
    items = [str(i) for i in range(10)]
    assert users(ListTask(items)) == items
    assert users(ListTask(items, start=2, stop=8, step=3)) == ["2", "5"]
    assert users(ListTask(items, start=1, step=4)) == ["1", "5", "9"]
    assert len(ListTask(items, stop=100)) == 10 and len(ListTask(items, start=10)) == 0
    t = ListTask(items, start=3)
    assert t[-1]["messages"][0]["content"] == "9"
    with pytest.raises(IndexError):
        t[7]
    with pytest.raises(ValueError, match="slice"):
        ListTask(items, step=0)


def test_mixture_deterministic_and_covers_each_example_once():
    a, b = ListTask([f"a{i}" for i in range(7)]), ListTask([f"b{i}" for i in range(5)], start=1)
    mix = TaskMixture([a, b], seed=3)
    order = users(mix)
    assert sorted(order) == sorted(users(a) + users(b))  # every example exactly once per epoch
    assert order == users(TaskMixture([a, b], seed=3))
    assert order != users(TaskMixture([a, b], seed=4))
    assert order != users(a) + users(b)  # actually shuffled
    assert len(TaskMixture([a, a])) == 14  # listing a task twice oversamples it
    assert users(TaskMixture([a, b], seed=3, start=2, stop=6)) == order[2:6]
    assert users(TaskSequence([a, b])) == users(a) + users(b)
    with pytest.raises(NotImplementedError, match="each task"):
        mix.evaluate(mix[0], "x")


def test_render_mc():
    text = render_mc("Which is red?", ["sky", "blood", "grass"])
    assert text.startswith("Which is red?\n\nA. sky\nB. blood\nC. grass\n\n")
    with pytest.raises(ValueError, match="choices"):
        render_mc("q", ["only"])


def test_load_rows_local_and_errors(tmp_path, monkeypatch):
    rows = [{"x": 1, "y": [1, 2]}, {"x": 2, "y": [3]}]
    assert load_rows("h", None, "test", data_files=write_jsonl(tmp_path / "a.jsonl", rows)) == rows
    assert load_rows("h", None, "test", data_files=[write_parquet(tmp_path / "b.parquet", rows)]) == rows
    (tmp_path / "snap" / "main").mkdir(parents=True)
    write_parquet(tmp_path / "snap" / "main" / "test-00000-of-00001.parquet", rows)
    assert load_rows("h", "main", "test", data_dir=str(tmp_path / "snap")) == rows
    with pytest.raises(FileNotFoundError, match="train"):
        load_rows("h", "main", "train", data_dir=str(tmp_path / "snap"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows("h", None, "test", data_files=str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_rows("h", None, "test", data_files=str(tmp_path / "bad.jsonl"))
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="data_files"):
        GSM8K(split="test")


# ----------------------------------------------------------------------------------- hub tasks
def test_smoltalk(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello!"}]},
            {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]}]
    task = SmolTalk("train", data_files=write_parquet(tmp_path / "train.parquet", rows))
    assert len(task) == 2 and task[0]["messages"] == rows[0]["messages"] and task.eval_type == "generative"
    bad = [{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}]
    with pytest.raises(ValueError, match="row 0, message 0"):
        SmolTalk("test", data_files=write_jsonl(tmp_path / "bad.jsonl", bad))[0]
    with pytest.raises(NotImplementedError, match="training-only"):
        task.evaluate(task[0], "x")


def test_mmlu(tmp_path):
    row = {"question": "What is 2+3?", "subject": "math", "choices": ["4", "5", "6", "7"], "answer": 1}
    task = MMLU("all", "test", data_files=write_jsonl(tmp_path / "t.jsonl", [row, dict(row, answer=3)]))
    ex = task[0]
    assert task.eval_type == "categorical" and ex["letters"] == ["A", "B", "C", "D"] and ex["subject"] == "math"
    assert "B. 5" in ex["messages"][0]["content"] and ex["messages"][1]["content"] == "B"
    assert task.evaluate(ex, "B") == 1 and task.evaluate(ex, " B\n") == 1 and task.evaluate(ex, "A") == 0
    assert task[1]["messages"][1]["content"] == "D" and task.reward(ex, "C") == 0.0
    aux = MMLU("auxiliary_train", "train", data_files=write_parquet(tmp_path / "a.parquet", [{"train": row}]))
    assert aux[0]["messages"] == ex["messages"]  # nested hub rows are unwrapped
    with pytest.raises(ValueError, match="auxiliary_train"):
        MMLU("auxiliary_train", "test", data_files=str(tmp_path / "t.jsonl"))


def test_arc(tmp_path):
    rows = [{"id": "q1", "question": "Which is a gas?", "answerKey": "C",
             "choices": {"text": ["ice", "water", "steam", "rock"], "label": ["A", "B", "C", "D"]}},
            {"id": "q2", "question": "Pick two.", "answerKey": "2",
             "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}}]
    task = ARC("ARC-Challenge", "test", data_files=write_parquet(tmp_path / "arc.parquet", rows))
    a, b = task[0], task[1]
    assert a["letters"] == ["A", "B", "C", "D"] and a["messages"][1]["content"] == "C"
    assert b["letters"] == ["A", "B", "C"] and b["messages"][1]["content"] == "B"  # "1","2","3" -> A,B,C
    assert "B. two" in b["messages"][0]["content"]
    assert task.evaluate(b, "B") == 1 and task.evaluate(b, "2") == 0 and task.reward(a, "C") == 1.0
    bad = [dict(rows[0], answerKey="E")]
    with pytest.raises(ValueError, match="answerKey"):
        ARC("ARC-Easy", "test", data_files=write_jsonl(tmp_path / "bad.jsonl", bad))[0]


GSM_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
              "altogether in April and May.\n#### 72")


def test_gsm8k_tool_calls_and_evaluate(tmp_path):
    parts = parse_answer(GSM_ANSWER)
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text", "python", "python_output", "text"]
    assert parts[1]["text"] == "48/2" and parts[2]["text"] == "24" and parts[0]["text"] == "Natalia sold 48/2 = "
    assert parts[4]["text"] == "48+24" and parts[5]["text"] == "72" and parts[-1]["text"].endswith("#### 72")
    assert "".join(p["text"] if p["type"] == "text" else "" for p in parts).count("<<") == 0
    assert parse_answer("no tools\n#### 5") == [{"type": "text", "text": "no tools\n#### 5"}]
    rows = [{"question": "How many clips?", "answer": GSM_ANSWER},
            {"question": "Big?", "answer": "It is <<1000*2=2000>>2000.\n#### 2,000"}]
    task = GSM8K("main", "train", data_files=write_jsonl(tmp_path / "g.jsonl", rows))
    ex = task[0]
    assert ex["messages"][0]["content"] == "How many clips?" and ex["messages"][1]["content"] == parts
    assert task.evaluate(ex, "so the total is 72.\n#### 72") == 1
    assert task.evaluate(ex, "#### 72.0") == 1 and task.evaluate(ex, "#### 73") == 0
    assert task.evaluate(ex, "72") == 0  # no final-answer marker
    assert task.evaluate(task[1], "#### 2000") == 1 and task.reward(task[1], "#### $2,000.") == 1.0
    assert final_answer("a #### 1\n#### 2 apples\nmore") == "2 apples"
    with pytest.raises(ValueError, match="####"):
        GSM8K(data_files=write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "7"}]))[0]


HE_ROW = {"task_id": "HumanEval/0", "entry_point": "add",
          "prompt": "import math\n\n\ndef add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
          "canonical_solution": "    return a + b\n",
          "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def run_program(program):
    return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=30).returncode == 0


def test_humaneval_structure_and_programs(tmp_path):
    task = HumanEval(data_files=write_jsonl(tmp_path / "he.jsonl", [HE_ROW]))
    ex = task[0]
    assert ex["messages"][1]["content"] == HE_ROW["prompt"] + HE_ROW["canonical_solution"]
    assert ex["entry_point"] == "add" and task.eval_type == "generative"
    p, t = HE_ROW["prompt"], HE_ROW["test"]
    assert run_program(build_program(p, ex["messages"][1]["content"], t, "add"))
    assert run_program(build_program(p, "    return a + b\n", t, "add"))  # body only: prompt put in front
    assert run_program(build_program(p, "Sure:\n```python\ndef add(a, b):\n    return math.fsum([a, b])\n```", t, "add"))
    assert not run_program(build_program(p, "def add(a, b):\n    return a - b\n", t, "add"))


def test_humaneval_evaluate(tmp_path, monkeypatch):
    try:  # the real sandbox when it exists, else a stand-in with its documented signature
        import nanochat.execution  # noqa: F401
    except ImportError:
        fake = types.SimpleNamespace(execute_code=lambda program, timeout, memory_mb: types.SimpleNamespace(
            success=run_program(program)))
        monkeypatch.setitem(sys.modules, "nanochat.execution", fake)
    task = HumanEval(data_files=write_jsonl(tmp_path / "he.jsonl", [HE_ROW]))
    ex = task[0]
    assert task.evaluate(ex, ex["messages"][1]["content"]) == 1
    assert task.evaluate(ex, "def add(a, b):\n    return a * b\n") == 0
    assert task.reward(ex, "    return b + a\n") == 1.0


# ----------------------------------------------------------------------------------- offline tasks
def test_spellingbee(tmp_path):
    task = SpellingBee("train", num_examples=40, seed=1)
    assert "lantern" in default_words() and len(task) == 40
    assert [task[i] for i in range(5)] == [SpellingBee("train", 40, seed=1)[i] for i in range(5)]
    kinds = set()
    for ex in task:
        kinds.add(ex["kind"])
        parts = ex["messages"][1]["content"]
        code = next(p["text"] for p in parts if p["type"] == "python")
        out = next(p["text"] for p in parts if p["type"] == "python_output")
        assert str(eval(code)) == out == ex["answer"]  # the tool call computes the answer
        full = "".join(p["text"] for p in parts if p["type"] == "text")
        assert task.evaluate(ex, full) == 1 and task.reward(ex, full) == 1.0
        wrong = "#### 99" if ex["kind"] == "count" else "#### " + "-".join(ex["word"][::-1] + "x")
        assert task.evaluate(ex, wrong) == 0 and task.evaluate(ex, ex["answer"]) == 0  # needs the marker
    assert kinds == {"count", "spell"}
    spell = next(ex for ex in task if ex["kind"] == "spell")
    assert task.evaluate(spell, "#### " + " ".join(spell["word"]).upper()) == 1
    assert task.evaluate(spell, "#### " + spell["word"]) == 0  # not spelled out
    words = tmp_path / "words.txt"
    words.write_text("zebra\n\nquokka\nnot a word\n")
    assert {ex["word"] for ex in SpellingBee("test", 20, words_file=str(words))} <= {"zebra", "quokka"}


def test_customjson_and_identity(tmp_path):
    good = tmp_path / "good.jsonl"
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    good.write_text(json.dumps({"messages": conv}) + "\n\n" + json.dumps(conv) + "\n")
    task = CustomJSON(str(good))
    assert len(task) == 2 and task[0]["messages"] == task[1]["messages"] == conv
    cases = {"user,user": [conv[0], conv[0]], "content": [conv[0], {"role": "assistant", "content": 3}],
             "not valid JSON": "{", "messages": {"msgs": conv}}
    for match, line in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": conv}) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n")
        with pytest.raises(ValueError, match="line 2") as err:
            CustomJSON(str(bad))
        assert match.split(",")[0] in str(err.value)
    builtin = Identity()
    assert len(builtin) >= 5 and any("MegaContext" in m["content"] for ex in builtin for m in ex["messages"])
    assert len(Identity(str(good))) == len(builtin) + 2


@pytest.mark.parametrize("split,context_chars", [("test", 2000), ("train", 600), ("val", 6000)])
def test_synthetic_recall_chat(split, context_chars):
    task = SyntheticRecallChat(split, num_examples=60, context_chars=context_chars, seed=0)
    kinds = set()
    for ex in task:
        user, answer = ex["messages"][0]["content"], ex["messages"][1]["content"]
        context = user.split("\n\nQuestion: ")[0]
        assert len(context) <= context_chars + 100 and ex["context_chars"] <= context_chars
        assert ex["answer"] in context and ex["answer"] in answer  # the answer is stated in the context
        assert task.evaluate(ex, answer) == 1 and task.evaluate(ex, answer.upper()) == 1
        assert task.evaluate(ex, "I do not know.") == 0 and task.evaluate(ex, ex["answer"] + "7") == 0
        kinds.add(ex["kind"])
    assert {"passkey", "kv"} <= kinds and len(kinds) >= 4
    assert task[5] == SyntheticRecallChat(split, 60, context_chars, seed=0)[5]
    assert task[5] != SyntheticRecallChat(split, 60, context_chars, seed=1)[5]


def test_synthetic_recall_mc_and_split_disjoint():
    task = SyntheticRecallMC("test", num_examples=60, context_chars=3000)
    assert task.eval_type == "categorical"
    letters_seen = set()
    for ex in task:
        letter = ex["messages"][1]["content"]
        user = ex["messages"][0]["content"]
        assert ex["letters"] == ["A", "B", "C", "D"] and f"\n{letter}. {ex['answer']}\n" in user
        choices = [ln[3:] for ln in user.splitlines() if ln[:3] in ("A. ", "B. ", "C. ", "D. ")]
        assert len(set(choices)) == 4
        assert task.evaluate(ex, letter) == 1 and task.evaluate(ex, "E") == 0
        letters_seen.add(letter)
    assert len(letters_seen) >= 3
    train = {SyntheticRecallChat("train", 20)[i]["messages"][0]["content"] for i in range(20)}
    test = {SyntheticRecallChat("test", 20)[i]["messages"][0]["content"] for i in range(20)}
    assert not train & test
    with pytest.raises(ValueError, match="split"):
        SyntheticRecallChat("dev")


# ----------------------------------------------------------------------------------- rendering
@pytest.fixture(scope="module")
def tok():
    texts = synthetic_texts("train")
    return RustBPETokenizer.train_from_iterator((next(texts) for _ in range(8)), 512)


def test_render_masks_only_assistant(tok, tmp_path):
    mmlu_row = {"question": "2+3?", "subject": "m", "choices": ["4", "5", "6", "7"], "answer": 1}
    examples = [SyntheticRecallChat("test", 3)[0], SyntheticRecallMC("test", 3)[1], SpellingBee("train", 4)[0],
                SpellingBee("train", 4)[1], Identity()[6],
                GSM8K(data_files=write_jsonl(tmp_path / "g.jsonl", [{"question": "q?", "answer": GSM_ANSWER}]))[0],
                MMLU(data_files=write_jsonl(tmp_path / "m.jsonl", [mmlu_row]))[0]]
    sp = {name: tok.encode_special(name) for name in ("<|assistant_start|>", "<|assistant_end|>",
                                                      "<|output_start|>", "<|output_end|>", "<|user_start|>")}
    for ex in examples:
        ids, mask = tok.render_conversation(ex, max_tokens=100_000)
        in_assistant = in_output = False
        for t, m in zip(ids, mask):  # supervised: assistant text, python calls, <|assistant_end|>
            if t == sp["<|assistant_start|>"]:
                expect, in_assistant = 0, True
            elif t == sp["<|output_start|>"]:
                expect, in_output = 0, True
            elif t == sp["<|output_end|>"]:
                expect, in_output = 0, False
            elif t == sp["<|assistant_end|>"]:
                expect, in_assistant = 1, False
            else:
                expect = int(in_assistant and not in_output)
            assert m == expect, (ex["messages"], tok.id_to_token(t))
        last = ex["messages"][-1]["content"]
        text = last if isinstance(last, str) else "".join(p["text"] for p in last if p["type"] != "python_output")
        supervised = tok.decode([t for t, m in zip(ids, mask) if m and t < 512 - 9])
        assert text.strip() in supervised
        if "answer" in ex and ex.get("kind") not in ("count", "spell"):
            assert ex["answer"] in tok.decode(ids[:ids.index(sp["<|assistant_start|>"])])
