"""MCConfig: defaults, one clear error per bad knob (naming the flag), sequence-length checks, flags."""

import argparse
from dataclasses import fields

import pytest

from mc.config import FLAGS, MCConfig, add_mc_flags


def test_defaults_are_valid():
    cfg = MCConfig()
    assert cfg.validate_against(2048) == round(0.2 * 2048)
    assert cfg.block_size == 32 and cfg.max_lod == 2 and cfg.tree == "ram"


@pytest.mark.parametrize("kwargs, flag", [
    (dict(block_size=1), "--mc_block_size"),
    (dict(max_lod=0), "--mc_max_lod"),
    (dict(max_lod=9), "--mc_max_lod"),
    (dict(infer_max_lod=9), "--mc_infer_max_lod"),
    (dict(tree="tape"), "--mc_tree"),
    (dict(gistnet_type="lstm"), "--gistnet_type"),
    (dict(gistnet_layers=0), "--gistnet_layers"),
    (dict(gistnet_pooling="max"), "--gistnet_pooling"),
    (dict(gistnet_head="conv"), "--gistnet_head"),
    (dict(train_wc_length=0), "--mc_train_wc_length"),
    (dict(train_wc_length=1.5), "--mc_train_wc_length"),
    (dict(train_wc_length="512"), "--mc_train_wc_length"),
    (dict(wc_anneal_start_frac=0.0), "--mc_wc_anneal_start_frac"),
    (dict(wc_anneal_steps=-1), "--mc_wc_anneal_steps"),
    (dict(num_random_variants=0), "--mc_num_random_variants"),
    (dict(recent_tokens=-1), "--allocator_recent_tokens"),
    (dict(positional_type="alibi"), "--positional_type"),
    (dict(cache_lod0=1), "--mc_cache_lod0"),
    (dict(aux_dtype="fp16"), "--mc_aux_dtype"),
    (dict(lens_temperature=0.0), "--mc_lens_temperature"),
    (dict(lens_hard_negative_ratio=0.0), "--mc_lens_hard_negative_ratio"),
    (dict(lens_adv_norm_beta=1.0), "--mc_lens_adv_norm_beta"),
    (dict(lens_loss_weight=-1.0), "--mc_lens_loss_weight"),
    (dict(allocator_type="beam"), "--allocator_type"),
    (dict(allocator_sample_top_k=0), "--allocator_sample_top_k"),
    (dict(allocator_iterations=0), "--allocator_iterations"),
    (dict(allocator_expand_threshold=-0.5), "--allocator_collapse_threshold"),
    (dict(block_size=32.0), "--mc_block_size"),
])
def test_each_bad_knob_names_its_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MCConfig(**kwargs)


def test_wc_longer_than_sequence():
    with pytest.raises(ValueError) as e:
        MCConfig(train_wc_length=4000).validate_against(2048)
    assert "--mc_train_wc_length=4000 exceeds --max_seq_len=2048" in str(e.value)


def test_recent_tokens_must_leave_room():
    with pytest.raises(ValueError, match="--allocator_recent_tokens=512"):
        MCConfig(train_wc_length=512, recent_tokens=512).validate_against(2048)


def test_budget_too_small_to_cover_history():
    # 4096 tokens, R=128: coarsest covering = 3 LOD2 + 28 LOD1 + 128 raw = 159 entries > 150
    with pytest.raises(ValueError, match="most compressed covering"):
        MCConfig(train_wc_length=150, recent_tokens=128).validate_against(4096)
    assert MCConfig(train_wc_length=159, recent_tokens=128).validate_against(4096) == 159


def test_fraction_and_entries():
    assert MCConfig(train_wc_length=0.25).wc_length(2048) == 512
    assert MCConfig(train_wc_length=1.0).wc_length(2048) == 2048
    assert MCConfig(train_wc_length=300).wc_length(2048) == 300


def test_every_field_has_a_flag():
    assert {f.name for f in fields(MCConfig)} == {name for name, *_ in FLAGS}
    assert len({flag for _, flag, *_ in FLAGS}) == len(FLAGS)


def _parser():
    return add_mc_flags(argparse.ArgumentParser(allow_abbrev=False))


def test_flags_round_trip_both_syntaxes():
    args = _parser().parse_args([
        "--mc_enabled=1", "--mc_train_wc_length=512", "--gistnet_pooling", "cls", "--mc_cache_lod0=0",
        "--allocator_recent_tokens", "64", "--positional_type=simple", "--mc_lens_temperature", "0.5",
        "--allocator_type=stochastic_greedy",
    ])
    assert args.mc_enabled is True
    cfg = MCConfig.from_flags(args)
    assert cfg.train_wc_length == 512 and isinstance(cfg.train_wc_length, int)
    assert cfg.gistnet_pooling == "cls" and cfg.cache_lod0 is False and cfg.recent_tokens == 64
    assert cfg.positional_type == "simple" and cfg.lens_temperature == 0.5
    assert cfg.allocator_type == "stochastic_greedy"
    assert MCConfig.from_flags(_parser().parse_args(["--mc_train_wc_length", "0.3"])).train_wc_length == 0.3
    assert MCConfig.from_flags(_parser().parse_args([])) == MCConfig()


