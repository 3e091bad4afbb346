"""
GSM8K: grade-school math word problems (openai/gsm8k, subsets "main" / "socratic", splits train / test).

Rows: question (str), answer (str). The reference answer is worked reasoning with calculator
annotations and a final line "#### 72", e.g.

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n...\\n#### 72

Each "<<expr=result>>" becomes a tool call in the assistant message: a "python" part holding `expr`
(supervised: the model learns to call the calculator) followed by a "python_output" part holding
`result` (what the tool returns; never supervised). The surrounding text is kept as "text" parts, so

    [text "Natalia sold 48/2 = ", python "48/2", python_output "24", text "24 clips in May.\\n...#### 72"]

evaluate(): 1 iff the number after the last "####" of the response equals the reference's
(commas, "$" and trailing "." ignored; compared as numbers, so "72.0" == "72"). reward() = evaluate.

    GSM8K(subset="main", split="test", data_files=None, data_dir=None, start=0, stop=None, step=1)
"""

import re

from tasks.common import Task, assistant_text, final_answer, load_rows

HUB_PATH = "openai/gsm8k"
CALC = re.compile(r"<<([^<>]*)>>")


def parse_answer(answer: str) -> list[dict]:
    """Reference answer text -> assistant content parts (text / python / python_output)."""
    parts, pos = [], 0
    for m in CALC.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        expr, eq, result = m.group(1).rpartition("=")
        if not eq or not expr.strip():
            raise ValueError(f"GSM8K calculator annotation {m.group(0)!r} is not of the form <<expr=result>>")
        parts.append({"type": "python", "text": expr.strip()})
        parts.append({"type": "python_output", "text": result.strip()})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def normalize_number(s: str | None) -> float | str | None:
    """'1,234.' -> 1234.0; '$5' -> 5.0; non-numbers returned stripped (compared as strings)."""
    if s is None:
        return None
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    m = re.match(r"^-?\d+(\.\d+)?", s)
    return float(m.group(0)) if m else s


class GSM8K(Task):
    """Math word problems with calculator tool calls; generative."""

    def __init__(self, subset: str = "main", split: str = "test", data_files=None, data_dir=None, **slice_kw):
        super().__init__(**slice_kw)
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be 'main' or 'socratic', got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
        self.subset, self.split = subset, split
        self.rows = load_rows(HUB_PATH, subset, split, data_files, data_dir)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        try:
            if final_answer(row["answer"]) is None:
                raise ValueError("the answer has no '#### <number>' line")
            parts = parse_answer(row["answer"])
        except ValueError as e:
            raise ValueError(f"GSM8K {self.subset} {self.split} row {index}: {e}") from e
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        ref = normalize_number(final_answer(assistant_text(conversation)))
        pred = normalize_number(final_answer(assistant_response))
        return int(pred is not None and pred != "" and pred == ref)
