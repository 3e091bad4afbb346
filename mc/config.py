"""
MCConfig: every MegaContext knob in one dataclass, validated once, with one clear error per problem.

- MCConfig(...)                 dataclass; __post_init__ checks each knob on its own and raises a
                                ValueError naming the command-line flag (e.g. "--gistnet_pooling=max ...")
- cfg.validate_against(T)       checks that need the model's sequence length T (= --max_seq_len):
                                the working-context budget W fits in T, leaves room for the raw tail,
                                and can hold a fully compressed covering of a T-token history
- cfg.wc_length(T)              W in entries: train_wc_length is either an entry count (int >= 1) or a
                                fraction of T (float in (0, 1]); W = round(fraction * T)
- add_mc_flags(parser)          adds every --mc_*, --allocator_*, --gistnet_*, --lensnet_* and
                                --positional_type flag (plus --mc_enabled) to an argparse parser
- MCConfig.from_flags(args)     builds the config from the parsed namespace

Flag names are the field names with a prefix (see FLAGS below); where a flag name differs from the
field (recent_tokens <- --allocator_recent_tokens, tree <- --mc_tree) the table says so.
Vocabulary: block_size B_s = tokens per LOD1 gist = LOD1 gists per LOD2 gist, so a LOD-l gist covers
B_s**l tokens (32, 1024 with the default). The working context (WC) holds at most W entries.
"""

import argparse
from dataclasses import dataclass, fields

from nanochat.common import str2bool


@dataclass
class MCConfig:
    # --- tree / GistNet
    block_size: int = 32  # tokens per LOD1 gist, and LOD1 gists per LOD2 gist
    max_lod: int = 2  # coarsest level of detail (LOD2 = one gist per block_size**2 tokens)
    tree: str = "ram"  # only the in-memory tree exists
    cache_lod0: bool = True  # keep LOD0 (token embeddings) in the tree after building the gists
    gistnet_type: str = "transformer"  # transformer | mean (mean = parameter-free MEANPOOL baseline)
    gistnet_layers: int = 2
    gistnet_pooling: str = "mean"  # mean | query | cls
    gistnet_head: str = "mlp"  # mlp | linear
    # --- working context / variant sampling
    train_wc_length: int | float = 0.2  # W: entries (int) or fraction of max_seq_len (float in (0, 1])
    wc_anneal_start_frac: float = 0.8  # W starts at this fraction of max_seq_len and anneals down to W
    wc_anneal_steps: int = 0  # steps of the anneal (0 = the whole run)
    num_random_variants: int = 4  # N compressed variants per sequence (plus the recency baseline)
    recent_tokens: int = 128  # R >= 1: last R tokens always raw (variants and allocator): the shared horizon of ΔNLL
    positional_type: str = "gaussian"  # simple | gaussian (RoPE of gists, see mc/positions.py)
    # --- losses
    gist_delta_weight: float = 0.0  # penalty on variants whose ΔNLL exceeds the recency baseline
    lens_loss_weight: float = 0.1
    lens_temperature: float = 1.0  # Bradley-Terry temperature (lower = sharper)
    lens_hard_negative_ratio: float = 1.0  # fraction of preference pairs kept, by |advantage|
    lens_adv_norm_beta: float = 0.99  # EMA of the advantage scale
    lens_kl_weight: float = 0.0  # policy KL regulariser
    lens_budget_smooth_weight: float = 0.0
    lens_budget_smooth_beta: float = 0.9
    lensnet_type: str = "transformer"  # transformer | none (none = no LensNet: fixed focus, the MC-fixed ablation)
    lensnet_layers: int = 2
    lensnet_head: str = "mlp"  # mlp | linear
    lensnet_match: bool = False  # LensNet also reads each span's keymatch score against the recent tail
    # --- focus allocator
    allocator_type: str = "greedy"  # greedy | stochastic_greedy
    allocator_sample_top_k: int = 4
    allocator_sample_temperature: float = 1.0
    allocator_soft_max_length: int = 0  # the allocator aims at this many entries (0 = W)
    allocator_expand_threshold: float = 0.1  # expand an entry when its score >= this
    allocator_collapse_threshold: float = -0.1  # collapse a span when its score <= this
    allocator_max_replacements: int = 8  # edits per allocator iteration
    allocator_iterations: int = 1
    # --- inference
    infer_refocus_interval: int = 64  # tokens between LensNet + allocator refocuses while decoding
    infer_focus: str = "lensnet"  # lensnet | keymatch (the GPT's layer-0 keys pick the blocks, mc/keymatch.py)
    infer_max_lod: int = 5  # inference: a history that outgrows max_lod grows the tree up to this level (0: never)
    # --- runtime
    aux_dtype: str = "auto"  # auto | fp32 | bf16 for GistNet/LensNet (auto: bf16 on CUDA, else fp32)
    auto_batch: bool = True  # shrink the micro-batch for the (1 + N) variants, keep tokens/step

    def __post_init__(self):
        for f in fields(self):
            _check(self, f.name, getattr(self, f.name))
        if self.allocator_collapse_threshold >= self.allocator_expand_threshold:
            raise ValueError(f"--allocator_collapse_threshold={self.allocator_collapse_threshold} must be below "
                             f"--allocator_expand_threshold={self.allocator_expand_threshold} (the gap is the hysteresis)")

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
_CHOICES = {
    "tree": ("ram",),
    "gistnet_type": ("transformer", "mean"),
    "gistnet_pooling": ("mean", "query", "cls"),
    "gistnet_head": ("mlp", "linear"),
    "positional_type": ("simple", "gaussian"),
    "allocator_type": ("greedy", "stochastic_greedy"),
    "lensnet_type": ("transformer", "none"),
    "lensnet_head": ("mlp", "linear"),
    "infer_focus": ("lensnet", "keymatch"),
    "aux_dtype": ("auto", "fp32", "bf16"),
}
# (lowest allowed, highest allowed, lowest inclusive?) for numeric knobs; None = unbounded
_RANGES = {
    "block_size": (2, None, True),
    "max_lod": (1, 8, True),
    "infer_max_lod": (0, 8, True),
    "gistnet_layers": (1, None, True),
    "wc_anneal_start_frac": (0.0, 1.0, False),
    "wc_anneal_steps": (0, None, True),
    "num_random_variants": (1, None, True),
    "recent_tokens": (1, None, True),
    "gist_delta_weight": (0.0, None, True),
    "lens_loss_weight": (0.0, None, True),
    "lens_temperature": (0.0, None, False),
    "lens_hard_negative_ratio": (0.0, 1.0, False),
    "lens_adv_norm_beta": (0.0, 1.0, True),
    "lens_kl_weight": (0.0, None, True),
    "lens_budget_smooth_weight": (0.0, None, True),
    "lens_budget_smooth_beta": (0.0, 1.0, True),
    "lensnet_layers": (1, None, True),
    "allocator_sample_top_k": (1, None, True),
    "allocator_sample_temperature": (0.0, None, False),
    "allocator_soft_max_length": (0, None, True),
    "allocator_max_replacements": (1, None, True),
    "allocator_iterations": (1, None, True),
    "infer_refocus_interval": (1, None, True),
}
_BOOLS = ("cache_lod0", "auto_batch", "lensnet_match")
_INTS = ("block_size", "max_lod", "infer_max_lod", "gistnet_layers", "wc_anneal_steps", "num_random_variants", "recent_tokens",
         "lensnet_layers", "allocator_sample_top_k", "allocator_soft_max_length", "allocator_max_replacements",
         "allocator_iterations", "infer_refocus_interval")


