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
    (dict(tree="disk"), "--mc_tree"),
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
