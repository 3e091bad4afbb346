"""
Decode cost against history length: the MegaContext session vs full attention vs a plain W-token window.

    python -m scripts.mc_bench                                   # tiny random model, CPU, ~1-3 minutes
    python -m scripts.mc_bench --histories=1024,4096 --decode_tokens=128 --out=bench.json
    python -m scripts.mc_bench --source=base --model_tag=d12     # a trained MC checkpoint (its MC config)

For each history length H (random token ids; the cost does not depend on the content), three decoders
are set up and then generate --decode_tokens greedy tokens each:
- mc:     mc.infer.session.MCSession: the H tokens are ingested (tree + hard fit + refocus), then decoding
          with refocus every --mc_infer_refocus_interval tokens; the re-prefill after each refocus is
          part of the measured decode time. KV cache <= W entries at any H (W: the session's cap).
- full:   every history token raw in one KV cache (chunked prefill of H tokens, positions computed
          directly so H may pass the GPT's rotary table). Cost per token grows with H; skipped (with
          the reason printed) when H > --max_full_tokens (the prefill is O(H^2)) or memory runs out.
- window: the last W - interval tokens, exact attention over a sliding window: the cache grows from
          W - interval to W - 1 tokens, then the last W - interval tokens are re-prefilled from scratch
          (no rolling cache, whose deeper-layer keys would still encode the dropped tokens). Same KV
          bound as mc, which also refocuses to W - interval entries.
Timing: every decoder of every history is set up and warmed up (`interval` tokens) first; then --rounds
rounds each run decode_tokens / rounds tokens (by default one refocus interval, so every MC round holds
one refocus and its re-prefill) on every decoder in turn, so all of them see the same machine load.
Reported per decoder: decode_ms (wall) and cpu_ms (process CPU time, CPU only: on a shared machine the
wall clock includes waiting for cores) per generated token, the median over rounds (robust to load
spikes; the means are in the JSON); re-prefilled entries per generated token; the largest KV cache;
state_bytes (exact: KV cache, plus for mc the tree, token ids, plan and hysteresis state, in RAM or, with
--mc_tree disk, in memory-mapped files: mapped_bytes); the peak memory of set-up + warm-up: CUDA
torch.cuda.max_memory_allocated above the start; CPU the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs before each decoder) above its RSS at the start, coarse (allocator caching) and 0 when
the decoder stayed below the reset point; and resident_bytes, what set-up + warm-up left resident (CPU: VmRSS
after minus before, file pages included, each read after glibc's malloc_trim so the allocator's cache of
freed temporaries is not counted; CUDA: memory_allocated), per history token for mc
and the summary's resident growth per history token between the shortest and the longest history (the
fixed part, model and KV cache, cancels): the tree in RAM against --mc_tree disk, whose pages each refocus
releases.

For mc also the mean wall time of one refocus (LensNet + allocator + entry list; amortised over the
interval, already inside decode_ms): LensNet, the allocator (on the entry list, mc/entry_allocator.py) and
the KV work are O(W); only the edited spans of the per-token plan are written.

A random model (no --model_tag/--source) is --depth blocks of --width channels, --head_dim heads, a
--vocab_size head and --max_seq_len context, with GistNet and LensNet built from the --mc_*/--allocator_*
flags (bench defaults: training W = 0.75 x 512 = 384 entries, so the session's cap W = 384 + 64 = 448,
64 recent tokens raw, refocus every 64 tokens).
Its LensNet is fresh by default: it runs at every refocus (its cost is measured) but scores 0, so only
the hard fit edits, which keeps the WC full (~W entries: the largest KV cache, the worst case for
attention). --random_lensnet=1 gives it random output weights instead (real expands and collapses).
--out writes every number as JSON, and a figure next to it (same name, .png): decode ms per token and the
decoder's state bytes (KV cache, plus the tree for mc) against the history length, one line per decoder.
"""

