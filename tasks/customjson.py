"""
CustomJSON: your own conversations for SFT, from a jsonl file.

Each non-empty line is either {"messages": [{"role": ..., "content": ...}, ...]} or a bare list of
messages. Every line is validated when the file is loaded (valid JSON, optional leading system
message, then user/assistant alternating starting with user, string contents); the error names the
file and line. Training only: evaluate() raises.

    CustomJSON(filepath, start=0, stop=None, step=1)
"""

import json
import os

from tasks.common import Task, validate_messages


def read_conversations(filepath: str) -> list[dict]:
    """All conversations of a jsonl file, validated, as {"messages": [...]} dicts."""
    if not os.path.isfile(filepath):
        raise FileNotFoundError(f"CustomJSON file {filepath} does not exist")
    conversations = []
    with open(filepath, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{filepath}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from e
            if isinstance(obj, dict):
                if "messages" not in obj:
                    raise ValueError(f"{where}: expected {{\"messages\": [...]}} or a list of messages")
                obj = obj["messages"]
            conversations.append({"messages": validate_messages(obj, where)})
    return conversations


class CustomJSON(Task):
    """Conversations from a jsonl file; generative, training only."""

    def __init__(self, filepath: str, **slice_kw):
        super().__init__(**slice_kw)
        self.filepath = filepath
        self.conversations = read_conversations(filepath)
        if not self.conversations:
            raise ValueError(f"CustomJSON file {filepath} has no conversations")

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return self.conversations[index]
