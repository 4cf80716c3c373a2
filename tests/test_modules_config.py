"""MoEConfig validation: bad settings fail with a ValueError that names the fairseq flag."""

import re
import warnings

import pytest

from meo_fairseq.modules import ExpertLinear, MoEConfig, MoEFFN


def test_defaults_are_valid_and_follow_the_paper_headline():
    cfg = MoEConfig()
    assert (cfg.mode, cfg.experts, cfg.top_k, cfg.routing) == ("meo", 16, 4, "sequence")
    assert cfg.full_experts == 4
    assert not cfg.token_block


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(experts=4, top_k=5), "--moe-top-k"),
        (dict(experts=4, top_k=0), "--moe-top-k"),
        (dict(experts=0, top_k=1), "--moe-experts"),
        (dict(experts=4, top_k=2, compressed_experts=2), "--moe-compressed-experts"),
        (dict(experts=4, top_k=2, compressed_experts=3), "--moe-compressed-experts"),
        (dict(experts=4, top_k=2, compressed_experts=-1), "--moe-compressed-experts"),
        (dict(mode="sparse"), "--moe-mode"),
        (dict(level="word"), "--moe-level"),
        (dict(expert_unit="block"), "--moe-expert-unit"),
        (dict(routing="nearest"), re.compile(r"--moe-(decoder-)?routing")),
        (dict(balance_loss="l2"), "--moe-balance-loss"),
        (dict(routing="segment"), "--moe-segment-length"),
        (dict(routing="segment", segment_length=0), "--moe-segment-length"),
        (dict(routing="prefix"), "--moe-prefix-length"),
        (dict(routing="prefix", prefix_length=0), "--moe-prefix-length"),
        (dict(balance_weight=-0.1), "--moe-balance-weight"),
        (dict(z_loss_weight=-1e-3), "--moe-z-loss-weight"),
        # token-level vanilla MoE must route every token
        (dict(mode="moe", level="token", routing="sequence"), "--moe-level"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_flag(kwargs, flag):
    with pytest.raises(ValueError) as err:
        MoEConfig(**kwargs)
    msg = str(err.value)
    if isinstance(flag, str):
        assert flag in msg, msg
    else:
        assert flag.search(msg), msg


def test_meo_with_per_token_routing_is_refused_and_points_to_moe_mode():
    with pytest.raises(ValueError, match="--moe-mode moe"):
        MoEConfig(mode="meo", routing="token")


def test_with_revalidates():
    cfg = MoEConfig(experts=4, top_k=2)
    with pytest.raises(ValueError, match="--moe-top-k"):
        cfg.with_(top_k=8)
    assert cfg.with_(top_k=3).top_k == 3


def test_layers_refuse_bad_settings_at_build():
    with pytest.raises(ValueError, match="--moe-top-k"):
        ExpertLinear(4, 4, MoEConfig(experts=2, top_k=3))
    with pytest.raises(ValueError, match="--moe-compressed-experts"):
        MoEFFN(4, 8, MoEConfig(experts=4, top_k=1, compressed_experts=1))


def test_dense_mode_ignores_expert_settings():
    cfg = MoEConfig(mode="dense", experts=1, top_k=7, compressed_experts=9)
    assert cfg.mode == "dense"


def test_full_routing_warns_about_the_leak():
    with pytest.warns(UserWarning, match="future"):
        MoEConfig(routing="full")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEConfig(routing="segment", segment_length=4)
        MoEConfig(routing="prefix", prefix_length=4)
        MoEConfig(routing="encoder")


def test_derived_properties():
    assert MoEConfig(mode="meo", level="token").token_block
    assert not MoEConfig(mode="moe", level="token", routing="token").token_block
    assert MoEConfig(experts=8, top_k=4, compressed_experts=3).full_experts == 1


@pytest.mark.parametrize(
    "name,flag",
    [
        ("balance_weight", "--moe-balance-weight"),
        ("z_loss_weight", "--moe-z-loss-weight"),
        ("merge_min_tokens", "--moe-merge-min-tokens"),
    ],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), -1.0])
def test_non_finite_or_negative_numbers_are_rejected_naming_the_flag(name, flag, value):
    with pytest.raises(ValueError, match=flag):
        MoEConfig(mode="meo", experts=4, top_k=2, **{name: value})
    MoEConfig(mode="meo", experts=4, top_k=2, **{name: 0.0})  # zero is fine
