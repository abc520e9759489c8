"""Registries and parts of the core: unknown names list what is registered, a new format is one
registration, gradient rules belong to formats, rule types are checked, costs are honest."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from diffq.errors import ConfigError
from diffq.eval.cost import LayerCounter, activation_bits, quantizer_bits, weight_bits
from diffq.export import CODECS, decode_tensor, encode_tensor, export_quantized, load_quantized
from diffq.formats import FORMATS, FormatKind, IntFormat, TernaryFormat, format_from_name, make_format
from diffq.formats.base import Format
from diffq.layers import layer_table
from diffq.methods import METHODS, get_method, get_recon_mode
from diffq.observers import OBSERVERS, make_observer
from diffq.quantizer import Quantizer
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec
from diffq.tensor_quant import TensorQuant
from tests.helpers import denoiser, outputs, pipeline_and_calib, quantized_copy


@pytest.mark.parametrize("lookup,match", [
    (lambda: get_method("gptq"), r"unknown quant.method 'gptq'; registered: (?=.*fp_search)(?=.*rtn)"),
    (lambda: get_recon_mode("adaquant"), r"unknown quant.recon 'adaquant'; registered: layer, block, fbr"),
    (lambda: OBSERVERS.get("max"), r"unknown observer 'max'; registered: minmax, percentile, mse, absmean, absmedian"),
    (lambda: make_format("posit", 8), r"unknown format kind 'posit'; valid kinds: int, fp, nvfp4, mxfp4, ternary"),
    (lambda: CODECS.get("zip"), r"unknown export codec 'zip'; registered: float8, int8, packed"),
])
def test_unknown_names_list_the_registered_ones(lookup, match):
    with pytest.raises(ConfigError, match=match):
        lookup()


def test_methods_register_themselves():
    assert {"rtn", "fp_search"} <= set(METHODS.names())
    assert get_recon_mode("fbr").joint and not get_recon_mode("block").joint


@dataclass(frozen=True)
class Pow2Int(IntFormat):
    """A test format: signed int grid whose scales are powers of two."""

    @property
    def name(self) -> str:
        return f"pow2int{self.bits}"

    def params_from_range(self, lo, hi, symmetric, given=None):
        scale = super().params_from_range(lo, hi, symmetric)["scale"]
        return {"scale": torch.exp2(torch.ceil(torch.log2(scale)))}


def test_a_new_format_is_one_registration(monkeypatch):
    kind = FormatKind(lambda bits, exp, man, symmetric: Pow2Int(bits), r"pow2int(?P<bits>\d)",
                      lambda m: Pow2Int(int(m["bits"])), ("pow2int4",))
    monkeypatch.setitem(FORMATS._items, "pow2int", kind)
    tq = TensorQuant(format="pow2int", bits=4, granularity="channel")
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    q = tq.build_quantizer("weight")
    q.calibrate_weight(w)
    scale = q.scale.flatten()
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    assert (scale >= w.abs().amax(1) / 7).all() and (scale < 2 * w.abs().amax(1) / 7).all()
    assert torch.equal(decode_tensor(q, *encode_tensor(q, w)), q(w))  # codes via the int codec
    assert quantizer_bits(q) == 4 + 16 / 32
    assert format_from_name("pow2int4") == Pow2Int(4)
    assert tq.describe() == "pow2int4/channel/sym"


def test_ternary_has_bitnets_identity_ste_and_int_clips():
    x = torch.tensor([[-3.0, -0.9, 0.2, 0.6, 2.5]], requires_grad=True)
    ternary = Quantizer(TernaryFormat(), kind="weight", granularity="tensor", observer="absmean")
    ternary.calibrate_weight(torch.ones(1, 4) * 0.5)  # scale 0.5: grid {-0.5, 0, 0.5}
    ternary(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # beyond the clip range too
    x.grad = None
    int2 = Quantizer(IntFormat(2), kind="weight", granularity="tensor")
    int2.calibrate_weight(torch.ones(1, 4) * 0.5)
    int2(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]))  # codes -6 -2 0 1 5, range [-1, 1]


def test_rule_with_a_wrong_type_names_the_rule():
    layers = {"lin": ("ffn_up", nn.Linear(8, 8))}
    w8 = {"format": "int", "bits": 8, "granularity": "channel"}
    with pytest.raises(ConfigError, match=r"quant.rules\[1\].weight: bad value for 'bits'.*'four'"):
        resolve_spec(layers, w8, {"format": "none"}, [{"roles": ["ffn_up"]}, {"weight": {"bits": "four"}}], ROLES)
    with pytest.raises(ConfigError, match=r"quant.rules\[0\].act: unknown quantization key\(s\) \['bit'\]"):
        resolve_spec(layers, w8, {"format": "none"}, [{"act": {"bit": 4}}], ROLES)
    specs = resolve_spec(layers, w8, {"format": "none"}, [{"weight": {"bits": "4"}}], ROLES)
    assert specs[0].weight.bits == 4  # a quoted number is converted like the YAML would


def test_observer_options_are_checked():
    layout = Quantizer(IntFormat(8), kind="act").layout
    with pytest.raises(ConfigError, match=r"percentile must be in \(0, 100\]"):
        make_observer("percentile", layout, True, percentile=120.0)
    with pytest.raises(ConfigError, match="symmetric only"):
        make_observer("absmean", layout, False)


def test_set_params_keeps_a_learnable_scale_trainable():
    q = Quantizer(IntFormat(4), kind="weight", granularity="channel", learnable=True)
    q.calibrate_weight(torch.randn(4, 8))
    q.set_params(scale=torch.full((4, 1, 1), 0.1))
    assert isinstance(q.scale, nn.Parameter) and q.scale.requires_grad
    with pytest.raises(ConfigError, match="cannot switch int4 to nvfp4"):
        q.set_format(make_format("nvfp4", 4))


def test_fp_search_keeps_learnable_scales_learnable():
    pipe, calib = pipeline_and_calib("sd")
    model = copy.deepcopy(denoiser(pipe))
    weight = {"format": "fp", "bits": 4, "granularity": "channel", "learnable": True}
    specs = resolve_spec(quantizable_layers(model, "sd"), weight, {"format": "none"}, [], ROLES)
    get_method("fp_search")(model, specs, calib[:2], {"search": {"act": False, "alphas": 8}},
                            device=torch.device("cpu"), dtype=torch.float32)
    scales = [layer.weight_quantizer.scale for layer in layer_table(model).values()]
    assert scales and all(isinstance(s, nn.Parameter) for s in scales)


def test_ternary_cost_counts_what_the_file_stores(tmp_path):
    ternary = {"format": "ternary", "bits": 2, "granularity": "channel", "observer": "absmean"}
    _, model, specs, calib = quantized_copy("sd", weight=ternary, act={"format": "none"})
    cost = weight_bits(model)
    assert cost["effective_weight_bits"] < cost["stored_weight_bits"]
    q = next(layer.weight_quantizer for layer in layer_table(model).values())
    k = q.last_shape[1] if len(q.last_shape) == 2 else math.prod(q.last_shape[1:])
    assert quantizer_bits(q) == 2 + 16 / k and quantizer_bits(q, stored=False) == math.log2(3) + 16 / k
    export_quantized(model, specs, tmp_path)
    loaded = load_quantized(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, calib), outputs(loaded, calib)))


def test_cost_reports_the_formats_bits_and_the_stored_bits_apart():
    costs = {}
    for bits in (8, 6, 3):
        weight = {"format": "int", "bits": bits, "granularity": "channel"}
        act = {"format": "int", "bits": bits, "granularity": "tensor", "symmetric": False}
        _, model, specs, calib = quantized_copy("sd", weight=weight, act=act, rules=[])
        counter = LayerCounter(model, [s.name for s in specs])
        outputs(model, calib[:1])
        counter.remove()
        costs[bits] = {**weight_bits(model), "act": activation_bits(model, counter.counts, specs)}
    eight, six, three = costs[8], costs[6], costs[3]
    assert eight["stored_weight_bits"] == six["stored_weight_bits"] == eight["effective_weight_bits"]  # int8 container
    assert six["effective_weight_bits"] == pytest.approx(eight["effective_weight_bits"] - 2)  # same scales
    assert three["stored_weight_bits"] == pytest.approx(eight["stored_weight_bits"] - 4)  # packed 4-bit
    assert three["effective_weight_bits"] == pytest.approx(eight["effective_weight_bits"] - 5)
    assert (eight["act"], six["act"], three["act"]) == (8.0, 6.0, 3.0)  # every input quantized, never stored


def test_format_base_class_refuses_block_granularity():
    with pytest.raises(ConfigError, match="need granularity=block"):
        Format.check_usage(IntFormat(8), kind="weight", granularity="block", symmetric=True, observer="minmax")
