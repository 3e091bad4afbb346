"""
MCConfig: every MegaContext knob in one dataclass, validated once, with one clear error per problem.

Each knob is declared once, as a field made by knob(): its default, its command-line flag, its help and
its allowed values (choices, or a numeric range). Everything else is derived from those declarations:
the validation, the training flags (add_mc_flags), the override flags of inference, evaluation and the
benches (add_mc_flags(..., names=..., overrides=True): default None = the checkpoint's value), and FLAGS,
the table other modules and the docs tests read.

- MCConfig(...)                 dataclass; __post_init__ checks each knob on its own and raises a
                                ValueError naming the command-line flag (e.g. "--gistnet_pooling=max ...")
- cfg.validate_against(T)       checks that need the model's sequence length T (= --max_seq_len):
                                the working-context budget W fits in T, leaves room for the raw tail,
                                and can hold a fully compressed covering of a T-token history
- cfg.wc_length(T)              W in entries: train_wc_length is either an entry count (int >= 1) or a
                                fraction of T (float in (0, 1]); W = round(fraction * T)
- add_mc_flags(parser)          adds every knob's flag (plus --mc_enabled) to an argparse parser
- MCConfig.from_flags(args)     builds the config from the parsed namespace

Flag names: --mc_<field> for the tree, working context, losses and inference (--mc_infer_*), the field
name itself for the --gistnet_*, --lensnet_* and --allocator_* families and --positional_type; where a
flag differs from its field (recent_tokens <- --allocator_recent_tokens, tree <- --mc_tree) the knob says so.
Vocabulary: block_size B_s = tokens per LOD1 gist = LOD1 gists per LOD2 gist, so a LOD-l gist covers
B_s**l tokens (32, 1024 with the default). The working context (WC) holds at most W entries.
"""

import argparse
import sys
from dataclasses import dataclass, field, fields

from nanochat import cli_checks as ck
from nanochat.common import str2bool


def knob(default, flag: str, help: str, *, choices: tuple = (), lo=None, hi=None, lo_open: bool = False,
         hi_open: bool = False, why: str = ""):
    """One MC option, declared once: the default, the flag, the help, and the allowed values (choices, or a
    range [lo, hi] whose ends lo_open / hi_open exclude; `why` explains an excluded end in the error)."""
    return field(default=default, metadata=dict(flag=flag, help=help, choices=choices, lo=lo, hi=hi,
                                                lo_open=lo_open, hi_open=hi_open, why=why))