import argparse
import ctypes
import dataclasses
import json
import os
import resource
import statistics
import time

import torch

from mc.config import MCConfig, add_mc_flags
from mc.infer.checkpoint import load_model
from mc.infer.session import MCSession
from mc.modules import MCModules, attach
from mc.positions import rope_cos_sin
from nanochat import cli_checks as ck
from nanochat.checkpoint_manager import CheckpointError
from nanochat.common import autocast_ctx, compute_init, die, str2bool, synchronize
from nanochat.gpt import GPT, GPTConfig
from nanochat.kv_cache import KVCache


def build_parser():
    p = argparse.ArgumentParser(description="MC session vs full vs window decode cost.", allow_abbrev=False)
    a = p.add_argument
    a("--device_type", default="", help="cuda|cpu|mps (empty = autodetect)")
    a("--seed", type=int, default=42)
    a("--source", default="", help="load a checkpoint of this stage (base|mid|sft|rl) instead of a random model")
    a("--model_tag", type=ck.model_tag, default=None,
      help="checkpoint model tag (implies --source=base when --source is empty)")
    a("--step", type=ck.nonneg_int, default=None)
    a("--depth", type=ck.positive_int, default=2)
    a("--width", type=ck.positive_int, default=128, help="n_embd of the random model")
    a("--head_dim", type=ck.positive_int, default=64)
    a("--max_seq_len", type=ck.positive_int, default=512)
    a("--vocab_size", type=ck.positive_int, default=8192)
    a("--histories", default="1024,4096,16384,65536", help="comma-separated history lengths in tokens")
    a("--decode_tokens", type=ck.positive_int, default=512, help="timed tokens per decoder and history")
    a("--rounds", type=ck.positive_int, default=8,
      help="interleaved timing rounds (default: one refocus interval each)")
    a("--max_full_tokens", type=ck.nonneg_int, default=16384, help="skip full attention above this history")
    a("--random_lensnet", type=str2bool, default=False,
  help="random-model LensNet with random output weights (default: fresh, scores 0: forced collapses only)")
    a("--threads", type=ck.nonneg_int, default=1, help="torch CPU threads (0 = torch's default); 1 suits tiny models")
    a("--out", default="", help="write the numbers as JSON here")
    add_mc_flags(p)
    add_mc_flags(p, names=("infer_wc_length",), title="MegaContext session")  # W (default: the session's)
    # a random model's MC defaults: room for 64K-token histories in a 512-token context
    p.set_defaults(mc_train_wc_length=0.75, allocator_recent_tokens=64, gistnet_layers=1)
    return p


# ----------------------------------------------------------------------------- models
def random_model(args, device):
    if args.width % args.head_dim:
        die(f"--width={args.width} must be a multiple of --head_dim={args.head_dim}")
    heads = args.width // args.head_dim
    cfg = GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=heads,
                    n_kv_head=heads, n_embd=args.width)
    try:
        mc_cfg = MCConfig.from_flags(args)
    except ValueError as e:
        die(str(e))
    with torch.device(device):
        model = GPT(cfg)
        model.init_weights()
        modules = MCModules.from_config(mc_cfg, cfg.n_embd)
    with torch.no_grad():  # every block path non-zero: attention over the cache is real work
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
        if modules.lensnet is not None and args.random_lensnet:
            for name, p in modules.lensnet.named_parameters():
                if name.endswith(("c_proj.weight", "c_mlp.weight")):
                    torch.nn.init.normal_(p, std=0.02)
                elif name.endswith("head_out.weight"):
                    torch.nn.init.normal_(p, std=0.3)
    attach(model, modules, mc_cfg)
    return model.eval(), modules.eval(), mc_cfg


def load(args, device):
    try:
        model, _, _ = load_model(args.source or "base", device, "eval", model_tag=args.model_tag, step=args.step)
    except (CheckpointError, ValueError, RuntimeError) as e:
        die(str(e))
    if model.mc_modules is None:
        die("this checkpoint has no MegaContext modules; train one with --mc_enabled=1 or drop --source/--model_tag")
    return model, model.mc_modules, model.mc_config


