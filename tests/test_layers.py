"""Quantized layers: in-place conversion, frozen weights, every architecture at W8A8."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffq.formats import make_format
from diffq.layers import dequantize_layer_, is_quant_layer, iter_quantizers, quantize_layer_
from diffq.quantizer import Quantizer
from tests.helpers import outputs, quantized_copy, rel_error

FAMILIES = ["sd", "sdxl", "dit", "pixart", "sd3", "flux"]


def _int8_weight_quantizer() -> Quantizer:
    return Quantizer(make_format("int", 8), kind="weight", granularity="channel")


def test_conversion_keeps_identity_names_and_hooks():
    torch.manual_seed(0)
    parent = nn.Sequential(nn.Linear(16, 8))
    layer = parent[0]
    calls = []
    layer.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    wq = _int8_weight_quantizer()
    quantize_layer_(layer, wq, None)
    assert parent[0] is layer and isinstance(layer, nn.Linear) and is_quant_layer(layer)
    keys = set(parent.state_dict())
    assert {"0.weight", "0.bias"} <= keys and any(k.startswith("0.weight_quantizer.") for k in keys)
    wq.calibrate_weight(layer.weight)
    layer.freeze()
    x = torch.randn(4, 16)
    y = parent(x)
    assert calls == [torch.Size([4, 8])]
    assert torch.equal(y, nn.functional.linear(x, wq(layer.weight), layer.bias))
    assert not torch.equal(layer.weight_fq, layer.weight)  # FP weight kept next to the frozen one


def test_frozen_weight_is_computed_once():
    layer = nn.Conv2d(4, 8, 3)
    wq = _int8_weight_quantizer()
    quantize_layer_(layer, wq, None)
    wq.calibrate_weight(layer.weight)
    layer.freeze()
    calls = []
    wq.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(3):
        layer(torch.randn(1, 4, 8, 8))
    assert calls == []


def test_freeze_without_original_overwrites_weight_and_dequantize_restores_class():
    layer = nn.Linear(8, 8)
    wq = _int8_weight_quantizer()
    quantize_layer_(layer, wq, None)
    wq.calibrate_weight(layer.weight)
    expected = wq(layer.weight).detach()
    layer.freeze(keep_original=False)
    assert torch.equal(layer.weight.data, expected)
    dequantize_layer_(layer)
    assert type(layer) is nn.Linear and "weight_quantizer" not in dict(layer.named_modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_architecture_wraps_and_stays_close_at_w8a8(family):
    fp, model, specs, calib = quantized_copy(family)
    n_quant = sum(is_quant_layer(m) for m in model.modules())
    assert n_quant == sum(s.quantized for s in specs) > 0
    ref, test = outputs(fp, calib), outputs(model, calib)
    err = rel_error(ref, test)
    assert 0 < err < 0.08, f"{family}: relative error {err:.4f} at W8A8"


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_lower_weight_bits_hurt_more(family):
    fp_act = {"format": "none"}
    fp, m8, _, calib = quantized_copy(family, act=fp_act)
    _, m4, _, _ = quantized_copy(family, weight={"format": "int", "bits": 4, "granularity": "channel"}, act=fp_act)
    ref = outputs(fp, calib)
    assert rel_error(ref, outputs(m4, calib)) > 2 * rel_error(ref, outputs(m8, calib))


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_attention_matmul_quantizers(family):
    def attn(bits: int | None) -> dict:
        fmt = {"format": "none"} if bits is None else {"format": "int", "bits": bits, "granularity": "tensor"}
        return {"enabled": True, "qkv": fmt, "softmax": {**fmt, "symmetric": False}}

    only_attn = {"weight": {"format": "none"}, "act": {"format": "none"}, "rules": []}
    fp, _, _, calib = quantized_copy(family)
    ref = outputs(fp, calib)
    errors = {}
    for bits in (None, 8, 4):
        _, model, _, _ = quantized_copy(family, attn=attn(bits), **only_attn)
        names = [n for n, _ in iter_quantizers(model)]
        if bits is not None:
            assert any(n.endswith(".softmax_quantizer") for n in names)
            assert any(n.endswith(".q_quantizer") for n in names)
        errors[bits] = rel_error(ref, outputs(model, calib))
    assert errors[None] < 1e-5  # the wrapped processor with no quantizers is the original maths
    assert 0 < errors[8] < 0.02 and errors[4] > 3 * errors[8], errors
