"""BOS-aware cross-attention K/V quantization (MixDQ): token 0 through the FP weight, the rest quantized."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffq import job
from diffq.errors import ConfigError
from diffq.export import export_quantized, load_quantized
from diffq.layers import attach_quantizers
from diffq.models import denoiser_of
from diffq.roles import ROLES
from diffq.spec import resolve_spec
from tests.helpers import A8, KEEP_FP, W8, outputs, quantized_copy

BOS = [*KEEP_FP, {"roles": ["cross_attn_kv"], "bos": True}]


def _kv_layer(bos: bool) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    spec = resolve_spec({"attn2.to_k": ("cross_attn_kv", layer)}, W8, A8,
                        [{"roles": ["cross_attn_kv"], "bos": bos}], ROLES)
    attach_quantizers(nn.ModuleDict({"attn2": nn.ModuleDict({"to_k": layer})}), spec)
    text = torch.randn(3, 7, 16)
    text[:, 0] = 800.0 * torch.sign(torch.randn(16))  # CLIP's BOS outlier, the same row for every prompt
    layer.weight_quantizer.calibrate_weight(layer.weight)
    layer.input_quantizer.begin_calibration()
    layer(text)
    layer.input_quantizer.end_calibration()
    return layer, text


def test_bos_row_is_exactly_fp_and_never_sets_the_activation_range():
    layer, text = _kv_layer(bos=True)
    fp_weight = layer.weight.detach().clone()
    out = layer(text)
    assert torch.equal(out[:, :1], F.linear(text[:, :1], fp_weight, layer.bias))
    assert layer.input_quantizer.params()["scale"].item() < 0.1  # range of tokens 1.. only
    expected = F.linear(layer.input_quantizer(text[:, 1:]), layer.weight_quantizer(layer.weight), layer.bias)
    assert torch.equal(out[:, 1:], expected)
    plain, _ = _kv_layer(bos=False)
    assert plain.input_quantizer.params()["scale"].item() > 5  # the outlier sets the plain layer's step
    rest = lambda o: F.mse_loss(o[:, 1:], F.linear(text[:, 1:], fp_weight, layer.bias))  # noqa: E731
    assert rest(out) < 0.01 * rest(plain(text))


def test_without_the_option_the_layer_is_the_plain_quantized_layer():
    plain, text = _kv_layer(bos=False)
    assert plain.bos_weight is None and "bos_weight" not in plain.state_dict()
    expected = F.linear(plain.input_quantizer(text), plain.weight_quantizer(plain.weight), plain.bias)
    assert torch.equal(plain(text), expected)


def test_bos_survives_export_and_reload_bit_exactly(tmp_path):
    fp, model, specs, calib = quantized_copy("sd", weight=W8, act=A8, rules=BOS)
    assert sum(s.bos for s in specs) == 8 and all(s.role == "cross_attn_kv" for s in specs if s.bos)
    export_quantized(model, specs, tmp_path)
    loaded = load_quantized(tmp_path)
    kv = [m for n, m in loaded.named_modules() if n.endswith("attn2.to_k")]
    assert kv and all(m.bos_weight is not None for m in kv)
    for a, b in zip(outputs(model, calib), outputs(loaded, calib)):
        assert torch.equal(a, b)
    _, without, _, _ = quantized_copy("sd", weight=W8, act=A8, rules=KEEP_FP)
    assert any(not torch.equal(a, b) for a, b in zip(outputs(model, calib), outputs(without, calib)))


def test_bos_on_other_layers_is_an_error():
    layer = nn.Linear(16, 8)
    with pytest.raises(ConfigError, match="add roles: \\[cross_attn_kv\\]"):
        resolve_spec({"attn1.to_k": ("attn_qkv", layer)}, W8, A8, [{"bos": True}], ROLES)


def test_bos_is_a_noop_with_a_log_line_for_flux(compose, caplog):
    from diffq.models import load_pipeline

    rule = "quant.rules=[{roles: [attn_qkv], names: ['*add_k_proj'], bos: true}]"  # FLUX's text K: a T5 sequence
    cfg = compose("model=tiny_flux", "quant=w8a8", rule)
    _, denoiser = denoiser_of(load_pipeline(cfg.model))
    with caplog.at_level("INFO"):
        specs = job.layer_specs(cfg, denoiser, job.plan_of(cfg))
    assert not any(s.bos for s in specs) and "does not apply" in caplog.text
    sd = compose("model=tiny_sd15", "quant=w8a8", "quant.rules=[{roles: [cross_attn_kv], bos: true}]")
    _, unet = denoiser_of(load_pipeline(sd.model))
    specs = job.layer_specs(sd, unet, job.plan_of(sd))
    assert sum(s.bos for s in specs) == 8
    assert "+bos fp" in job.spec_text(specs, {"enabled": False})
