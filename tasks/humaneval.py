"""
HumanEval: 164 Python function-writing problems (openai/openai_humaneval, split test), generative.

Rows: task_id, prompt (signature + docstring), canonical_solution (the body), test (defines
check(candidate)), entry_point (the function name). The conversation is user = prompt, assistant =
prompt + canonical_solution (the complete function).

evaluate(conversation, response): take the code of the response (the first ```python ...``` block
if there is one, else the whole text); if it does not define `def <entry_point>` it is taken as a
continuation of the prompt and the prompt is put in front; the prompt's import lines go first either
way. That program + the test + `check(<entry_point>)` runs in a sandboxed subprocess through
nanochat.execution.execute_code (timeout, memory cap); 1 iff it exits cleanly. reward() = evaluate.

    HumanEval(data_files=None, data_dir=None, timeout=5.0, memory_mb=512, start=0, stop=None, step=1)
"""

import re

from tasks.common import Task, load_rows

HUB_PATH = "openai/openai_humaneval"
FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The first fenced code block of a response, or the response itself when it has no fence."""
    m = FENCE.search(response)
    return m.group(1) if m else response


def build_program(prompt: str, response: str, test: str, entry_point: str) -> str:
    """The script that passes iff the response implements `entry_point` correctly."""
    code = extract_code(response)
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        code = prompt + code
    imports = "\n".join(ln for ln in prompt.splitlines() if ln.startswith(("import ", "from ")))
    return f"{imports}\n\n{code}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    """Write a Python function; graded by running the hidden tests."""

    def __init__(self, data_files=None, data_dir=None, timeout: float = 5.0, memory_mb: int = 512, **slice_kw):
        super().__init__(**slice_kw)
        self.timeout, self.memory_mb = timeout, memory_mb
        self.rows = load_rows(HUB_PATH, None, "test", data_files, data_dir)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"],
                "entry_point": row["entry_point"]}

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        from nanochat.execution import execute_code  # lazy: only evaluation needs the sandbox
        program = build_program(conversation["prompt"], assistant_response, conversation["test"],
                                conversation["entry_point"])
        result = execute_code(program, timeout=self.timeout, memory_mb=self.memory_mb)
        return int(bool(result.success))