@pytest.mark.parametrize("argv, flag", [
    (["--gistnet_pooling=max"], "--gistnet_pooling"),
    (["--mc_block_size=abc"], "--mc_block_size"),
    (["--mc_train_wc_length=lots"], "--mc_train_wc_length"),
    (["--mc_cache_lod0=maybe"], "--mc_cache_lod0"),
    (["--mc_no_such_flag=1"], "--mc_no_such_flag"),
])
def test_bad_flags_are_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)
    assert flag in capsys.readouterr().err


def test_value_errors_from_flags_name_the_flag():
    args = _parser().parse_args(["--mc_num_random_variants=0"])
    with pytest.raises(ValueError, match="--mc_num_random_variants=0"):
        MCConfig.from_flags(args)


def test_from_flags_without_add_mc_flags():
    with pytest.raises(ValueError, match="add_mc_flags"):
        MCConfig.from_flags(argparse.Namespace())


def test_soft_max_length_against_sequence():
    with pytest.raises(ValueError, match="--allocator_soft_max_length=4096 exceeds --max_seq_len=2048"):
        MCConfig(allocator_soft_max_length=4096).validate_against(2048)


# ------------------------------------------------------------------ one source per knob
def _mc_options(parser) -> dict:
    """option string -> argparse action, for every MC flag a command's parser has."""
    from mc.config import FLAG_OF, STAGE_FLAGS

    mc_flags = set(FLAG_OF.values()) | {flag for flag, _, _ in STAGE_FLAGS.values()}
    return {o: a for a in parser._actions for o in a.option_strings if o in mc_flags}


def test_every_command_takes_its_mc_flags_from_the_config():
    """chat_cli, chat_web, mc_eval, mc_recall, the benches and base_train declare no MC flag by hand: each
    comes from mc/config.py with the knob's type, help and choices (so a new range or help shows everywhere)."""
    import importlib

    from mc.config import FLAGS, STAGE_FLAGS

    declared = {flag: (typ, help_text) for _, flag, typ, help_text in FLAGS}
    declared.update({flag: (typ, help_text) for flag, typ, help_text in STAGE_FLAGS.values()})
    seen = set()
    for module in ("scripts.chat_cli", "scripts.chat_web", "scripts.mc_eval", "scripts.mc_recall", "scripts.mc_bench",
                   "scripts.mc_bench_train", "scripts.base_train"):
        mod = importlib.import_module(module)
        parser = _capture_parser(mod)
        for flag, action in _mc_options(parser).items():
            typ, help_text = declared[flag]
            assert action.type is typ and action.help.startswith(help_text), (module, flag)
            seen.add(flag)
    assert {"--mc_infer_wc_length", "--mc_infer_focus", "--mc_eval_wc_length", "--mc_block_size"} <= seen


def _capture_parser(mod):
    """The argparse parser a script builds (build_parser(), or the one its parse_args() makes)."""
    if hasattr(mod, "build_parser"):
        return mod.build_parser()
    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        try:
            (mod.parse_args if hasattr(mod, "parse_args") else mod.main)([])
        except SystemExit:
            pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["parser"]


def test_old_spellings_still_work_with_a_warning(capsys):
    p = add_mc_flags(argparse.ArgumentParser(allow_abbrev=False), names=("eval_wc_length", "block_size"),
                     overrides=True, renamed={"eval_wc_length": ("--wc_length",), "block_size": ("--block_size",)})
    args = p.parse_args(["--wc_length=64", "--block_size", "16"])
    assert args.mc_eval_wc_length == 64 and args.mc_block_size == 16
    err = capsys.readouterr().err
    assert "--wc_length is deprecated" in err and "use --mc_eval_wc_length" in err and "--block_size is deprecated" in err
    args = p.parse_args(["--mc_eval_wc_length=64"])
    assert args.mc_eval_wc_length == 64 and args.mc_block_size is None and capsys.readouterr().err == ""


def test_overrides_default_to_the_checkpoint():
    from mc.config import add_session_flags, given_session_flags, session_overrides

    args = add_session_flags(argparse.ArgumentParser(allow_abbrev=False)).parse_args([])
    assert session_overrides(args) == {"W": None, "refocus_interval": None, "focus": None, "max_lod": None,
                                       "tree": None}
    assert given_session_flags(args) == []
    args = add_session_flags(argparse.ArgumentParser(allow_abbrev=False)).parse_args(
        ["--mc_infer_wc_length=300", "--mc_infer_focus=keymatch", "--mc_tree=disk"])
    assert session_overrides(args)["W"] == 300 and session_overrides(args)["focus"] == "keymatch"
    assert session_overrides(args)["tree"] == "disk"
    assert given_session_flags(args) == ["--mc_infer_wc_length", "--mc_infer_focus", "--mc_tree"]