@dataclass
class MCConfig:
    # --- tree / GistNet
    block_size: int = knob(32, "--mc_block_size", "tokens per LOD1 gist (and LOD1 gists per LOD2 gist)", lo=2)
    max_lod: int = knob(2, "--mc_max_lod", "coarsest level of detail (2 = gists of block_size**2 tokens)", lo=1, hi=8)
    tree: str = knob("ram", "--mc_tree", "inference sessions: ram | disk (history ids, plan and gists in memory-mapped "
                     "files under $NANOCHAT_BASE_DIR/mc_tree; training always builds its trees in memory)",
                     choices=("ram", "disk"))
    cache_lod0: bool = knob(True, "--mc_cache_lod0", "keep token embeddings in the tree (0 = drop after gisting)")
    gistnet_type: str = knob("transformer", "--gistnet_type", "transformer | mean (parameter-free mean pooling)",
                             choices=("transformer", "mean"))
    gistnet_layers: int = knob(2, "--gistnet_layers", "transformer layers in GistNet", lo=1)
    gistnet_pooling: str = knob("mean", "--gistnet_pooling", "mean | query | cls", choices=("mean", "query", "cls"))
    gistnet_head: str = knob("mlp", "--gistnet_head", "mlp | linear", choices=("mlp", "linear"))
    # --- working context / variant sampling
    train_wc_length: int | float = knob(0.2, "--mc_train_wc_length",
                                        "WC budget W: entries, or a fraction of --max_seq_len")
    wc_anneal_start_frac: float = knob(0.8, "--mc_wc_anneal_start_frac", "W starts at this fraction of --max_seq_len",
                                       lo=0.0, hi=1.0, lo_open=True)
    wc_anneal_steps: int = knob(0, "--mc_wc_anneal_steps", "steps to anneal W to its target (0 = whole run)", lo=0)
    num_random_variants: int = knob(4, "--mc_num_random_variants", "compressed WC variants per sequence (plus the "
                                    "recency baseline)", lo=1)
    priority_variants: int = knob(0, "--mc_priority_variants", "of those variants, how many LensNet proposes (its scores "
                                  "of the coarsest covering weight the expansions, mc/train/variants.py); 0 = all "
                                  "random", lo=0)
    priority_temperature: float = knob(0.25, "--mc_priority_temperature", "LensNet-proposed variants: a unit's weight "
                                       "is exp(score / temperature)", lo=0.0, lo_open=True)
    dynamic_variants: bool = knob(False, "--mc_dynamic_variants", "variants per sample follow the measured ΔNLL "
                                  "spread: ceil(N x spread / its peak so far), N = --mc_num_random_variants the most "
                                  "(mc/train/variant_budget.py)")
    min_variants: int = knob(2, "--mc_min_variants", "the fewest variants per sample --mc_dynamic_variants or "
                             "--mc_positions_budget may leave (2 = one preference pair)", lo=2)
    positions_budget: float = knob(0.0, "--mc_positions_budget", "the step-time budget: at most (T + (1 + N) W) / T GPT "
                                   "positions per training token, fewer variants when W is wide (0 = none)", lo=0.0)
    recent_tokens: int = knob(128, "--allocator_recent_tokens", "last R tokens always stay raw (variants and "
                              "allocator): the shared horizon of ΔNLL", lo=1)
    positional_type: str = knob("gaussian", "--positional_type", "simple | gaussian (RoPE for gists, mc/positions.py)",
                                choices=("simple", "gaussian"))
    # --- losses
    gist_delta_weight: float = knob(0.0, "--mc_gist_delta_weight", "penalty weight on variants worse than the "
                                    "baseline", lo=0.0)
    lens_loss_weight: float = knob(0.1, "--mc_lens_loss_weight", "weight of LensNet's preference loss", lo=0.0)
    lens_temperature: float = knob(1.0, "--mc_lens_temperature", "Bradley-Terry temperature (lower = sharper)",
                                   lo=0.0, lo_open=True)
    lens_hard_negative_ratio: float = knob(1.0, "--mc_lens_hard_negative_ratio", "fraction of preference pairs kept, "
                                           "by |advantage|", lo=0.0, hi=1.0, lo_open=True)
    lens_adv_norm_beta: float = knob(0.99, "--mc_lens_adv_norm_beta", "EMA beta of the advantage normaliser",
                                     lo=0.0, hi=1.0, hi_open=True, why="an EMA coefficient of 1 never updates")
    lens_kl_weight: float = knob(0.0, "--mc_lens_kl_weight", "policy KL regulariser weight", lo=0.0)
    lens_budget_smooth_weight: float = knob(0.0, "--mc_lens_budget_smooth_weight", "budget smoothing weight", lo=0.0)
    lens_budget_smooth_beta: float = knob(0.9, "--mc_lens_budget_smooth_beta", "budget smoothing EMA beta",
                                          lo=0.0, hi=1.0, hi_open=True, why="an EMA coefficient of 1 never updates")
    lensnet_type: str = knob("transformer", "--lensnet_type", "transformer | none (no LensNet: fixed focus, the "
                             "MC-fixed ablation)", choices=("transformer", "none"))
    lensnet_layers: int = knob(2, "--lensnet_layers", "transformer layers in LensNet", lo=1)
    lensnet_head: str = knob("mlp", "--lensnet_head", "mlp | linear (LensNet's scoring head)", choices=("mlp", "linear"))
    lensnet_match: bool = knob(False, "--lensnet_match", "LensNet reads each span's content match with the recent "
                               "tokens (the GPT's layer-0 keys, mc/keymatch.py)")
    # --- focus allocator
    allocator_type: str = knob("greedy", "--allocator_type", "greedy | stochastic_greedy",
                               choices=("greedy", "stochastic_greedy"))
    allocator_sample_top_k: int = knob(4, "--allocator_sample_top_k", "stochastic_greedy: sample among the top k",
                                       lo=1)
    allocator_sample_temperature: float = knob(1.0, "--allocator_sample_temperature", "stochastic_greedy temperature",
                                               lo=0.0, lo_open=True)
    allocator_soft_max_length: int = knob(0, "--allocator_soft_max_length", "entries the allocator aims at (0 = W)",
                                          lo=0)
    allocator_expand_threshold: float = knob(0.1, "--allocator_expand_threshold", "expand an entry when its score "
                                             ">= this")
    allocator_collapse_threshold: float = knob(-0.1, "--allocator_collapse_threshold", "collapse a span when its "
                                               "score <= this")
    allocator_max_replacements: int = knob(8, "--allocator_max_replacements", "edits per allocator iteration", lo=1)
    allocator_iterations: int = knob(1, "--allocator_iterations", "allocator iterations per refocus", lo=1)
    # --- inference
    infer_refocus_interval: int = knob(64, "--mc_infer_refocus_interval", "inference: tokens between LensNet + "
                                       "allocator refocuses while decoding", lo=1)
    infer_focus: str = knob("lensnet", "--mc_infer_focus", "inference: lensnet | keymatch (the GPT's layer-0 keys "
                            "pick the blocks, mc/keymatch.py)", choices=("lensnet", "keymatch"))
    infer_max_lod: int = knob(5, "--mc_infer_max_lod", "inference: grow the tree up to this level for long histories "
                              "(each level holds block_size x more tokens; 0 = never grow)", lo=0, hi=8)
    # --- runtime
    aux_dtype: str = knob("auto", "--mc_aux_dtype", "auto | fp32 | bf16 for GistNet/LensNet (auto: bf16 on CUDA, "
                          "else fp32)", choices=("auto", "fp32", "bf16"))
    auto_batch: bool = knob(True, "--mc_auto_batch", "scale the micro-batch for the variants (tokens/step unchanged)")
    async_prepare: bool = knob(False, "--mc_async", "build the next micro-batch's variants, layout, targets and rotary "
                               "tables while the GPT runs this one (a worker thread; a side CUDA stream on GPU; the "
                               "same losses, mc/train/prepare.py)")

    def __post_init__(self):
        for f in fields(self):
            _check(self, f.name, getattr(self, f.name))
        if self.allocator_collapse_threshold >= self.allocator_expand_threshold:
            raise ValueError(f"--allocator_collapse_threshold={self.allocator_collapse_threshold} must be below "
                             f"--allocator_expand_threshold={self.allocator_expand_threshold} (the gap is the hysteresis)")
        if self.priority_variants > self.num_random_variants:
            raise ValueError(f"--mc_priority_variants={self.priority_variants} exceeds --mc_num_random_variants="
                             f"{self.num_random_variants}: the LensNet-proposed variants are some of those")
        if self.dynamic_variants and self.min_variants > self.num_random_variants:
            raise ValueError(f"--mc_min_variants={self.min_variants} exceeds --mc_num_random_variants="
                             f"{self.num_random_variants}, the most a sample gets with --mc_dynamic_variants=1")
        if self.dynamic_variants and self.lensnet_type == "none":
            raise ValueError("--mc_dynamic_variants spends variants on LensNet's preference pairs; --lensnet_type=none "
                             "has no LensNet: drop the flag")
        if 0 < self.positions_budget <= 1:
            raise ValueError(f"--mc_positions_budget={self.positions_budget:g} must exceed 1: the base forward alone "
                             f"runs T positions per T training tokens (0 = no budget)")
        if self.priority_variants and self.lensnet_type == "none":
            raise ValueError("--mc_priority_variants needs a LensNet to propose them (--lensnet_type=none has none)")

    # ------------------------------------------------------------------ derived quantities
    def wc_length(self, sequence_len: int) -> int:
        """W in entries for a model of this sequence length."""
        w = self.train_wc_length
        return w if isinstance(w, int) else max(1, round(w * sequence_len))

    def validate_against(self, sequence_len: int) -> int:
        """Checks that need --max_seq_len. Returns W (entries)."""
        from mc.tree import min_variant_entries  # local import: the tree module does not need the config

        T = int(sequence_len)
        W = self.wc_length(T)
        if W > T:
            raise ValueError(f"--mc_train_wc_length={self.train_wc_length} exceeds --max_seq_len={T}; "
                             f"the working context cannot be longer than the model's sequence")
        if self.block_size >= T:
            raise ValueError(f"--mc_block_size={self.block_size} must be smaller than --max_seq_len={T}")
        if self.recent_tokens >= W:
            raise ValueError(f"--allocator_recent_tokens={self.recent_tokens} must be below the working-context "
                             f"length W={W} (--mc_train_wc_length={self.train_wc_length}); compressed variants "
                             f"keep the last R tokens raw and need room for gists")
        if self.allocator_soft_max_length > T:
            raise ValueError(f"--allocator_soft_max_length={self.allocator_soft_max_length} exceeds --max_seq_len={T}")
        need = min_variant_entries(T, self.block_size, self.max_lod, self.recent_tokens)
        if need > W:
            raise ValueError(f"--mc_train_wc_length={self.train_wc_length} (W={W}) cannot hold even the most "
                             f"compressed covering of a {T}-token history ({need} entries with "
                             f"--allocator_recent_tokens={self.recent_tokens}, --mc_block_size={self.block_size}, "
                             f"--mc_max_lod={self.max_lod}); raise W or lower recent_tokens")
        return W

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> "MCConfig":
        """MCConfig from a namespace produced by a parser that went through add_mc_flags."""
        kwargs = {}
        for name, flag, _, _ in FLAGS:
            dest = flag.lstrip("-")
            if not hasattr(args, dest):
                raise ValueError(f"flag {flag} missing from the parsed arguments; call add_mc_flags(parser) first")
            kwargs[name] = getattr(args, dest)
        return cls(**kwargs)