# ----------------------------------------------------------------------------- memory
def _rss_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap():
    """Return the C heap's free pages to the system (glibc malloc_trim), so an RSS reading counts live memory,
    not what a long ingest's temporaries left cached in the allocator. A no-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the start of a `with` block (module docstring says how, per device)."""

    def __init__(self, device_type):
        self.device_type, self.method = device_type, None

    def __enter__(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start, self.method = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
            return self
        _trim_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start, self.method = _rss_kib("VmRSS") * 1024, "VmHWM after clear_refs (peak RSS)"
        except (OSError, TypeError):
            self.start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss delta (process-lifetime peak)"
        return self

    def __exit__(self, *exc):
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
            self.resident = torch.cuda.memory_allocated() - self.start
        elif self.method.startswith("VmHWM"):
            self.peak = max(_rss_kib("VmHWM") * 1024 - self.start, 0)
            _trim_heap()
            self.resident = _rss_kib("VmRSS") * 1024 - self.start
        else:
            self.peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start, 0)
            self.resident = None  # no current-RSS reading on this system


def kv_bytes(kv):
    return 0 if kv.k is None else 2 * kv.k.numel() * kv.k.element_size()


# ----------------------------------------------------------------------------- decoders
class MCDecoder:
    name = "mc"

    def __init__(self, model, modules, cfg, W, history):
        self.s = MCSession(model, modules, cfg, W=W, seed=0)
        self.s.ingest(history)
        self.s.refocus()
        self.s.next_logits()
        self.W = self.s.W

    def step(self):
        self.s.append_token(int(self.s.next_logits().argmax()))

    def counters(self):
        st = self.s.stats()
        return st["reprefill_entries"], st["max_kv_entries"]

    def refocus_totals(self):
        return self.s.totals["refocuses"], self.s.totals["refocus_ms"]

    def state_bytes(self):
        m = self.s.memory_bytes()
        return sum(m.values())


class RawDecoder:
    """Raw tokens in a KV cache, positions = absolute history positions (rotary computed directly).
    window=None: full attention over everything; else the re-prefilled sliding window (module docstring)."""

    def __init__(self, model, history, window=None, interval=None, chunk=1024):
        self.model, self.window, self.interval, self.chunk = model, window, interval, chunk
        c = model.config
        self.hd, self.dev = c.n_embd // c.n_head, model.get_device()
        self.ids = list(history)
        # the window holds W..W+interval-1 tokens, re-prefilled every interval tokens (like mc's KV bound)
        self.cap = len(history) + 1 if window is None else window + interval - 1
        self.kv = KVCache(1, c.n_kv_head, min(self.cap, 1 << 20), self.hd, c.n_layer, device=self.dev)
        self.name, self.reprefill, self.max_kv = ("full" if window is None else "window"), 0, 0
        start = 0 if window is None else max(len(history) - window, 0)
        self.logits = self._prefill(start)

    def _forward(self, ids, first_pos, last_only=True):
        pos = torch.arange(first_pos, first_pos + len(ids), device=self.dev)
        cos, sin = rope_cos_sin(pos[None], self.hd, rope_fraction=self.model.config.rope_fraction)
        x = torch.tensor([ids], dtype=torch.long, device=self.dev)
        out = self.model(x, kv_cache=self.kv, cos_sin_override=(cos, sin), last_only=last_only)[0, -1]
        self.max_kv = max(self.max_kv, self.kv.get_pos())
        return out

    def _prefill(self, start):
        """Feed ids[start:] into the (reset) cache, in chunks; returns the last logits."""
        self.kv.reset()
        self.start = start
        for a in range(start, len(self.ids), self.chunk):
            logits = self._forward(self.ids[a: a + self.chunk], a)
        return logits

    def step(self):
        tok = int(self.logits.argmax())
        self.ids.append(tok)
        if self.window is not None and self.kv.get_pos() + 1 > self.cap:  # slid past: re-prefill the last W
            self.logits = self._prefill(len(self.ids) - self.window)
            self.reprefill += self.window - 1  # the new token would have been fed anyway
        else:
            self.logits = self._forward([tok], len(self.ids) - 1)

    def counters(self):
        return self.reprefill, self.max_kv

    def state_bytes(self):
        return kv_bytes(self.kv)


