"""
SmolTalk: general chat conversations for SFT (HuggingFaceTB/smol-smoltalk, splits train / test).

Each row has a "messages" column: [{"role": "system"|"user"|"assistant", "content": str}, ...].
Rows are validated (optional leading system message, then user/assistant alternating, string
contents) and passed through unchanged; the tokenizer merges a system message into the first user
turn. It is a training task (the test split serves as validation loss data): evaluate() raises.

    SmolTalk(split="train", data_files=None, data_dir=None, start=0, stop=None, step=1)
"""

from tasks.common import Task, load_rows, validate_messages

HUB_PATH = "HuggingFaceTB/smol-smoltalk"


class SmolTalk(Task):
    """General conversations; generative, training only."""

    def __init__(self, split: str = "train", data_files=None, data_dir=None, **slice_kw):
        super().__init__(**slice_kw)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.rows = load_rows(HUB_PATH, None, split, data_files, data_dir)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return {"messages": validate_messages(row.get("messages"), f"SmolTalk {self.split} row {index}")}
