"""Quantized attention processors: FP-exact when off, close at 8 bits, no global SDPA replacement."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor

from diffq.attention import QuantAttnProcessor, attach_attention_quantizers, attention_modules, quantized_attention
from diffq.errors import ConfigError
from diffq.quantizer import Quantizer
from diffq.spec import TensorQuant
from tests.helpers import denoiser, outputs, pipeline_and_calib, rel_error

FAMILIES = ["sd", "sdxl", "dit", "pixart", "sd3", "flux"]
SDPA = F.scaled_dot_product_attention
INT8 = TensorQuant.from_mapping({"format": "int", "bits": 8, "granularity": "tensor"}, "qkv")
UINT8 = TensorQuant.from_mapping({"format": "int", "bits": 8, "granularity": "tensor", "symmetric": False}, "softmax")


def _attention_quantizers(model) -> list[Quantizer]:
    return [q for attn in attention_modules(model).values()
            for q in (attn.q_quantizer, attn.k_quantizer, attn.v_quantizer, attn.softmax_quantizer) if q is not None]


def _quantized(family: str, softmax: TensorQuant | None = None):
    """(FP denoiser, copy with calibrated attention quantizers, those quantizers, calib)."""
    pipe, calib = pipeline_and_calib(family)
    fp = denoiser(pipe)
    model = copy.deepcopy(fp)
    names = attach_attention_quantizers(model, INT8, softmax)
    assert names and all(isinstance(attn.processor, QuantAttnProcessor) for attn in attention_modules(model).values())
    quantizers = _attention_quantizers(model)
    for q in quantizers:
        q.begin_calibration()
    outputs(model, calib[:1])
    for q in quantizers:
        q.end_calibration()
    return fp, model, quantizers, calib


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_quantizers_give_the_fp_output(family):
    fp, model, quantizers, calib = _quantized(family, softmax=UINT8)
    for q in quantizers:
        q.enabled = False
    for ref, out in zip(outputs(fp, calib), outputs(model, calib)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_qkv_is_close_to_fp_but_not_identical(family):
    fp, model, _, calib = _quantized(family)
    err = rel_error(outputs(fp, calib), outputs(model, calib))
    assert 0 < err < 0.02, f"{family}: relative error {err:.2e} with int8 q/k/v"


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_sdpa_is_never_replaced(family):
    _, model, quantizers, calib = _quantized(family, softmax=UINT8)
    seen = []
    for q in quantizers:
        q.register_forward_pre_hook(lambda *_: seen.append(F.scaled_dot_product_attention))
    assert F.scaled_dot_product_attention is SDPA
    outputs(model, calib[:1])
    assert F.scaled_dot_product_attention is SDPA and torch.nn.functional.scaled_dot_product_attention is SDPA
    assert seen and all(f is SDPA for f in seen)


def test_unknown_processor_is_refused_before_anything_is_attached():
    model = copy.deepcopy(denoiser(pipeline_and_calib("sd")[0]))
    model.set_attn_processor(AttnProcessor())
    with pytest.raises(ConfigError, match="not supported for processor AttnProcessor "):
        attach_attention_quantizers(model, INT8, None)
    assert not any(hasattr(attn, "q_quantizer") for attn in attention_modules(model).values())
    assert not any(isinstance(attn.processor, QuantAttnProcessor) for attn in attention_modules(model).values())


@pytest.mark.parametrize("case", ["none", "bool", "additive", "causal", "gqa"])
def test_attention_core_matches_sdpa_with_a_disabled_softmax_quantizer(case):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    kwargs = {}
    if case == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, 5, 7) > 0.3
        kwargs["attn_mask"][..., 0] = True
    elif case == "additive":
        kwargs["attn_mask"] = torch.randn(2, 1, 1, 7)
    elif case == "causal":
        k, v, kwargs["is_causal"] = k[:, :, :5], v[:, :, :5], True
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
    smq = UINT8.build_quantizer("act")
    smq.enabled = False
    attn = SimpleNamespace(q_quantizer=None, k_quantizer=None, v_quantizer=None, softmax_quantizer=smq)
    expected = SDPA(q, k, v, enable_gqa=case == "gqa", **kwargs)
    torch.testing.assert_close(quantized_attention(attn, q, k, v, **kwargs), expected, rtol=1e-5, atol=1e-6)
    attn.softmax_quantizer = None
    torch.testing.assert_close(quantized_attention(attn, q, k, v, **kwargs), expected, rtol=0, atol=0)
