"""
Tests for nanochat/tokenizer.py and scripts/tok_train.py, tok_eval.py: training to an exact vocab,
lossless encode/decode, special tokens, save/load, clear errors, chat rendering masks, token bytes.
"""

import importlib
import importlib.util
import itertools
import os
import pickle
import random
import subprocess
import sys
import types

import pytest
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, TokenizerError, get_token_bytes, get_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 512


def make_corpus(n_docs=200, seed=0):
    """Deterministic pseudo-English with digits, punctuation and some unicode: plenty of repeated pairs."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "ph", "st", "ér", "ü", "日本"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    docs = []
    for _ in range(n_docs):
        sent = [rng.choice(words) for _ in range(rng.randint(20, 80))]
        sent.insert(rng.randrange(len(sent)), str(rng.randint(0, 99999)))
        docs.append(" ".join(sent) + ".\n  x = f(y) + 1;\n")
    return docs


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(make_corpus()), VOCAB)


# ---------------------------------------------------------------------- vocab & encode/decode
def test_vocab_size_exact(tok):
    assert tok.get_vocab_size() == VOCAB
    assert RustBPETokenizer.train_from_iterator(iter(make_corpus()), 300).get_vocab_size() == 300


def test_vocab_too_small_or_corpus_too_small():
    with pytest.raises(ValueError, match="too small"):
        RustBPETokenizer.train_from_iterator(iter(make_corpus()), 260)
    with pytest.raises(ValueError, match="raise --max_chars"):
        RustBPETokenizer.train_from_iterator(iter(["ab ab"] * 10), 400)


def test_pad_vocab_reserved_ids(tmp_path):
    # "ab ab" only supports 258 BPE tokens (256 bytes + "ab" + " ab"); the rest of 300 is reserved padding
    tok = RustBPETokenizer.train_from_iterator(iter(["ab ab"] * 10), 300, pad_vocab=True)
    assert tok.get_vocab_size() == 300 and tok.num_reserved == 300 - 258 - len(SPECIAL_TOKENS)
    assert tok.encode_special("<|bos|>") == 258 and tok.encode_special("<|output_end|>") == 258 + 8
    assert (tok.token_bytes()[258:] == 0).all()
    text = "ab ab abc <|reserved_0|> 日本"
    ids = tok.encode(text)
    assert max(ids) < 258 and tok.decode(ids) == text
    tok.save(tmp_path)
    tok2 = RustBPETokenizer.from_directory(tmp_path)
    assert tok2.num_reserved == tok.num_reserved and tok2.get_vocab_size() == 300
    assert tok2.encode(text) == ids


@pytest.mark.parametrize("text", [
    "", "hello world", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n\n", "digits 0 12 345 6789 3.14159",
    "ünïcödé 日本語 emoji 🙂👍🏽 e\u0301", "<|bos|> looks special but is text", "\x00\x01 control", "a" * 1000,
])
def test_roundtrip_exact(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_digits_grouped_at_most_two(tok):
    # the split regex never lets a token span more than 2 digits
    for i in tok.encode("1234567890 98765"):
        s = tok.id_to_token(i)
        assert sum(c.isdigit() for c in s) <= 2


def test_ordinary_text_never_yields_specials(tok):
    special_ids = {tok.encode_special(s) for s in SPECIAL_TOKENS}
    assert not special_ids & set(tok.encode("<|bos|><|user_start|>hi<|assistant_end|>"))


def test_special_token_ids(tok):
    n_bpe = VOCAB - len(SPECIAL_TOKENS)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.encode_special(s) == n_bpe + i
    assert tok.get_bos_token_id() == tok.encode_special("<|bos|>") == n_bpe
    assert tok.decode([tok.encode_special("<|user_start|>")]) == "<|user_start|>"
    with pytest.raises(KeyError, match="not a special token"):
        tok.encode_special("<|nope|>")


def test_batch_encode_with_prepend_append(tok):
    texts = ["first doc", "second, longer document 123", "", "日本"]
    bos = tok.get_bos_token_id()
    batch = tok.encode(texts, prepend="<|bos|>", append=bos, num_threads=2)
    assert batch == [[bos] + tok.encode(t) + [bos] for t in texts]
    assert tok.encode("x y", prepend=bos) == [bos] + tok.encode("x y")
    with pytest.raises(TypeError):
        tok.encode(123)


# ---------------------------------------------------------------------- save / load
def test_save_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["token_bytes.pt", "tokenizer.pkl"]  # no tmp files left
    tok2 = RustBPETokenizer.from_directory(tmp_path)
    assert tok2.get_vocab_size() == tok.get_vocab_size()
    texts = make_corpus(5, seed=1) + ["ünïcödé 🙂 42"]
    assert tok2.encode(texts) == tok.encode(texts)
    assert torch.equal(torch.load(tmp_path / "token_bytes.pt", weights_only=True), tok.token_bytes())


def test_missing_and_corrupt_give_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer at .*scripts\.tok_train"):
        RustBPETokenizer.from_directory(tmp_path / "nothing_here")
    (tmp_path / "tokenizer.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(TokenizerError, match=r"corrupt.*scripts\.tok_train"):
        RustBPETokenizer.from_directory(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps({"format": 999}))
    with pytest.raises(TokenizerError, match="scripts.tok_train"):
        RustBPETokenizer.from_directory(tmp_path)


def test_get_tokenizer_and_token_bytes_from_base_dir(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        get_tokenizer()
    tok.save(tmp_path / "tokenizer")
    assert get_tokenizer().encode("abc 12") == tok.encode("abc 12")
    expected = tok.token_bytes()
    assert torch.equal(get_token_bytes("cpu"), expected)
    os.remove(tmp_path / "tokenizer" / "token_bytes.pt")  # absent -> recomputed and re-saved
    assert torch.equal(get_token_bytes(), expected)
    assert (tmp_path / "tokenizer" / "token_bytes.pt").exists()


def test_token_bytes_values(tok):
    tb = tok.token_bytes()
    assert tb.shape == (VOCAB,) and tb.dtype == torch.int64
    assert tb[ord("a")] == 1 and tb[255] == 1  # the 256 byte tokens are 1 byte each
    for s in SPECIAL_TOKENS:
        assert tb[tok.encode_special(s)] == 0
    for i in tok.encode("kalomi 日本 sa"):
        assert tb[i] == len(tok.enc.decode_single_token_bytes(i))
    # bits-per-byte denominator: token bytes of an encoding sum to the UTF-8 length of the text
    text = "ünïcödé kalo 12345"
    assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))


# ---------------------------------------------------------------------- chat rendering
def conv(*msgs):
    return {"messages": [{"role": r, "content": c} for r, c in msgs]}


def test_render_conversation_masks(tok):
    sp = tok.encode_special
    c = conv(("user", "what is 2+2?"), ("assistant", "4"), ("user", "thanks"), ("assistant", "you are welcome"))
    ids, mask = tok.render_conversation(c)
    assert len(ids) == len(mask)
    expected = ([sp("<|bos|>"), sp("<|user_start|>")] + tok.encode("what is 2+2?") + [sp("<|user_end|>")]
                + [sp("<|assistant_start|>")] + tok.encode("4") + [sp("<|assistant_end|>")]
                + [sp("<|user_start|>")] + tok.encode("thanks") + [sp("<|user_end|>")]
                + [sp("<|assistant_start|>")] + tok.encode("you are welcome") + [sp("<|assistant_end|>")])
    assert ids == expected
    # supervised exactly: assistant content + its <|assistant_end|>
    supervised = [i for i, m in zip(ids, mask) if m]
    assert supervised == (tok.encode("4") + [sp("<|assistant_end|>")]
                          + tok.encode("you are welcome") + [sp("<|assistant_end|>")])
    assert tok.decode(ids).startswith("<|bos|><|user_start|>what is 2+2?<|user_end|><|assistant_start|>4")


def test_render_python_parts(tok):
    sp = tok.encode_special
    c = conv(("user", "compute"), ("assistant", [
        {"type": "text", "text": "let me run "},
        {"type": "python", "text": "print(6*7)"},
        {"type": "python_output", "text": "42"},
        {"type": "text", "text": "the answer is 42"},
    ]))
    ids, mask = tok.render_conversation(c)
    out_s, out_e = ids.index(sp("<|output_start|>")), ids.index(sp("<|output_end|>"))
    py_s, py_e = ids.index(sp("<|python_start|>")), ids.index(sp("<|python_end|>"))
    assert ids[out_s + 1:out_e] == tok.encode("42")
    assert all(m == 0 for m in mask[out_s:out_e + 1])  # tool output is never trained on
    assert ids[py_s + 1:py_e] == tok.encode("print(6*7)")
    assert all(m == 1 for m in mask[py_s:py_e + 1])  # the tool call is
    user_end = ids.index(sp("<|user_end|>"))
    assert all(m == 0 for m in mask[:user_end + 2])  # bos, user turn, assistant_start
    assert mask[-1] == 1 and ids[-1] == sp("<|assistant_end|>")


def test_render_system_merged_and_truncation(tok):
    c = conv(("system", "be brief"), ("user", "hi"), ("assistant", "hello"))
    ids, mask = tok.render_conversation(c)
    plain, _ = tok.render_conversation(conv(("user", "be brief\n\nhi"), ("assistant", "hello")))
    assert ids == plain
    assert ids.count(tok.encode_special("<|user_start|>")) == 1
    ids5, mask5 = tok.render_conversation(c, max_tokens=5)
    assert ids5 == ids[:5] and mask5 == mask[:5]


@pytest.mark.parametrize("bad, match", [
    (conv(("assistant", "hi")), "alternate"),
    (conv(("user", "a"), ("user", "b")), "alternate"),
    (conv(("user", "a"), ("assistant", "b"), ("system", "c")), "alternate"),
    (conv(("system", "s"), ("assistant", "b")), "system message must be followed"),
    (conv(("user", [{"type": "python", "text": "x"}])), "only text parts"),
    (conv(("user", "a"), ("assistant", [{"type": "image", "text": "x"}])), "expected"),
    ({"messages": []}, "no messages"),
    ([], "must be a dict"),
])
def test_render_errors(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(bad)


def test_render_for_completion(tok):
    c = conv(("user", "hi"), ("assistant", "hello"), ("user", "how are you"), ("assistant", "fine"))
    ids = tok.render_for_completion(c)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    full, _ = tok.render_conversation(conv(("user", "hi"), ("assistant", "hello"), ("user", "how are you")))
    assert ids == full + [tok.encode_special("<|assistant_start|>")]
    assert len(c["messages"]) == 4  # caller's conversation untouched
    assert tok.render_for_completion(conv(("user", "hi"))) == tok.render_for_completion(
        conv(("user", "hi"), ("assistant", "x")))
    assert "[" in tok.visualize_tokenization(ids, [0] * len(ids))


# ---------------------------------------------------------------------- scripts
def _stub_dataset(docs):
    """A stand-in for nanochat.dataset with the contract's functions (and the --source choices)."""
    stub = types.ModuleType("nanochat.dataset")
    stub.SOURCES = ("synthetic", "recall", "fineweb", "dir")
    stub.resolve_source = lambda source="synthetic", data_dir=None: types.SimpleNamespace(kind=source)
    stub.iter_documents = lambda src, split, start=0: iter(docs if split == "train" else docs[:1])
    stub.documents_per_pass = lambda src, split: None  # endless, like the synthetic corpus
    return stub


