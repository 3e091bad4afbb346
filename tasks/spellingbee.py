"""
SpellingBee: letter-level questions about words, answered with a Python tool call. Fully offline.

Two kinds of example (each about one word from the word list):
- "count": How many times does 'r' appear in 'strawberry'? The assistant spells the word, calls
  the tool `'strawberry'.count('r')`, reads its output and ends with "#### 3".
- "spell": Spell 'lantern' letter by letter. The assistant calls `'-'.join('lantern')`, reads
  "l-a-n-t-e-r-n" and ends with "#### l-a-n-t-e-r-n".
Tool calls are single Python expressions (a calculator-style tool can evaluate them); the output
part is str() of the result.

Words: by default every lowercase alphabetic word (>= 3 letters) of nanochat.synthetic's word
lists (names, cities, jobs, colours, pets, ledger keys, filler vocabulary), so the examples use
words the offline corpus knows; `words_file=` reads one word per line instead. Example i of a split
is drawn by random.Random(stable_seed("spellingbee", seed, split, i)): deterministic and random-access.
In a count question the letter is from the word 80% of the time, else a letter it lacks (answer 0).

evaluate(): "count" -> the integer after the last "####" equals the true count; "spell" -> the
letters after the last "####" (split on any non-letter) equal the word's letters, in order.
reward() = evaluate.

    SpellingBee(split="train", num_examples=1000, seed=0, words_file=None, start=0, stop=None, step=1)
"""

import random
import re
import string

from nanochat import synthetic
from tasks.common import Task, final_answer, stable_seed

COUNT_QUESTIONS = ["How many times does the letter '{c}' appear in '{w}'?", "How many {c}'s are in the word {w}?",
                   "Count the occurrences of '{c}' in \"{w}\".", "In the word '{w}', how many times is '{c}' used?"]
SPELL_QUESTIONS = ["Spell the word '{w}' letter by letter.", "How do you spell {w}? Give each letter.",
                   "Can you spell \"{w}\" one letter at a time?"]


def default_words() -> list[str]:
    """Lowercase alphabetic words of >= 3 letters from the synthetic corpus's word lists, sorted."""
    pools = [synthetic.FIRST_NAMES, synthetic.LAST_NAMES, synthetic.CITIES, synthetic.JOBS, synthetic.COLOURS,
             synthetic.PETS, synthetic.LEDGER_KEYS, synthetic.LEDGER_NAMES, synthetic.ADJS, synthetic.NOUNS,
             synthetic.THINGS, synthetic.VERBS_T, synthetic.VERBS_I, synthetic.ADVERBS]
    return sorted({w.lower() for pool in pools for w in pool if w.isalpha() and len(w) >= 3})


def read_words(path: str) -> list[str]:
    """One word per line; keeps lowercase-able alphabetic words, sorted and deduplicated."""
    with open(path, encoding="utf-8") as f:
        words = sorted({ln.strip().lower() for ln in f if ln.strip().isalpha()})
    if not words:
        raise ValueError(f"{path}: no alphabetic words (expected one word per line)")
    return words


class SpellingBee(Task):
    """Count letters / spell words, with a Python tool call in the solution; generative."""

    def __init__(self, split: str = "train", num_examples: int = 1000, seed: int = 0, words_file=None, **slice_kw):
        super().__init__(**slice_kw)
        if split not in ("train", "val", "test"):
            raise ValueError(f"SpellingBee split must be train / val / test, got {split!r}")
        if num_examples < 1:
            raise ValueError(f"SpellingBee num_examples must be >= 1, got {num_examples}")
        self.split, self.n, self.seed = split, num_examples, seed
        self.words = read_words(words_file) if words_file else default_words()

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        rng = random.Random(stable_seed("spellingbee", self.seed, self.split, index))
        word = rng.choice(self.words)
        spelled = "-".join(word)
        if rng.random() < 0.5:
            absent = sorted(set(string.ascii_lowercase) - set(word))
            c = rng.choice(word) if rng.random() < 0.8 or not absent else rng.choice(absent)
            n = word.count(c)
            user = rng.choice(COUNT_QUESTIONS).format(c=c, w=word)
            content = [{"type": "text", "text": f"The word '{word}' is spelled {spelled}. Let me count the "
                                                f"'{c}'s with Python.\n\n"},
                       {"type": "python", "text": f"'{word}'.count('{c}')"},
                       {"type": "python_output", "text": str(n)},
                       {"type": "text", "text": f"\n\nThe letter '{c}' appears {n} time{'s' * (n != 1)} "
                                                f"in '{word}'.\n\n#### {n}"}]
            kind, answer = "count", str(n)
        else:
            user = rng.choice(SPELL_QUESTIONS).format(w=word)
            content = [{"type": "text", "text": "Let me split it into letters with Python.\n\n"},
                       {"type": "python", "text": f"'-'.join('{word}')"},
                       {"type": "python_output", "text": spelled},
                       {"type": "text", "text": f"\n\n'{word}' is spelled {spelled}.\n\n#### {spelled}"}]
            kind, answer = "spell", spelled
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": content}],
                "kind": kind, "word": word, "answer": answer}

    def evaluate(self, conversation: dict, assistant_response: str) -> int:
        got = final_answer(assistant_response)
        if got is None:
            return 0
        if conversation["kind"] == "count":
            m = re.match(r"-?\d+", got)
            return int(m is not None and int(m.group(0)) == int(conversation["answer"]))
        letters = [s for s in re.split(r"[^a-zA-Z]+", got.lower()) if s]
        return int(letters == list(conversation["word"]))
