"""
MMLU: 57-subject multiple-choice knowledge questions (cais/mmlu), a categorical task.

Rows: question (str), subject (str), choices (4 str), answer (int index 0-3). The user message is
render_mc(question, choices) ("A. ...\\nB. ..."); the assistant answers with one letter; evaluate()
is 1 iff the predicted letter equals the reference letter.

Subsets: "all" (splits dev / validation / test: the eval set) and "auxiliary_train" (split train:
~100k extra questions used in midtraining; its hub rows nest the columns under "train", unwrapped here).

    MMLU(subset="all", split="test", data_files=None, data_dir=None, start=0, stop=None, step=1)
"""

from tasks.common import CategoricalTask, load_rows, mc_conversation, unwrap_row

HUB_PATH = "cais/mmlu"


class MMLU(CategoricalTask):
    """Multiple choice with 4 lettered choices; metadata "subject"."""

    def __init__(self, subset: str = "all", split: str = "test", data_files=None, data_dir=None, **slice_kw):
        super().__init__(**slice_kw)
        if subset == "auxiliary_train" and split != "train":
            raise ValueError(f"MMLU auxiliary_train only has split 'train', got {split!r}")
        if subset == "all" and split not in ("dev", "validation", "test", "auxiliary_train"):
            raise ValueError(f"MMLU 'all' splits are dev / validation / test / auxiliary_train, got {split!r}")
        self.subset, self.split = subset, split
        self.rows = load_rows(HUB_PATH, subset, split, data_files, data_dir)

    def get_example(self, index: int) -> dict:
        row = unwrap_row(self.rows[index], "train")
        choices, answer = list(row["choices"]), int(row["answer"])
        return mc_conversation(row["question"], choices, answer, subject=row.get("subject", ""))
