"""
The offline default chat tasks: questions whose answers sit in a long context inside the conversation.

Each example takes a document of nanochat.synthetic (generated with target_chars = context_chars, so
it is about that long), cuts it at the last sentence end within `context_chars` characters, picks one
fact stated in that excerpt and asks about it after the excerpt:

    user:      Read the notes and answer the question.\\n\\n<excerpt>\\n\\nQuestion: What is the passkey for the blue vault?
    assistant: The passkey for the blue vault is 48213.

Facts come from the corpus's Recall annotations: `fact_start` points at the statement, which is
parsed with regexes built from the corpus's own templates (synthetic.PASSKEY_STATEMENTS,
ATTRIBUTE_CLAUSES, ...) into a kind (passkey, kv, or a person's city/job/age/colour/pet), the cue
that names it (vault, ledger + key, person) and its value; the value must equal the recall's
answer span, else the corpus format changed and we fail loudly. Cues are unique within a document,
so every question has exactly one answer in the excerpt.

- SyntheticRecallChat (generative): evaluate() = 1 iff the exact value occurs in the response as a
  whole word (case-insensitive). reward() = evaluate.
- SyntheticRecallMC (categorical): the same question with 4 lettered choices: the value plus 3
  distractors of the same kind, taken first from other facts of that kind in the document (values
  that also appear in the context, so picking "a number from the text" is not enough), then from the
  corpus's word lists / random numbers of the same shape. The assistant answers with the letter.

Splits: "train" for training, "val"/"test" for evaluation (disjoint synthetic seed streams).
Determinism: example i uses document i of the split under seed stable_seed("recall-chat", seed,
attempt) (attempt > 0 only if the excerpt states no fact, which is rare for context_chars >= 1000),
and random.Random(stable_seed(..., i)) picks the fact and the distractors. Documents never coincide
with the pretraining stream (seed 0).

    SyntheticRecallChat(split="train", num_examples=1000, context_chars=2000, seed=0, start=0, stop=None, step=1)
    SyntheticRecallMC(split="test", num_examples=1000, context_chars=2000, seed=0, start=0, stop=None, step=1)
"""

import random
import re
from dataclasses import dataclass

from nanochat import synthetic
from tasks.common import CategoricalTask, Task, mc_conversation, stable_seed


def _template_regex(template: str, fields: dict) -> re.Pattern:
    """'The passkey for the {obj} is {v}.' -> regex with named groups for the {fields}."""
    rx = re.escape(template)
    for name, pattern in fields.items():
        rx = rx.replace(re.escape("{" + name + "}"), f"(?P<{name}>{pattern})")
    return re.compile(rx)


PASSKEY_RX = [_template_regex(t, {"obj": r"[a-z]+ [a-z]+", "v": r"\d+"}) for t in synthetic.PASSKEY_STATEMENTS]
ATTRIBUTE_RX = {a: _template_regex(t, {"v": r"\w+"}) for a, t in synthetic.ATTRIBUTE_CLAUSES.items()}
KV_RX = re.compile(r"(?P<key>[a-z]+)=(?P<v>\d+)")
LEDGER_RX = re.compile(r"The (?P<ledger>[a-z]+) ledger reads: ")
NAME_RX = re.compile(r"(?P<name>[A-Z][a-z]+ [A-Z][a-z]+) ")

QA = {  # kind -> (question, answer sentence); the answer contains the value {v}
    "passkey": ("What is the passkey for the {obj}?", "The passkey for the {obj} is {v}."),
    "kv": ("In the {ledger} ledger, what is the value of {key}?", "In the {ledger} ledger, {key} is {v}."),
    "city": ("Where does {name} live?", "{name} lives in {v}."),
    "job": ("What is {name}'s job?", "{name} works as the town's {v}."),
    "age": ("How old is {name}?", "{name} is {v} years old."),
    "colour": ("What colour does {name} love?", "{name} loves the colour {v}."),
    "pet": ("What pet does {name} keep?", "{name} keeps a pet {v}."),
}
WORD_POOLS = {"city": synthetic.CITIES, "job": synthetic.JOBS, "colour": synthetic.COLOURS, "pet": synthetic.PETS}
PREAMBLE = "Read the notes and answer the question."


@dataclass
class Fact:
    kind: str    # "passkey" | "kv" | "city" | "job" | "age" | "colour" | "pet"
    start: int   # char offset of the statement in the document
    end: int     # char offset just past the stated value
    value: str
    cue: dict    # the fields naming the fact in QA templates: obj | ledger, key | name