# ----------------------------------------------------------------------------- the benchmark
def timed(dec, n, device_type):
    synchronize(device_type)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        dec.step()
    synchronize(device_type)
    return time.perf_counter() - w0, time.process_time() - c0


def setup_history(H, model, modules, cfg, args, device, log):
    """The three decoders for one history length, set up and warmed up -> ({mode: decoder}, {mode: row})."""
    g = torch.Generator().manual_seed(args.seed + H)
    history = torch.randint(0, model.config.vocab_size, (H,), generator=g).tolist()
    W = MCSession(model, modules, cfg, W=args.mc_infer_wc_length).W  # the session's W, for the window too
    interval = cfg.infer_refocus_interval
    makers = {"mc": lambda: MCDecoder(model, modules, cfg, args.mc_infer_wc_length, history),
              "full": lambda: RawDecoder(model, history),
              "window": lambda: RawDecoder(model, history, window=W - interval, interval=interval)}
    decoders, rows = {}, {}
    for name, make in makers.items():
        row = {"history": H, "mode": name, "W": W, "refocus_interval": interval, "skipped": None}
        rows[name] = row
        if name == "full" and H > args.max_full_tokens:
            row["skipped"] = f"history {H} > --max_full_tokens={args.max_full_tokens} (full prefill is O(H^2))"
            log(f"  full @ {H}: skipped, {row['skipped']}")
            continue
        try:
            t0 = time.perf_counter()
            with PeakMemory(device.type) as mem:
                dec = make()
                setup_s = time.perf_counter() - t0
                timed(dec, interval, device.type)  # warm-up: one refocus period
            row.update(setup_s=setup_s, peak_mem_bytes=mem.peak, memory_method=mem.method,
                       resident_bytes=mem.resident)
            decoders[name] = dec
        except torch.cuda.OutOfMemoryError as e:
            row["skipped"] = f"out of memory ({e})"
            log(f"  {name} @ {H}: skipped, out of memory")
    return decoders, rows


