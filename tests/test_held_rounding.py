"""Finetuning after a learned rounding: the rounding's bits are held while the FP weight trains
underneath (QuEST's code), so codes move once a weight crosses a grid point."""
from __future__ import annotations

import pytest
import torch

from diffq.finetune.select import select_trainable
from diffq.formats import FPFormat, IntFormat
from diffq.layers import is_quant_layer
from diffq.methods.adaround import AdaRound, HeldRounding
from diffq.methods.reconstruct import reconstruct
from diffq.quantizer import Quantizer
from tests.helpers import A8, quantized_copy
from tests.test_reconstruct import QUICK, W4


def _learned(fmt, symmetric: bool = True) -> tuple[Quantizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    w = torch.randn(16, 24) * torch.rand(16, 1)
    q = Quantizer(fmt, kind="weight", granularity="channel", symmetric=symmetric)
    q.calibrate_weight(w)
    r = AdaRound(q, w)
    with torch.no_grad():
        r.V.normal_(0, 3)  # a learned rounding that often disagrees with nearest
    return q, w, r.hard()


@pytest.mark.parametrize("fmt,symmetric", [(IntFormat(4), True), (IntFormat(3, signed=False), False),
                                           (FPFormat(2, 1), True)])
def test_held_rounding_reproduces_the_learned_one_and_moves_codes_with_the_weight(fmt, symmetric):
    q, w, hard = _learned(fmt, symmetric)
    held = HeldRounding(q, w, hard)
    assert torch.equal(held(w), hard)  # at the weight it was learned on: the learned rounding, bit-exact
    assert not torch.equal(hard, q(w))  # (which is not round-to-nearest)
    moved = w.clone()
    moved[0, 0] += 4 * float(q.params()["scale"][0].max())  # a few grid steps up
    out = held(moved)
    assert out[0, 0] > hard[0, 0]  # that weight's code moved with it...
    rest = torch.ones_like(w, dtype=torch.bool)
    rest[0, 0] = False
    assert torch.equal(out[rest], hard[rest])  # ...and every other weight keeps its learned rounding
    assert torch.equal(q(out), out)  # still on the grid


def test_held_rounding_is_straight_through_inside_the_grid():
    q, w, hard = _learned(IntFormat(4))
    held = HeldRounding(q, w, hard)
    x = w.clone().requires_grad_(True)
    held(x).sum().backward()
    inside = (q.view(w) / q.params()["scale"]).abs() < 6.5
    assert torch.allclose(x.grad.reshape(inside.shape)[inside], torch.ones(()), atol=1e-6)


def test_finetuning_after_a_reconstruction_changes_codes_and_keeps_the_rest():
    """A move of 0.3 grid steps flips no code of a weight sitting on the grid (what finetuning started
    from before); from the held FP weight it flips exactly the weights within 0.3 steps of a grid point."""
    _, model, _, calib = quantized_copy("sd", weight=W4, act=A8)
    reconstruct(model, calib, QUICK, "block", device=torch.device("cpu"), dtype=torch.float32)
    layers = {n: m for n, m in model.named_modules() if is_quant_layer(m) and m.learned_rounding}
    name, layer = next(iter(layers.items()))
    learned = layer.weight_fq.clone()
    sel = select_trainable(model, {name: ("weight",)})
    assert isinstance(layer.rounding, HeldRounding) and torch.equal(layer.quantized_weight(), learned)
    scale = layer.weight_quantizer.params()["scale"].reshape(-1, 1)
    rows = layer.weight.detach().reshape(len(scale), -1)
    frac = rows / scale - torch.floor(rows / scale)
    with torch.no_grad():  # what an optimiser step of 0.3 grid steps up does
        layer.weight.view(len(scale), -1).add_(0.3 * scale)
    sel.finish()
    assert layer.learned_rounding and layer.rounding is None
    changed = (layer.weight_fq != learned).reshape(len(scale), -1)
    crossing = frac > 0.7 + 1e-4
    assert changed.float().mean() > 0.1  # codes moved
    assert not changed[frac < 0.7 - 1e-4].any()  # the weights that crossed no grid point kept their rounding
    assert changed[crossing & (rows.abs() < 6 * scale)].all()  # and those that crossed one moved
    assert torch.equal(layer.weight_quantizer(layer.weight_fq), layer.weight_fq)
    moved, held = sel.codes_moved  # what the stage reports
    assert held == learned.numel() and moved == int(changed.sum())
