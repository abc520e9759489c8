"""Weight sources: each gives the weight it promises, the layer's methods switch them, and a new
source is one class."""
from __future__ import annotations

import torch
from torch import nn

from diffq.export import export_quantized, load_quantized
from diffq.finetune.lora import attach_adapter
from diffq.formats import IntFormat
from diffq.layers import dequantize_layer_, layer_table, quantize_layer_
from diffq.methods.adaround import AdaRound, HeldRounding
from diffq.quantizer import Quantizer
from diffq.rollback import ModuleSnapshot
from diffq.weight_sources import (
    FloatWeight,
    FrozenWeight,
    HeldLearnedRounding,
    PackedCodes,
    RoundToNearest,
    TrainedRounding,
    WeightSource,
)
from tests.helpers import outputs, quantized_copy


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(24, 16)
    wq = Quantizer(IntFormat(4), kind="weight", granularity="channel")
    quantize_layer_(layer, wq, None)
    wq.calibrate_weight(layer.weight)
    return layer


def _learned(layer: nn.Linear) -> torch.Tensor:
    """A learned rounding of the layer's weight that often disagrees with round-to-nearest."""
    r = AdaRound(layer.weight_quantizer, layer.weight)
    with torch.no_grad():
        r.V.normal_(0, 3)
    return r.hard()


def test_round_to_nearest_quantizes_the_latent_weight_live():
    layer = _layer()
    assert isinstance(layer.weight_source, RoundToNearest) and not layer.frozen
    assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight))
    lora = attach_adapter(layer, 2, 2.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.B.normal_(0, 0.1)
    latent = layer.latent_weight()
    assert not torch.equal(latent, layer.weight)  # the adapter modifies what the live source quantizes
    assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(latent))


def test_frozen_weight_returns_its_cache_and_stops_following_the_weight():
    layer = _layer()
    rtn = layer.weight_quantizer(layer.weight).detach()
    layer.freeze()
    assert isinstance(layer.weight_source, FrozenWeight) and layer.frozen and not layer.learned_rounding
    assert layer.quantized_weight() is layer.weight_fq and torch.equal(layer.weight_fq, rtn)
    with torch.no_grad():
        layer.weight.mul_(3)
    assert torch.equal(layer.quantized_weight(), rtn)
    layer.unfreeze()  # live again: follows the edited weight
    assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight))


def test_a_frozen_cache_follows_the_layer_to_another_dtype():
    layer = _layer()
    layer.freeze()
    layer.to(torch.float64)
    assert layer.weight_fq.dtype == torch.float64


def test_float_weight_is_the_latent_weight():
    torch.manual_seed(0)
    layer = quantize_layer_(nn.Linear(8, 4), None, None)
    assert isinstance(layer.weight_source, FloatWeight)
    assert torch.equal(layer.quantized_weight(), layer.weight)
    layer.freeze()  # nothing to freeze without a weight quantizer
    assert isinstance(layer.weight_source, FloatWeight)


def test_trained_rounding_gives_the_soft_rounding_and_is_not_exported_as_learned():
    layer = _layer()
    ada = AdaRound(layer.weight_quantizer, layer.weight)
    previous = layer.train_rounding(ada)
    assert isinstance(previous, RoundToNearest) and isinstance(layer.weight_source, TrainedRounding)
    assert layer.rounding is ada and not layer.learned_rounding and layer.weight_fq is None
    assert torch.equal(layer.quantized_weight(), ada())
    layer.use_source(previous)
    assert layer.rounding is None and layer.weight_source is previous


def test_held_rounding_returns_the_held_grid_values():
    layer = _layer()
    hard = _learned(layer)
    held = HeldRounding(layer.weight_quantizer, layer.weight, hard)
    layer.hold_rounding(held)
    assert isinstance(layer.weight_source, HeldLearnedRounding) and layer.rounding is held
    assert layer.learned_rounding and not layer.frozen  # an export stores these values, not RTN of the weight
    assert torch.equal(layer.quantized_weight(), hard)
    assert not torch.equal(hard, layer.weight_quantizer(layer.weight))


