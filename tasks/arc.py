"""
ARC: grade-school science multiple-choice questions (allenai/ai2_arc), a categorical task.

Rows: id, question, choices {"text": [...], "label": [...]}, answerKey. The hub labels are "A".."E"
or sometimes "1".."4"; choices are re-lettered A, B, C, ... in their given order and the answer is
the letter at the position of answerKey in the labels, so the model always answers with a letter.

Subsets "ARC-Easy" and "ARC-Challenge"; splits train / validation / test.

    ARC(subset="ARC-Easy", split="test", data_files=None, data_dir=None, start=0, stop=None, step=1)
"""

from tasks.common import CategoricalTask, load_rows, mc_conversation

HUB_PATH = "allenai/ai2_arc"


class ARC(CategoricalTask):
    """Multiple choice with 3-5 lettered choices."""

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", data_files=None, data_dir=None, **slice_kw):
        super().__init__(**slice_kw)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be 'ARC-Easy' or 'ARC-Challenge', got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train / validation / test, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = load_rows(HUB_PATH, subset, split, data_files, data_dir)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        texts, labels = list(row["choices"]["text"]), [str(x) for x in row["choices"]["label"]]
        key = str(row["answerKey"])
        if key not in labels:
            raise ValueError(f"ARC {self.subset} {self.split} row {index}: answerKey {key!r} not among labels {labels}")
        return mc_conversation(row["question"], texts, labels.index(key), id=row.get("id", ""))