def _fresh_import(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # restore the prior state at teardown
    del sys.modules[name]
    return importlib.import_module(name)


def test_tok_train_and_eval_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "nanochat.dataset", _stub_dataset(make_corpus()))
    tok_train = _fresh_import("scripts.tok_train", monkeypatch)
    tok_eval = _fresh_import("scripts.tok_eval", monkeypatch)
    logged = []
    fake_report = types.SimpleNamespace(log=lambda section, data: logged.append((section, data)))
    monkeypatch.setattr(tok_train, "get_report", lambda: fake_report)
    monkeypatch.setattr(tok_eval, "get_report", lambda: fake_report)
    monkeypatch.setattr(tok_eval, "REFERENCE_ENCODINGS", [("GPT-X", "no_such_encoding")])

    tok_train.main(["--vocab_size", "400", "--max_chars", "30000", "--doc_cap", "500"])
    out = capsys.readouterr().out
    assert "roundtrip ok" in out and "trained on" in out
    assert get_tokenizer().get_vocab_size() == 400
    assert (tmp_path / "tokenizer" / "token_bytes.pt").exists()
    assert logged[0][0] == "Tokenizer training" and logged[0][1][0]["vocab_size"] == 400

    tok_eval.main([])
    out = capsys.readouterr().out
    assert "note: skipping the GPT-X column" in out
    assert "| news |" in out and "| synthetic val doc |" in out
    assert logged[1][0] == "Tokenizer evaluation"

    with pytest.raises(SystemExit):  # argparse rejects abbreviations and tiny vocabs
        tok_train.parse_args(["--vocab", "400"])
    with pytest.raises(SystemExit):
        tok_train.parse_args(["--vocab_size", "100"])
    with pytest.raises(SystemExit, match="raise --max_chars"):  # too little text for the vocab
        tok_train.main(["--vocab_size", "4096", "--max_chars", "2000", "--pad_vocab", "0"])
    tok_train.main(["--vocab_size", "4096", "--max_chars", "2000"])  # default: pad with reserved ids, warn
    assert "WARNING: the text supports only" in capsys.readouterr().out
    assert get_tokenizer().get_vocab_size() == 4096 and logged[-1][1][1]["reserved_padding_ids"] > 0