def parse_fact(text: str, recall: synthetic.Recall) -> Fact:
    """The fact a Recall annotation points at, parsed from the statement at recall.fact_start."""
    at, fact = recall.fact_start, None
    if recall.kind == "passkey":
        m = next((m for rx in PASSKEY_RX if (m := rx.match(text, at))), None)
        if m:
            fact = Fact("passkey", at, m.end("v"), m["v"], {"obj": m["obj"]})
    elif recall.kind == "kv":
        m, headers = KV_RX.match(text, at), list(LEDGER_RX.finditer(text, 0, at))
        if m and headers:
            fact = Fact("kv", at, m.end("v"), m["v"], {"key": m["key"], "ledger": headers[-1]["ledger"]})
    elif recall.kind == "attribute":
        # the person's introduction starts right after the previous sentence: "Name Surname lives in ..."
        intro = max(text.rfind(". ", 0, at) + 2, text.rfind("\n", 0, at) + 1)
        name = NAME_RX.match(text, intro)
        for attr, rx in ATTRIBUTE_RX.items():
            m = rx.match(text, at)
            if m and name and name.end() <= at:
                fact = Fact(attr, at, m.end("v"), m["v"], {"name": name["name"]})
                break
    if fact is None or fact.value != text[recall.answer_start:recall.answer_end]:
        raise RuntimeError(f"cannot parse the {recall.kind} fact at offset {at} of a synthetic document "
                           f"({text[at:at + 60]!r}): nanochat.synthetic's templates changed; update "
                           f"tasks/synthetic_chat.py to match")
    return fact


def cut_excerpt(text: str, context_chars: int) -> str:
    """The longest prefix of `text` of at most context_chars chars that ends at a sentence end."""
    if len(text) <= context_chars:
        return text.rstrip()
    head = text[:context_chars + 1]
    end = max(head.rfind(". "), head.rfind(".\n"))
    return text[:end + 1] if end > 0 else text[:context_chars]


def recall_item(split: str, seed: int, index: int, context_chars: int):
    """-> (excerpt, fact asked about, all facts of the document, rng for further choices)."""
    for attempt in range(100):
        doc = synthetic.synthetic_document(index, split, seed=stable_seed("recall-chat", seed, attempt) % 2**31,
                                           target_chars=context_chars)
        excerpt = cut_excerpt(doc.text, context_chars)
        facts = list({r.fact_start: parse_fact(doc.text, r) for r in doc.recalls}.values())
        inside = [f for f in facts if f.end <= len(excerpt)]
        if inside:
            rng = random.Random(stable_seed("recall-chat-example", seed, split, index))
            return excerpt, rng.choice(inside), facts, rng
    raise RuntimeError(f"no synthetic document with a fact within {context_chars} chars: raise context_chars")


def _distractors(fact: Fact, facts: list[Fact], rng: random.Random, k: int = 3) -> list[str]:
    """k distinct wrong values of the same kind: other facts of the document first, then made up."""
    same = sorted({f.value for f in facts if f.kind == fact.kind and f.value != fact.value})
    rng.shuffle(same)
    out = same[:k]
    for _ in range(1000):
        if len(out) == k:
            return out
        if fact.kind in WORD_POOLS:
            v = rng.choice(WORD_POOLS[fact.kind])
        elif fact.kind == "age":
            v = str(rng.randint(18, 89))
        elif fact.kind == "passkey":  # same number of digits, no leading zero
            v = str(rng.randint(10 ** (len(fact.value) - 1), 10 ** len(fact.value) - 1))
        else:
            v = str(rng.randint(1, 9999))
        if v != fact.value and v not in out:
            out.append(v)
    raise RuntimeError(f"could not draw {k} distractors for a {fact.kind} fact")


class _RecallBase(Task):
    """Constructor, size and argument checks shared by the generative and the categorical variant."""

    def __init__(self, split: str = "train", num_examples: int = 1000, context_chars: int = 2000, seed: int = 0,
                 **slice_kw):
        super().__init__(**slice_kw)
        if split not in synthetic.SPLITS:
            raise ValueError(f"{type(self).__name__} split must be one of {synthetic.SPLITS}, got {split!r}")
        if num_examples < 1 or context_chars < 300:
            raise ValueError(f"{type(self).__name__} needs num_examples >= 1 and context_chars >= 300, "
                             f"got {num_examples} and {context_chars}")
        self.split, self.n, self.context_chars, self.seed = split, num_examples, context_chars, seed

    def num_examples(self) -> int:
        return self.n

    def _question(self, index: int):
        excerpt, fact, facts, rng = recall_item(self.split, self.seed, index, self.context_chars)
        question, answer = QA[fact.kind]
        meta = {"answer": fact.value, "kind": fact.kind, "fact_offset": fact.start, "context_chars": len(excerpt)}
        return f"{PREAMBLE}\n\n{excerpt}\n\nQuestion: {question.format(**fact.cue)}", \
            answer.format(v=fact.value, **fact.cue), fact, facts, rng, meta


class SyntheticRecallChat(_RecallBase):
    """Answer a question about a fact stated in a long context; generative."""

    def get_example(self, index: int) -> dict:
        user, answer, _, _, _, meta = self._question(index)
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **meta}

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        value = re.escape(conversation["answer"])
        return int(re.search(rf"(?<!\w){value}(?!\w)", assistant_response, re.IGNORECASE) is not None)


class SyntheticRecallMC(_RecallBase, CategoricalTask):
    """The same questions with 4 lettered choices; categorical."""

    def get_example(self, index: int) -> dict:
        user, _, fact, facts, rng, meta = self._question(index)
        choices = [fact.value] + _distractors(fact, facts, rng)
        rng.shuffle(choices)
        return mc_conversation(user, choices, choices.index(fact.value), **meta)