def test_cache_weight_keeps_learned_grid_values():
    layer = _layer()
    hard = _learned(layer)
    layer.cache_weight(hard, learned=True)
    assert layer.frozen and layer.learned_rounding and torch.equal(layer.quantized_weight(), hard)


def test_the_old_attributes_install_the_matching_source():
    layer = _layer()
    hard = _learned(layer)
    layer.weight_fq = hard
    assert isinstance(layer.weight_source, FrozenWeight) and not layer.learned_rounding
    layer.learned_rounding = True
    assert layer.learned_rounding and layer.weight_fq is hard
    layer.weight_fq = None
    assert isinstance(layer.weight_source, RoundToNearest) and not layer.learned_rounding
    ada = AdaRound(layer.weight_quantizer, layer.weight)
    layer.rounding = ada
    assert isinstance(layer.weight_source, TrainedRounding) and "rounding" not in layer._modules
    layer.rounding = None
    assert isinstance(layer.weight_source, RoundToNearest)


def test_packed_codes_equal_the_unpacked_weights_bit_exactly(tmp_path):
    _, model, specs, calib = quantized_copy("sd", weight={"format": "int", "bits": 4, "granularity": "channel"},
                                            act={"format": "none"})
    export_quantized(model, specs, tmp_path)
    unpacked, packed = layer_table(load_quantized(tmp_path)), layer_table(load_quantized(tmp_path, packed=True))
    sources = {n: m.weight_source for n, m in packed.items()}
    assert any(isinstance(s, PackedCodes) for s in sources.values())
    for n, s in sources.items():
        if isinstance(s, PackedCodes):
            layer = packed[n]
            assert layer.packed is s.packed and layer.weight.numel() == 0
            assert layer.weight_shape == tuple(unpacked[n].weight.shape)
            assert torch.equal(layer.quantized_weight(), unpacked[n].quantized_weight())


class _Doubled(WeightSource):
    """A source no library code knows: twice the latent weight."""

    def weight(self, layer: nn.Module) -> torch.Tensor:
        return 2 * layer.latent_weight()


def test_a_new_source_is_one_class_and_is_what_the_forward_uses():
    layer = _layer()
    layer.use_source(_Doubled())
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), nn.functional.linear(x, 2 * layer.weight, layer.bias))
    conv = nn.Conv2d(4, 6, 3)
    quantize_layer_(conv, None, None).use_source(_Doubled())
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(conv(x), nn.functional.conv2d(x, 2 * conv.weight, conv.bias))


def test_float_mode_bypasses_the_source():
    layer = _layer()
    layer.use_source(_Doubled())
    layer.quant_enabled = False
    x = torch.randn(3, 24)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_a_rollback_puts_the_previous_source_back():
    layer = _layer()
    model = nn.Sequential(layer)
    live = layer.weight_source
    snapshot = ModuleSnapshot(model)
    layer.freeze()
    layer.cache_weight(_learned(layer), learned=True)
    assert snapshot.restore() == []
    assert layer.weight_source is live and not layer.frozen and not layer.learned_rounding
    assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight))


def test_dequantize_drops_the_source():
    layer = _layer()
    layer.freeze()
    dequantize_layer_(layer)
    assert type(layer) is nn.Linear and "weight_source" not in layer._modules
    assert not any(isinstance(m, WeightSource) for m in layer.modules())


def test_exports_of_a_model_with_sources_switched_back_are_unchanged(tmp_path):
    _, model, specs, calib = quantized_copy("sd")
    layer = next(m for m in layer_table(model).values() if m.weight_quantizer is not None)
    previous = layer.train_rounding(AdaRound(layer.weight_quantizer, layer.weight))
    layer.use_source(previous)
    export_quantized(model, specs, tmp_path)
    for a, b in zip(outputs(model, calib), outputs(load_quantized(tmp_path), calib)):
        assert torch.equal(a, b)