# ------------------------------------------------------------------ per-knob validation
def _check(cfg, name, value):
    f = KNOBS[name]
    meta, kind = f.metadata, f.type
    bad = f"{meta['flag']}={value!r}"
    if meta["choices"]:
        if value not in meta["choices"]:
            raise ValueError(f"{bad} is not one of {', '.join(meta['choices'])}")
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{bad} must be a boolean (0/1)")
        return
    if name == "train_wc_length":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{bad} must be an entry count (int >= 1) or a fraction of --max_seq_len in (0, 1]")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{bad}: an entry count must be >= 1")
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(f"{bad}: a fractional length must lie in (0, 1]; give whole entries as an integer")
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{bad} must be an integer")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{bad} must be a number")
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and (value < lo or (value == lo and meta["lo_open"])):
        raise ValueError(f"{bad} must be {'>' if meta['lo_open'] else '>='} {lo}")
    if hi is not None and (value > hi or (value == hi and meta["hi_open"])):
        raise ValueError(f"{bad} must be {'<' if meta['hi_open'] else '<='} {hi}"
                         + (f" ({meta['why']})" if meta["why"] else ""))


# ------------------------------------------------------------------ command-line flags
def _wc_length_arg(text):
    """'2048' -> 2048 entries, '0.25' -> a quarter of --max_seq_len."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an entry count (e.g. 512) or a fraction (e.g. 0.25), got {text!r}") from None


def _parse_type(f):
    """The argparse type of a knob, from its annotation."""
    return {bool: str2bool, int: int, float: float, str: str}.get(f.type, _wc_length_arg)


KNOBS = {f.name: f for f in fields(MCConfig)}
# (field, flag, argparse type, help): the table the rest of the code and the docs tests read
FLAGS = [(f.name, f.metadata["flag"], _parse_type(f), f.metadata["help"]) for f in fields(MCConfig)]
FLAG_OF = {name: flag for name, flag, _, _ in FLAGS}


class _Renamed(argparse.Action):
    """An old spelling of a flag: still accepted for one release, with a warning naming the new one."""

    def __init__(self, option_strings, dest, new_flag="", **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.new_flag:
            print(f"warning: {option_string} is deprecated and will be removed in the next release; use "
                  f"{self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


# The working-context budgets of the stages that read a trained config. Not trained knobs (so not fields of
# MCConfig, whose fields a checkpoint records and resume compares), but declared here, once, for every
# command: --mc_{train,infer,eval}_wc_length is W at each stage.
STAGE_FLAGS = {
    "infer_wc_length": ("--mc_infer_wc_length", ck.positive_int, "inference: the working-context cap W in entries, "
                        "decoded tokens included (a chat's default: the trained W + one refocus interval; "
                        "scripts.mc_recall's: 3/4 of sequence_len)"),
    "eval_wc_length": ("--mc_eval_wc_length", ck.nonneg_int, "evaluation: W, the raw window every condition keeps and the unit of "
                       "the probe distances (0 = sequence_len / 4 in whole blocks)"),
}


def add_mc_flags(parser: argparse.ArgumentParser, names=None, overrides: bool = False, renamed=None,
                 title: str = "MegaContext") -> argparse.ArgumentParser:
    """Add MC flags to `parser`: every knob plus --mc_enabled (training, the benches), or only `names` (knobs,
    or STAGE_FLAGS' names). overrides=True: default None, "the checkpoint's value" (inference and evaluation
    read a trained config and override some of it). renamed: {name: old spellings still accepted for one
    release, with a warning}."""
    group = parser.add_argument_group(title)
    if names is None:
        group.add_argument("--mc_enabled", type=str2bool, default=False, help="train/run with MegaContext (0 = vanilla)")
    unknown = set(names or ()) - set(KNOBS) - set(STAGE_FLAGS)
    if unknown:
        raise ValueError(f"not MC knobs: {sorted(unknown)}")
    rows = [(n, *STAGE_FLAGS[n]) for n in names or () if n in STAGE_FLAGS]
    rows += [(n, flag, typ, help_text) for n, flag, typ, help_text in FLAGS if names is None or n in names]
    for name, flag, typ, help_text in rows:
        if name in STAGE_FLAGS:
            kwargs = dict(type=typ, default=None, help=help_text)
        else:
            kwargs = dict(type=typ, default=None if overrides else KNOBS[name].default,
                          help=help_text + (" (default: the checkpoint's)" if overrides else ""))
            if KNOBS[name].metadata["choices"]:
                kwargs["choices"] = KNOBS[name].metadata["choices"]
        old = (renamed or {}).get(name, ())
        if old:
            kwargs.update(action=_Renamed, new_flag=flag)
        group.add_argument(flag, *old, dest=flag.lstrip("-"), **kwargs)
    return parser


# What a chat session may override at start-up (chat_cli, chat_web): its W cap, three inference knobs, the tree.
SESSION_FLAGS = ("infer_wc_length", "infer_refocus_interval", "infer_focus", "infer_max_lod", "tree")


def add_session_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return add_mc_flags(parser, names=SESSION_FLAGS, overrides=True, title="MegaContext session (with --mc)")


def session_overrides(args: argparse.Namespace) -> dict:
    """MCEngine / MCSession keyword arguments from add_session_flags' flags (None = the checkpoint's)."""
    return {"W": args.mc_infer_wc_length, "refocus_interval": args.mc_infer_refocus_interval,
            "focus": args.mc_infer_focus, "max_lod": args.mc_infer_max_lod, "tree": args.mc_tree}


def given_session_flags(args: argparse.Namespace) -> list[str]:
    """The session flags that were given (they only mean something with --mc)."""
    flags = {**{n: f for n, (f, _, _) in STAGE_FLAGS.items()}, **FLAG_OF}
    return [flags[n] for n in SESSION_FLAGS if getattr(args, flags[n].lstrip("-"), None) is not None]


def overridden_flags(args: argparse.Namespace, names=None) -> list[str]:
    """`--flag=value` strings for MC knobs (optionally only `names`) whose parsed value is not the default."""
    defaults = MCConfig()
    out = []
    for name, flag, _, _ in FLAGS:
        if names is not None and name not in names:
            continue
        value = getattr(args, flag.lstrip("-"), getattr(defaults, name))
        if value != getattr(defaults, name):
            out.append(f"{flag}={value}")
    return out