def _check(cfg, name, value):
    flag = FLAG_OF[name]
    bad = f"{flag}={value!r}"
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{bad} is not one of {', '.join(_CHOICES[name])}")
        return
    if name in _BOOLS:
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
    if name in _INTS and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{bad} must be an integer")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{bad} must be a number")
    if name in _RANGES:
        lo, hi, lo_inclusive = _RANGES[name]
        if lo is not None and (value < lo or (value == lo and not lo_inclusive)):
            raise ValueError(f"{bad} must be {'>=' if lo_inclusive else '>'} {lo}")
        if hi is not None and value > hi:
            raise ValueError(f"{bad} must be <= {hi}")
        if name in ("lens_adv_norm_beta", "lens_budget_smooth_beta") and value >= 1.0:
            raise ValueError(f"{bad} must be < 1 (an EMA coefficient of 1 never updates)")


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


# (field, flag, argparse type, help)
FLAGS = [
    ("block_size", "--mc_block_size", int, "tokens per LOD1 gist (and LOD1 gists per LOD2 gist)"),
    ("max_lod", "--mc_max_lod", int, "coarsest level of detail (2 = gists of block_size**2 tokens)"),
    ("tree", "--mc_tree", str, "MegaContext tree storage (only 'ram')"),
    ("cache_lod0", "--mc_cache_lod0", str2bool, "keep token embeddings in the tree (0 = drop after gisting)"),
    ("gistnet_type", "--gistnet_type", str, "transformer | mean (parameter-free mean pooling)"),
    ("gistnet_layers", "--gistnet_layers", int, "transformer layers in GistNet"),
    ("gistnet_pooling", "--gistnet_pooling", str, "mean | query | cls"),
    ("gistnet_head", "--gistnet_head", str, "mlp | linear"),
    ("train_wc_length", "--mc_train_wc_length", _wc_length_arg, "WC budget W: entries, or a fraction of --max_seq_len"),
    ("wc_anneal_start_frac", "--mc_wc_anneal_start_frac", float, "W starts at this fraction of --max_seq_len"),
    ("wc_anneal_steps", "--mc_wc_anneal_steps", int, "steps to anneal W to its target (0 = whole run)"),
    ("num_random_variants", "--mc_num_random_variants", int, "compressed WC variants per sequence"),
    ("recent_tokens", "--allocator_recent_tokens", int, "last R tokens always stay raw"),
    ("positional_type", "--positional_type", str, "simple | gaussian (RoPE for gists)"),
    ("gist_delta_weight", "--mc_gist_delta_weight", float, "penalty weight on variants worse than the baseline"),
    ("lens_loss_weight", "--mc_lens_loss_weight", float, "weight of LensNet's preference loss"),
    ("lens_temperature", "--mc_lens_temperature", float, "Bradley-Terry temperature"),
    ("lens_hard_negative_ratio", "--mc_lens_hard_negative_ratio", float, "fraction of preference pairs kept"),
    ("lens_adv_norm_beta", "--mc_lens_adv_norm_beta", float, "EMA beta of the advantage normaliser"),
    ("lens_kl_weight", "--mc_lens_kl_weight", float, "policy KL regulariser weight"),
    ("lens_budget_smooth_weight", "--mc_lens_budget_smooth_weight", float, "budget smoothing weight"),
    ("lens_budget_smooth_beta", "--mc_lens_budget_smooth_beta", float, "budget smoothing EMA beta"),
    ("lensnet_type", "--lensnet_type", str, "transformer | none (no LensNet: fixed focus)"),
    ("lensnet_layers", "--lensnet_layers", int, "transformer layers in LensNet"),
    ("lensnet_head", "--lensnet_head", str, "mlp | linear (LensNet's scoring head)"),
    ("lensnet_match", "--lensnet_match", str2bool, "LensNet reads each span's content match with the recent "
     "tokens (the GPT's layer-0 keys, mc/keymatch.py)"),
    ("allocator_type", "--allocator_type", str, "greedy | stochastic_greedy"),
    ("allocator_sample_top_k", "--allocator_sample_top_k", int, "stochastic_greedy: sample among top-k |score|"),
    ("allocator_sample_temperature", "--allocator_sample_temperature", float, "stochastic_greedy temperature"),
    ("allocator_soft_max_length", "--allocator_soft_max_length", int, "entries the allocator aims at (0 = W)"),
    ("allocator_expand_threshold", "--allocator_expand_threshold", float, "expand when score >= this"),
    ("allocator_collapse_threshold", "--allocator_collapse_threshold", float, "collapse when score <= this"),
    ("allocator_max_replacements", "--allocator_max_replacements", int, "edits per allocator iteration"),
    ("allocator_iterations", "--allocator_iterations", int, "allocator iterations per refocus"),
    ("infer_refocus_interval", "--mc_infer_refocus_interval", int, "inference: tokens between refocuses"),
    ("infer_focus", "--mc_infer_focus", str, "inference: lensnet | keymatch (the GPT's layer-0 keys pick blocks)"),
    ("infer_max_lod", "--mc_infer_max_lod", int, "inference: grow the tree up to this level for long histories "
     "(each level holds block_size x more tokens; 0 = never grow)"),
    ("aux_dtype", "--mc_aux_dtype", str, "auto | fp32 | bf16 for GistNet/LensNet"),
    ("auto_batch", "--mc_auto_batch", str2bool, "scale the micro-batch for the variants (tokens/step unchanged)"),
]
FLAG_OF = {name: flag for name, flag, _, _ in FLAGS}


def add_mc_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --mc_enabled and every MCConfig flag (defaults from the dataclass) to `parser`."""
    defaults = MCConfig()
    group = parser.add_argument_group("MegaContext")
    group.add_argument("--mc_enabled", type=str2bool, default=False, help="train/run with MegaContext (0 = vanilla)")
    for name, flag, typ, help_text in FLAGS:
        kwargs = dict(type=typ, default=getattr(defaults, name), help=help_text)
        if name in _CHOICES:
            kwargs["choices"] = _CHOICES[name]
        group.add_argument(flag, **kwargs)
    return parser



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
