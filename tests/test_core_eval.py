"""CORE harness: scoring with models whose predictions we control, bundle formats, download, synthetic bundle."""

import csv
import functools
import http.server
import json
import math
import os
import socket
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from nanochat import core_eval as ce
from nanochat import eval_bundle as eb

BOS = 256


class CharTokenizer:
    """One token per character (ASCII), <|bos|> = 256."""

    def get_bos_token_id(self):
        return BOS

    def get_vocab_size(self):
        return 257

    def encode(self, text):
        return [ord(c) for c in text]


class OracleModel:
    """Knows a set of texts. At each position it finds the text seen so far (bos dropped; possibly cropped
    on the left, so searched as a substring) inside a known text and puts all its mass on the next char."""

    def __init__(self, texts, sequence_len=4096):
        self.texts = list(texts)
        self.config = SimpleNamespace(sequence_len=sequence_len)
        self.calls = 0

    def __call__(self, idx):
        self.calls += 1
        B, T = idx.shape
        logits = torch.zeros(B, T, 257)
        for b in range(B):
            row = "".join(chr(i) for i in idx[b].tolist() if i != BOS)
            for t in range(T):
                seen = "".join(chr(i) for i in idx[b, :t + 1].tolist() if i != BOS)
                for text in self.texts:
                    pos = text.find(seen) if seen else 0
                    if pos >= 0 and pos + len(seen) < len(text):
                        logits[b, t, ord(text[pos + len(seen)])] = 20.0
                        break
            del row
        return logits


MC_ROWS = [{"query": f"Question {i}: what is item {i}?", "choices": ["apple", "banana", "cherry", "dates"],
            "gold": i % 4} for i in range(8)]
SCHEMA_ROWS = [{"context_options": [f"Tom has a {c} cat number {i}" for c in ("red", "blue")],
                "continuation": f"so the cat {i} is {('red', 'blue')[i % 2]}.", "gold": i % 2} for i in range(6)]
LM_ROWS = [{"context": f"The code of box {i} is", "continuation": f" {1000 + 37 * i}"} for i in range(6)]


def write_bundle(root):
    os.makedirs(root, exist_ok=True)
    tasks = [("mc", "multiple_choice", MC_ROWS, 2, "\nAnswer: ", 0.25), ("sch", "schema", SCHEMA_ROWS, 1, " ", 0.5),
             ("lm", "language_modeling", LM_ROWS, 2, "", 0.0)]
    for label, _, rows, *_ in tasks:
        with open(os.path.join(root, f"{label}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    core = {"tasks": [{"label": lab, "type": t, "dataset_uri": f"{lab}.jsonl", "num_fewshot": k,
                       "continuation_delimiter": d, "random_baseline": rb} for lab, t, _, k, d, rb in tasks]}
    with open(os.path.join(root, "core.json"), "w") as f:
        json.dump(core, f)
    return str(root)


def known_texts(bundle, wrong=False):
    """Full prompt + gold (or a wrong) continuation for every example: what the oracle model 'knows'."""
    texts = []
    for task in ce.load_bundle(bundle):
        rows = ce.load_rows(task)
        for i, row in enumerate(rows):
            pairs = ce.render_example(task, rows, i)
            if task.type == "language_modeling":
                ctx, cont = pairs[0]
                texts.append(ctx + (cont[:-1] + "9" if wrong else cont) + "\n")
            else:
                j = (row["gold"] + 1) % len(pairs) if wrong else row["gold"]
                texts.append(pairs[j][0] + pairs[j][1] + "\n")
    return texts