@pytest.mark.skipif(importlib.util.find_spec("nanochat.dataset") is None,
                    reason="nanochat/dataset.py (the synthetic text source) is not written yet")
def test_tok_train_subprocess_synthetic(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "scripts.tok_train", "--vocab_size", "512", "--max_chars", "300000"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "roundtrip ok" in r.stdout
    tok = RustBPETokenizer.from_directory(tmp_path / "tokenizer")
    assert tok.get_vocab_size() == 512
    assert (tmp_path / "tokenizer" / "token_bytes.pt").exists()


def _book(n_chars, seed=0):
    from tests.test_dataset import book_text
    return book_text(n_chars, seed)


def _train_tok_on_dir(data_dir, tmp_path, monkeypatch, capsys, *flags):
    """tok_train.main on a folder (the real nanochat.dataset); returns (texts the BPE trainer got, stdout)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    tok_train = _fresh_import("scripts.tok_train", monkeypatch)
    monkeypatch.setattr(tok_train, "get_report", lambda: types.SimpleNamespace(log=lambda section, data: None))
    seen, train = [], RustBPETokenizer.train_from_iterator

    def recording(texts, *args, **kwargs):
        return train((seen.append(t) or t for t in texts), *args, **kwargs)

    monkeypatch.setattr(tok_train.RustBPETokenizer, "train_from_iterator", staticmethod(recording))
    tok_train.main(["--data_dir", str(data_dir), "--vocab_size", "300", *flags])
    return seen, capsys.readouterr().out


def test_tok_train_one_book_folder(tmp_path, monkeypatch, capsys):
    """One .txt book: no traceback; every character of its train documents reaches the trainer exactly once
    (one pass, not looped to --max_chars; pieces of --doc_cap, not truncated), and the tokenizer trains."""
    from nanochat.dataset import documents_per_pass, iter_documents, resolve_source

    book = tmp_path / "book"
    book.mkdir()
    (book / "book.txt").write_text(_book(300_000))
    src = resolve_source("dir", str(book))
    train_docs = list(itertools.islice(iter_documents(src, "train"), documents_per_pass(src, "train")))
    seen, out = _train_tok_on_dir(book, tmp_path, monkeypatch, capsys)
    assert "".join(seen) == "".join(train_docs)
    assert max(map(len, seen)) <= 10_000 and len(seen) > len(train_docs)  # --doc_cap pieces
    chars = sum(map(len, train_docs))
    assert f"trained on {chars:,} chars: all {len(train_docs)} train documents, each once" in out
    assert get_tokenizer().get_vocab_size() == 300
    with open(tmp_path / "base" / "tokenizer" / "trained_on.txt") as f:
        assert f.read() == f"dir {os.path.realpath(book)}\n"

    seen, out = _train_tok_on_dir(book, tmp_path, monkeypatch, capsys, "--max_chars", "50000")
    assert 50_000 <= sum(map(len, seen)) < 60_000 and "(stopped at --max_chars)" in out


def test_tok_train_several_files_each_read_once(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "chapters"
    folder.mkdir()
    texts = [_book(25_000, seed=i) for i in range(6)]
    for i, t in enumerate(texts):
        (folder / f"ch{i:02d}.txt").write_text(t)
    seen, out = _train_tok_on_dir(folder, tmp_path, monkeypatch, capsys, "--doc_cap", "4000")
    assert "".join(seen) == "".join(texts[1:])  # file 0 is the val document; the rest whole, once
    assert "all 5 train documents, each once" in out


def test_tok_train_too_little_text_is_one_clear_error(tmp_path):
    (tmp_path / "note.txt").write_text("a short note\n" * 50)
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--data_dir", str(tmp_path), "--vocab_size", "300"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "tok_train: data dir" in r.stderr and "need at least 2" in r.stderr and "add text" in r.stderr
