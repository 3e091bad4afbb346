"""
Kill -9 a process that writes a saved MC conversation (mc/infer/store.py) at random moments, and reopen it.

    python dev/session_kills.py --kills 25          # the lab notebook's run (~1 minute on 2 cores)

A writer process builds a tiny random MC model (seeded, so every process has the same one), opens the
session (or creates it), and loops: ingest 37 tokens (token t of the history is t % 251, whatever the kills),
refocus, commit, print the committed length. The parent kills it with SIGKILL after a random delay (0-0.5 s
past its first commit), reads every length the writer printed before dying (its acknowledged commits),
reopens the session and checks that (1) the history holds at least the last acknowledged length (nothing
committed is lost) and (2) it is exactly t % 251 for every t (whole, in order, nothing half-written).
Exit 1 on any violation; tests/test_mc_store.py runs a few kills.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT = {"tiny": "session_kills"}

WRITER = """
import sys
sys.path.insert(0, {repo!r})
from dev.session_kills import tiny_model
from mc.infer.session import MCSession
from mc.infer.store import SessionStore
model = tiny_model()
store = SessionStore({root!r})
if store.ids():
    s = store.open("s", model, {checkpoint!r})
else:
    s = MCSession(model)
    store.create(s, {checkpoint!r}, session_id="s")
while True:
    n = s.num_tokens
    s.ingest([(n + i) % 251 for i in range(37)])
    s.refocus()
    store.commit(s)
    print(s.num_tokens, flush=True)
"""


def tiny_model():
    """A 2-layer random GPT with GistNet and LensNet, the same in every process (seeded)."""
    import torch

    from mc.config import MCConfig
    from mc.modules import MCModules, attach
    from nanochat.gpt import GPT, GPTConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    cfg = MCConfig(block_size=8, max_lod=2, recent_tokens=8, train_wc_length=40, infer_refocus_interval=16,
                   gistnet_layers=1, lensnet_layers=1)
    modules = MCModules.from_config(cfg, 32)
    attach(model, modules, cfg)
    return model.eval()


def kill_and_reopen(root: str, kills: int, seed: int = 0, max_delay: float = 0.5) -> list[dict]:
    """Run the writer, SIGKILL it at a random moment, reopen and check, `kills` times; one row per kill.
    Raises AssertionError on a lost commit or a damaged history."""
    from mc.infer.store import SessionStore

    rnd, rows = random.Random(seed), []
    model = tiny_model()
    code = WRITER.format(repo=REPO, root=root, checkpoint=CHECKPOINT)
    for k in range(kills):
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
        first = p.stdout.readline()  # its first commit of this run, then a random moment
        if not first.strip():
            raise AssertionError(f"kill {k}: the writer died before its first commit (rc {p.wait()})")
        delay = rnd.uniform(0.0, max_delay)
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        acked = int(first)
        for line in p.stdout:  # commits acknowledged before the kill landed
            acked = int(line)
        p.wait()
        ids = SessionStore(root).open("s", model, CHECKPOINT).token_ids().tolist()
        assert len(ids) >= acked, f"kill {k}: {len(ids)} tokens reopened, {acked} acknowledged: a commit was lost"
        assert ids == [t % 251 for t in range(len(ids))], f"kill {k}: the reopened history is damaged"
        rows.append({"kill": k, "delay_s": round(delay, 3), "acknowledged": acked, "reopened": len(ids)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--kills", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        try:
            rows = kill_and_reopen(root, args.kills, args.seed)
        except AssertionError as e:
            print(f"session_kills: FAILED: {e}")
            return 1
    for r in rows:
        print(f"kill {r['kill']:2d} after {r['delay_s']:.3f} s: {r['acknowledged']} tokens acknowledged, "
              f"{r['reopened']} reopened")
    lost = sum(r["reopened"] < r["acknowledged"] for r in rows)
    print(f"session_kills: {len(rows)} kills, {lost} lost commits, 0 damaged histories; final history "
          f"{rows[-1]['reopened']} tokens")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())
