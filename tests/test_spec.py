"""The bit-config grammar on real module names of a tiny SD UNet."""
from __future__ import annotations

import logging

import pytest

from diffq.errors import ConfigError
from diffq.models import build_tiny_pipeline
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import format_spec_table, resolve_spec, validate_quant_args

W8 = {"format": "int", "bits": 8, "granularity": "channel"}
A8 = {"format": "int", "bits": 8, "granularity": "tensor", "symmetric": False}
KEEP_FP = {"roles": ["conv_in", "conv_out", "time_embed"], "skip": True}


@pytest.fixture(scope="module")
def layers():
    unet = build_tiny_pipeline("sd").unet
    return quantizable_layers(unet, "sd")


def by_name(specs):
    return {s.name: s for s in specs}


def test_preset_keeps_io_and_time_embedding_fp(layers):
    specs = by_name(resolve_spec(layers, W8, A8, [KEEP_FP], ROLES))
    assert specs["conv_in"].skip and specs["conv_out"].skip
    assert all(s.skip for s in specs.values() if s.role == "time_embed")
    kv = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert not specs[kv].skip and specs[kv].weight.bits == 8 and specs[kv].act.bits == 8
    assert sum(not s.skip for s in specs.values()) > 0.8 * len(specs)


def test_last_matching_rule_wins_per_field(layers):
    rules = [
        {"roles": ["cross_attn_kv"], "weight": {"bits": 4}, "act": {"bits": 6}},
        {"names": ["*attn2.to_k"], "weight": {"bits": 8}},
    ]
    specs = by_name(resolve_spec(layers, W8, A8, rules, ROLES))
    k = specs["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"]
    v = specs["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"]
    assert (k.weight.bits, k.act.bits, k.rules) == (8, 6, [0, 1])
    assert (v.weight.bits, v.act.bits, v.rules) == (4, 6, [0])
    assert specs["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"].weight.bits == 8


def test_regex_names_and_unskip(layers):
    rules = [{"names": [r"re:down_blocks\.0\..*"], "skip": True},
             {"names": ["down_blocks.0.resnets.0.conv1"], "skip": False}]
    specs = by_name(resolve_spec(layers, W8, A8, rules, ROLES))
    assert specs["down_blocks.0.resnets.0.conv2"].skip
    assert not specs["down_blocks.0.resnets.0.conv1"].skip
    assert not specs["up_blocks.0.resnets.0.conv1"].skip


def test_kinds_match_the_layer_type(layers):
    rules = [KEEP_FP, {"kinds": ["conv2d"], "act": {"format": "none"}}]
    specs = [s for s in resolve_spec(layers, W8, A8, rules, ROLES) if not s.skip]
    assert {s.kind for s in specs} == {"linear", "conv2d"} and all(s.weight is not None for s in specs)
    assert all((s.act is None) == (s.kind == "conv2d") for s in specs)


def test_format_none_keeps_tensor_fp(layers):
    specs = resolve_spec(layers, W8, {"format": "int", "bits": 16}, [], ROLES)
    assert all(s.act is None and s.weight is not None for s in specs)


def test_rule_matching_nothing_warns_or_fails_when_strict(layers, caplog):
    rule = [{"names": ["*to_qq"], "skip": True}]
    with caplog.at_level(logging.WARNING):
        resolve_spec(layers, W8, A8, rule, ROLES)
    assert "matches no layer" in caplog.text
    with pytest.raises(ConfigError, match="matches no layer"):
        resolve_spec(layers, W8, A8, rule, ROLES, strict=True)


@pytest.mark.parametrize(
    "weight, act, rules, message",
    [
        ({"format": "fp", "bits": 4, "exp": 5, "man": 3}, A8, [], "9 bits"),
        ({"format": "int4x"}, A8, [], "format"),
        ({"format": "int", "bits": 12}, A8, [], "bits"),
        (W8, A8, [{"roles": ["cross_attn"], "skip": True}], "unknown role"),
        (W8, A8, [{"roles": ["ffn_up"], "weight": {"bitz": 4}}], "unknown quantization key"),
        ({**W8, "granularity": "group:7"}, A8, [], "does not divide"),
        ({**W8, "granularity": "token"}, A8, [], "activations"),
        (W8, A8, [{"names": ["re:(unclosed"], "skip": True}], "bad regex"),
        (W8, A8, [{"kinds": ["conv"], "skip": True}], "unknown kind"),
    ],
)
def test_bad_configs_fail_with_a_message(layers, weight, act, rules, message):
    with pytest.raises(ConfigError, match=message):
        resolve_spec(layers, weight, act, rules, ROLES)


def test_validate_before_loading_any_model():
    with pytest.raises(ConfigError, match="E5M3"):
        validate_quant_args({"format": "fp", "bits": 4, "exp": 5, "man": 3}, A8)


def test_spec_table_lists_every_layer(layers):
    specs = resolve_spec(layers, W8, A8, [KEEP_FP], ROLES)
    table = format_spec_table(specs)
    for s in specs:
        assert s.name in table
    assert "int8/channel/sym" in table and "int8/tensor/asym" in table
    assert f"{sum(s.quantized for s in specs)} of {len(specs)} layers quantized" in table