def test_oracle_scores_perfect_and_anti_oracle_zero(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    tok = CharTokenizer()
    out = ce.evaluate_core(OracleModel(known_texts(bundle)), tok, bundle, "cpu")
    assert out["results"] == {"mc": 1.0, "sch": 1.0, "lm": 1.0}
    assert out["core_metric"] == pytest.approx(1.0)
    assert out["counts"] == {"mc": 8, "sch": 6, "lm": 6}
    bad = ce.evaluate_core(OracleModel(known_texts(bundle, wrong=True)), tok, bundle, "cpu")
    assert bad["results"] == {"mc": 0.0, "sch": 0.0, "lm": 0.0}
    # centered: (0 - .25)/.75, (0 - .5)/.5, (0 - 0)/1 -> mean
    assert bad["centered_results"] == pytest.approx({"mc": -1 / 3, "sch": -1.0, "lm": 0.0})
    assert bad["core_metric"] == pytest.approx((-1 / 3 - 1.0 + 0.0) / 3)


def test_one_forward_per_example_and_max_per_task(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    model = OracleModel(known_texts(bundle))
    out = ce.evaluate_core(model, CharTokenizer(), bundle, "cpu", max_per_task=3)
    assert out["counts"] == {"mc": 3, "sch": 3, "lm": 3} and model.calls == 9
    assert out["core_metric"] == pytest.approx(1.0)


def test_centered_math():
    assert ce.centered(0.25, 0.25) == 0.0
    assert ce.centered(1.0, 0.25) == 1.0
    assert ce.centered(0.5, 0.25) == pytest.approx(1 / 3)
    assert ce.centered(0.3, 0.0) == pytest.approx(0.3)


def test_render_fewshot_deterministic_and_excludes_self(tmp_path):
    task = ce.load_bundle(write_bundle(tmp_path / "b"))[0]
    rows = ce.load_rows(task)
    a, b = ce.render_example(task, rows, 5), ce.render_example(task, rows, 5)
    assert a == b and len(a) == 4
    ctx = a[0][0]
    demos = ctx.split("\n\n")
    assert len(demos) == 3 and demos[-1] == rows[5]["query"] + "\nAnswer: "
    assert rows[5]["query"] not in demos[0] + demos[1]
    assert all(demo.split("\nAnswer: ")[1] in rows[0]["choices"] for demo in demos[:2])
    assert [c for _, c in a] == rows[5]["choices"]


def test_encode_pair_moves_whitespace_and_crops_left():
    tok = CharTokenizer()
    ids, start = ce.encode_pair(tok, "Q: capital? A: ", "Paris", None)
    assert ids[0] == BOS and "".join(map(chr, ids[1:start])) == "Q: capital? A:"
    assert "".join(map(chr, ids[start:])) == " Paris"
    ids, start = ce.encode_pair(tok, "x" * 50 + " ", "Paris", 10)
    assert len(ids) == 10 and "".join(map(chr, ids[start:])) == " Paris" and start == 4
    with pytest.raises(ValueError, match="empty continuation"):
        ce.encode_pair(tok, "abc", "", None)


def test_cropped_prompts_still_score_the_continuation(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    model = OracleModel(known_texts(bundle), sequence_len=24)  # few-shot prompts are far longer than 24
    out = ce.evaluate_core(model, CharTokenizer(), bundle, "cpu")
    assert out["results"]["lm"] == 1.0 and out["results"]["mc"] == 1.0


class FavorA:
    """Ignores context: 'a' is very likely, everything else equally unlikely."""

    config = SimpleNamespace(sequence_len=64)

    def __call__(self, idx):
        logits = torch.zeros(*idx.shape, 257)
        logits[..., ord("a")] = 8.0
        return logits


def test_mc_uses_mean_not_sum_loss(tmp_path):
    root = tmp_path / "m"
    os.makedirs(root)
    with open(root / "t.jsonl", "w") as f:  # "b": 1 unlikely token; "aaaab": 4 likely + 1 unlikely -> lower mean
        f.write(json.dumps({"query": "q", "choices": ["b", "aaaab"], "gold": 1}) + "\n")
    with open(root / "core.json", "w") as f:
        json.dump({"tasks": [{"label": "t", "type": "multiple_choice", "dataset_uri": "t.jsonl", "num_fewshot": 0,
                              "continuation_delimiter": " ", "random_baseline": 0.5}]}, f)
    assert ce.evaluate_core(FavorA(), CharTokenizer(), str(root), "cpu")["results"]["t"] == 1.0
    seqs = [ce.encode_pair(CharTokenizer(), "q ", c, None) for c in ("b", "aaaab")]
    losses, exact = ce.score_sequences(FavorA(), seqs, "cpu")
    assert losses[1] < losses[0] and exact == [False, False]


def test_bad_bundles_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CORE bundle"):
        ce.load_bundle(str(tmp_path))
    bundle = write_bundle(tmp_path / "b")
    with open(os.path.join(bundle, "mc.jsonl"), "a") as f:
        f.write(json.dumps({"query": "q", "choices": ["x"], "gold": 3}) + "\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:9: bad multiple_choice row"):
        ce.load_rows(ce.load_bundle(bundle)[0])


OFFICIAL_YAML = """# CORE tasks
icl_tasks:
-
  label: mc_task
  dataset_uri: world/mc.jsonl # a comment
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
  has_categories: true
- label: lm_task
  dataset_uri: lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""


def write_official(root):
    os.makedirs(os.path.join(root, "eval_data", "world"))
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write(OFFICIAL_YAML)
    with open(os.path.join(root, "eval_meta_data.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["Eval Task", "Task Category", "Random baseline"], ["mc_task", "x", "25"], ["lm_task", "y", "0"]])
    for rel, rows in (("world/mc.jsonl", MC_ROWS), ("lm.jsonl", LM_ROWS)):
        with open(os.path.join(root, "eval_data", rel), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def test_official_format_and_simple_yaml(tmp_path):
    write_official(str(tmp_path))
    specs = ce.load_bundle(str(tmp_path))
    assert [(s.label, s.type, s.num_fewshot, s.continuation_delimiter, s.random_baseline) for s in specs] == [
        ("mc_task", "multiple_choice", 2, "\nAnswer: ", 0.25), ("lm_task", "language_modeling", 0, " ", 0.0)]
    assert specs[0].dataset_path == os.path.join(str(tmp_path), "eval_data", "world", "mc.jsonl")
    parsed = ce.parse_simple_yaml(OFFICIAL_YAML)
    yaml = pytest.importorskip("yaml")
    assert parsed == yaml.safe_load(OFFICIAL_YAML)


# ------------------------------------------------------------------------------------------------
# download


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files and honours `Range: bytes=N-` (the stdlib handler ignores Range)."""

    ranges_seen = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        if not rng:
            return super().do_GET()
        RangeHandler.ranges_seen.append(rng)
        data = open(self.translate_path(self.path), "rb").read()
        start = int(rng.split("=")[1].rstrip("-"))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory, handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=directory))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_zip(tmp_path):
    src = tmp_path / "src" / "eval_bundle"
    write_official(str(src))
    zdir = tmp_path / "www"
    os.makedirs(zdir)
    with zipfile.ZipFile(zdir / "eval_bundle.zip", "w") as zf:
        for dirpath, _, files in os.walk(src):
            for name in files:
                full = os.path.join(dirpath, name)
                zf.write(full, os.path.relpath(full, tmp_path / "src"))
    return str(zdir), (zdir / "eval_bundle.zip").read_bytes()


@pytest.mark.parametrize("handler", [RangeHandler, QuietHandler])
def test_download_resumes_and_unzips(tmp_path, handler):
    www, blob = make_zip(tmp_path)
    server = serve(www, handler)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        dest = str(tmp_path / "base" / "eval_bundle")
        os.makedirs(os.path.dirname(dest))
        with open(dest + ".zip.part", "wb") as f:  # an interrupted earlier download
            f.write(blob[:len(blob) // 2])
        RangeHandler.ranges_seen.clear()
        assert eb.download_eval_bundle(url, dest) == dest
        assert [s.label for s in ce.load_bundle(dest)] == ["mc_task", "lm_task"]
        assert not os.path.exists(dest + ".zip") and not os.path.exists(dest + ".zip.part")
        if handler is RangeHandler:
            assert RangeHandler.ranges_seen == [f"bytes={len(blob) // 2}-"]
        assert eb.download_eval_bundle(url, dest) == dest  # already there: no download
    finally:
        server.shutdown()


def test_download_offline_and_bad_zip(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: connection refused
    dest = str(tmp_path / "eval_bundle")
    with pytest.raises(RuntimeError, match="--bundle=synthetic"):
        eb.download_eval_bundle(f"http://127.0.0.1:{port}/eval_bundle.zip", dest, retries=1, timeout=2)
    www = tmp_path / "www"
    os.makedirs(www)
    (www / "eval_bundle.zip").write_bytes(b"this is not a zip")
    server = serve(str(www), QuietHandler)
    try:
        with pytest.raises(RuntimeError, match="not a valid zip"):
            eb.download_eval_bundle(f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip", dest)
        assert not os.path.exists(dest)
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------------
# synthetic bundle


def fake_document(index, split="train", seed=0, target_chars=12000):
    """A SyntheticDoc-shaped document: one passkey fact and one city fact, each recalled later."""
    key, city = f"{(index * 7919) % 100000:05d}", ["Oslo", "Lima", "Kyoto", "Porto", "Riga"][index % 5]
    text = f"The passkey for vault {index} is {key}. Ada lives in {city}. Filler text here. "
    recalls = []
    for kind, value, fact in (("passkey", key, "The passkey"), ("attribute", city, "Ada lives")):
        prefix = f"Recall: {kind} {index} is "
        text += prefix
        recalls.append(SimpleNamespace(fact_start=text.index(fact), answer_start=len(text),
                                       answer_end=len(text) + len(value), kind=kind))
        text += value + ". "
    return SimpleNamespace(text=text, recalls=recalls)


def _rows(bundle, label):
    with open(os.path.join(bundle, f"{label}.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_synthetic_bundle_rows_are_well_formed(tmp_path):
    dest = eb.build_synthetic_bundle(str(tmp_path / "syn"), n_per_task=20, document_fn=fake_document)
    specs = {s.label: s for s in ce.load_bundle(dest)}
    assert set(specs) == {"synthetic_recall_mc", "synthetic_fact_schema", "synthetic_recall_lm"}
    assert specs["synthetic_recall_mc"].random_baseline == 0.25 and specs["synthetic_recall_lm"].random_baseline == 0.0
    for s in specs.values():
        ce.load_rows(s)  # validates every row
    lm, mc, sch = (_rows(dest, n) for n in ("synthetic_recall_lm", "synthetic_recall_mc", "synthetic_fact_schema"))
    assert len(lm) == 20 and len(mc) == 20 and len(sch) == 20
    for r_lm, r_mc, r_sch in zip(lm, mc, sch):
        ans = r_lm["continuation"]
        assert r_mc["choices"][r_mc["gold"]] == ans and len(set(r_mc["choices"])) == 4
        assert r_lm["context"].startswith(("The passkey", "Ada lives")) and r_lm["context"].endswith(" is ")
        opts = r_sch["context_options"]
        assert r_sch["continuation"] == ans and ans in opts[r_sch["gold"]] and len(set(opts)) == 4
        assert all(len(o) - len(c) == len(opts[r_sch["gold"]]) - len(ans) for o, c in zip(opts, r_mc["choices"]))
        if r_lm["kind"] == "passkey":  # digit distractors keep the length
            assert all(len(c) == 5 and c.isdigit() for c in r_mc["choices"])
    with open(os.path.join(dest, "core.json")) as f:
        first = f.read()
    eb.build_synthetic_bundle(dest, n_per_task=20, document_fn=fake_document)  # deterministic rebuild in place
    with open(os.path.join(dest, "core.json")) as f:
        assert f.read() == first
    assert _rows(dest, "synthetic_recall_mc") == mc


def test_synthetic_bundle_from_real_corpus_fits_context(tmp_path):
    pytest.importorskip("nanochat.synthetic")
    tok = CharTokenizer()
    dest = eb.build_synthetic_bundle(str(tmp_path / "syn"), n_per_task=30, tokenizer=tok, max_tokens=300, max_chars=600)
    for s in ce.load_bundle(dest):
        rows = ce.load_rows(s)
        assert rows
        for i in range(len(rows)):
            for ctx, cont in ce.render_example(s, rows, i):
                ids, _ = ce.encode_pair(tok, ctx, cont, None)
                assert len(ids) <= 300
    mc = _rows(dest, "synthetic_recall_mc")
    assert len(mc) == 30 and {r["kind"] for r in mc} >= {"passkey", "attribute"}
    with pytest.raises(ValueError, match="too short"):
        eb.build_synthetic_bundle(str(tmp_path / "tiny"), n_per_task=5, tokenizer=tok, max_tokens=8, max_docs=20)


# ------------------------------------------------------------------------------------------------
# a real (tiny, untrained) GPT


def test_tiny_gpt_batched_scoring_matches_single(tmp_path, monkeypatch):
    gpt = pytest.importorskip("nanochat.gpt")
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(sequence_len=256, vocab_size=257, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    model.eval()
    tok = CharTokenizer()
    seqs = [ce.encode_pair(tok, "The code is ", c, 64) for c in ("1", "12345", "abcdefghij")]
    batched, _ = ce.score_sequences(model, seqs, "cpu", pad_id=BOS)
    single = [ce.score_sequences(model, [s], "cpu")[0][0] for s in seqs]
    assert batched == pytest.approx(single, abs=1e-5)  # right padding changes nothing
    bundle = write_bundle(tmp_path / "b")
    out1 = ce.evaluate_core(model, tok, bundle, "cpu")
    out2 = ce.evaluate_core(model, tok, bundle, "cpu")
    assert out1 == out2 and all(0.0 <= a <= 1.0 for a in out1["results"].values())
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    out = ce.evaluate_core_bundle(model, tok, "cpu", bundle="synthetic", max_per_task=4)
    counts = out["counts"]
    assert counts["synthetic_recall_mc"] == counts["synthetic_recall_lm"] == 4 and counts["synthetic_fact_schema"] <= 4
    assert os.path.isfile(tmp_path / "base" / "eval_bundle_synthetic_ctx256_n4" / "core.json")


def _dist_worker(rank, world_size, port, bundle, texts, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    out = ce.evaluate_core(OracleModel(texts), CharTokenizer(), bundle, "cpu")
    results[rank] = (out["counts"], out["core_metric"])
    torch.distributed.destroy_process_group()


def test_examples_split_over_ranks(tmp_path):
    bundle = write_bundle(tmp_path / "b")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_dist_worker, args=(2, port, bundle, known_texts(bundle), results), nprocs=2, join=True)
    assert results[0] == results[1] == ({"mc": 8, "sch": 6, "lm": 6}, pytest.approx(1.0))


# ------------------------------------------------------------------------------------------------
# loss_eval.evaluate_bpb (lives here with the other evaluation tests)


class FixedLoss:
    """model(x, y, loss_reduction='none') -> per-token loss = target id / 10 (0 where ignored)."""

    def __call__(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return torch.where(y >= 0, y.float() / 10, torch.zeros_like(y, dtype=torch.float))


def test_evaluate_bpb_math():
    from nanochat.loss_eval import evaluate_bpb

    token_bytes = torch.tensor([0, 1, 2, 3, 4])  # token 0 is "special": no bytes, its loss is not counted
    y = torch.tensor([[1, 2, 0, -1], [4, 3, 3, 0]])
    batches = iter([(torch.zeros_like(y), y)] * 2)
    bpb = evaluate_bpb(FixedLoss(), batches, 2, token_bytes)
    nats = 2 * (0.1 + 0.2 + 0.4 + 0.3 + 0.3)  # tokens with bytes > 0, both batches
    total_bytes = 2 * (1 + 2 + 4 + 3 + 3)
    assert bpb == pytest.approx(nats / (math.log(2) * total_bytes))
    loader = SimpleNamespace(next_batch=lambda: (torch.zeros_like(y), y))  # DistributedTokenLoader-like
    assert evaluate_bpb(FixedLoss(), loader, 3, token_bytes) == pytest.approx(bpb)
    with pytest.raises(ValueError, match="no text bytes"):
        evaluate_bpb(FixedLoss(), iter([(y, torch.full_like(y, -1))]), 1, token_bytes)