@torch.inference_mode()
def run(histories, model, modules, cfg, args, device, log):
    """Set up every (history, decoder), then time them in interleaved rounds: each round runs decode_tokens /
    rounds tokens on every decoder of every history, so a change in machine load hits all of them alike."""
    setups = []
    for H in histories:
        log(f"history {H} ...")
        setups.append(setup_history(H, model, modules, cfg, args, device, log))
    live = [(rows[name], dec) for decs, rows in setups for name, dec in decs.items()]
    base = {id(d): (d.counters()[0], d.refocus_totals() if d.name == "mc" else None) for _, d in live}
    wall, cpu = {id(d): [] for _, d in live}, {id(d): [] for _, d in live}
    per_round = max(args.decode_tokens // args.rounds, 1)
    log(f"timing: {args.rounds} rounds x {per_round} tokens x {len(live)} decoders")
    for _ in range(args.rounds):
        for _, dec in live:
            w, c = timed(dec, per_round, device.type)
            wall[id(dec)].append(1000 * w / per_round)
            cpu[id(dec)].append(1000 * c / per_round)
    n, on_cpu = per_round * args.rounds, device.type == "cpu"
    for row, dec in live:
        reprefill, max_kv = dec.counters()
        row.update(decode_ms=statistics.median(wall[id(dec)]), decode_ms_mean=statistics.mean(wall[id(dec)]),
                   cpu_ms=statistics.median(cpu[id(dec)]) if on_cpu else None,
                   cpu_ms_mean=statistics.mean(cpu[id(dec)]) if on_cpu else None,
                   reprefill_per_token=(reprefill - base[id(dec)][0]) / n, max_kv_entries=max_kv,
                   state_bytes=dec.state_bytes(), decode_tokens=n)
        if dec.name == "mc":
            st = dec.s.stats()
            k, ms = (a - b for a, b in zip(dec.refocus_totals(), base[id(dec)][1]))
            row.update(refocus_ms=ms / max(k, 1), timed_refocuses=k,
                       tree_bytes=st["tree_bytes"], bytes_per_token=st["bytes_per_token"],
                       mapped_bytes=dec.s.memory_bytes()["mapped"],
                       refocuses=st["refocuses"], mean_swap_rate=st["mean_swap_rate"],
                       lod_histogram=st["lod_histogram"], expands=st["expands"],
                       collapses=st["collapses"], forced=st["forced"])
    return [row for _, rows in setups for row in rows.values()]


def fmt_table(rows) -> str:
    head = f"{'history':>8} {'mode':>6} {'ms/tok':>8} {'cpu ms':>8} {'vs win':>7} {'reprefill':>9} {'max KV':>7} " \
           f"{'state MiB':>9} {'peak MiB':>8} {'res MiB':>8} {'refocus ms':>10}"
    lines = [head, "-" * len(head)]
    win = {r["history"]: r.get("decode_ms") for r in rows if r["mode"] == "window"}
    for r in rows:
        if r["skipped"]:
            lines.append(f"{r['history']:>8} {r['mode']:>6}  skipped: {r['skipped']}")
            continue
        ratio = r["decode_ms"] / win[r["history"]] if win.get(r["history"]) else float("nan")
        cpu = f"{r['cpu_ms']:8.3f}" if r["cpu_ms"] is not None else f"{'-':>8}"
        lines.append(f"{r['history']:>8} {r['mode']:>6} {r['decode_ms']:8.3f} {cpu} {ratio:7.2f} "
                     f"{r['reprefill_per_token']:9.2f} {r['max_kv_entries']:7d} {r['state_bytes'] / 2**20:9.2f} "
                     f"{r['peak_mem_bytes'] / 2**20:8.1f} " +
                     (f"{r['resident_bytes'] / 2**20:8.1f} " if r.get("resident_bytes") is not None else f"{'':8} ") +
                     (f"{r['refocus_ms']:10.1f}" if "refocus_ms" in r else ""))
    return "\n".join(lines)


def flatness(rows) -> dict:
    """MC decode ms/token: spread over histories (max/min - 1) and its worst ratio to the window decoder; MC's
    resident memory growth per history token (shortest to longest history)."""
    mc = {r["history"]: r["decode_ms"] for r in rows if r["mode"] == "mc" and not r["skipped"]}
    win = {r["history"]: r["decode_ms"] for r in rows if r["mode"] == "window" and not r["skipped"]}
    if not mc:
        return {}
    out = {"mc_spread": max(mc.values()) / min(mc.values()) - 1,
           "mc_vs_window_max": max(mc[h] / win[h] for h in mc if h in win) if win else None}
    res = sorted((r["history"], r["resident_bytes"]) for r in rows
                 if r["mode"] == "mc" and not r["skipped"] and r.get("resident_bytes") is not None)
    if len(res) > 1 and res[-1][0] > res[0][0]:
        out["mc_resident_bytes_per_token"] = (res[-1][1] - res[0][1]) / (res[-1][0] - res[0][0])
    cpu = [r["cpu_ms"] for r in rows if r["mode"] == "mc" and not r["skipped"] and r["cpu_ms"] is not None]
    if cpu:
        out["mc_cpu_spread"] = max(cpu) / min(cpu) - 1
        wcpu = {r["history"]: r["cpu_ms"] for r in rows if r["mode"] == "window" and r["cpu_ms"]}
        out["mc_vs_window_cpu_max"] = max(r["cpu_ms"] / wcpu[r["history"]] for r in rows
                                          if r["mode"] == "mc" and r["cpu_ms"] and r["history"] in wcpu)
    return out


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        histories = [int(h) for h in args.histories.split(",") if h.strip()]
    except ValueError:
        die(f"--histories must be comma-separated integers, got {args.histories!r}")
    if not histories or min(histories) < 1:
        die(f"--histories needs at least one positive length, got {args.histories!r}")
    if args.decode_tokens < 1 or args.rounds < 1:
        die("--decode_tokens and --rounds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, _, _, device = compute_init(args.device_type, seed=args.seed)
    model, modules, cfg = load(args, device) if (args.source or args.model_tag) else random_model(args, device)
    if (args.source or args.model_tag) and args.mc_infer_refocus_interval != MCConfig().infer_refocus_interval:
        # the one MC knob a checkpoint's config lets the bench override
        cfg = dataclasses.replace(cfg, infer_refocus_interval=args.mc_infer_refocus_interval)
    c = model.config
    print(f"model: {c.n_layer} layers, width {c.n_embd}, vocab {c.vocab_size}, sequence_len {c.sequence_len}; "
          f"MC: block {cfg.block_size}, max_lod {cfg.max_lod}, recent {cfg.recent_tokens}, lensnet {cfg.lensnet_type}, "
          f"refocus every {cfg.infer_refocus_interval}; device {device}, {torch.get_num_threads()} threads", flush=True)
    try:
        with autocast_ctx(device.type):  # bf16 on CUDA, as the chat front ends run
            rows = run(histories, model, modules, cfg, args, device, lambda m: print(m, flush=True))
    except ValueError as e:  # HistoryTooLongError, a bad W: say which and stop
        die(str(e))
    print(fmt_table(rows))
    summary = flatness(rows)
    if summary:
        print("MC decode ms/token spread over histories: {:+.1%}; worst MC / window ratio: {:.2f}".format(
            summary["mc_spread"], summary["mc_vs_window_max"] or float("nan")))
        if "mc_cpu_spread" in summary:
            print("  (process CPU time: spread {:+.1%}, worst MC / window {:.2f})".format(
                summary["mc_cpu_spread"], summary["mc_vs_window_cpu_max"]))
        if "mc_resident_bytes_per_token" in summary:
            print(f"MC resident memory growth: {summary['mc_resident_bytes_per_token']:.1f} bytes per history token "
                  f"(--mc_tree {cfg.tree})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": str(device), "threads": torch.get_num_threads(),
                       "model": {"n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
                                 "sequence_len": c.sequence_len},
                       "mc_config": dataclasses.asdict(cfg), "summary": summary, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")
        try:
            print(f"wrote {plot_rows(rows, os.path.splitext(args.out)[0] + '.png')}")
        except ImportError as e:  # matplotlib is a dependency; a broken install should not lose the numbers
            print(f"figure skipped: matplotlib is not importable ({e}); re-run ./mc_setup")
    return rows


def plot_rows(rows: list, path: str) -> str:
    """The figure of --out (module docstring): two panels, log-log, one line per decoder."""
    # matplotlib is slow to import and only needed for the --plot figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("mc", "full", "window"):
        pts = sorted((r["history"], r["decode_ms"], r["state_bytes"]) for r in rows
                     if r["mode"] == mode and not r.get("skipped"))
        if not pts:
            continue
        h, ms, mem = zip(*pts)
        axes[0].plot(h, ms, "o-", label=mode)
        axes[1].plot(h, [m / 2 ** 20 for m in mem], "o-", label=mode)
    for ax, ylabel in zip(axes, ("decode ms per token (median over rounds)", "decoder state (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("history length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
