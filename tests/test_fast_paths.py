"""The fast fake-quant paths of static per-tensor activations are bit-exact with the generic formula
(every format with one, float32 / float16 / bfloat16 inputs, ties and values beyond the range) and
are never taken when a gradient is needed."""
from __future__ import annotations

import pytest
import torch

from diffq.formats import make_format
from diffq.quantizer import Quantizer

FORMATS = [("int", 8, True), ("int", 8, False), ("int", 4, False), ("fp", 8, True), ("fp", 4, True)]
LAYOUTS = {("fp", 8): [(4, 3), (5, 2), (3, 4)], ("fp", 4): [(2, 1)]}


def _cases():
    for kind, bits, sym in FORMATS:
        for exp_man in LAYOUTS.get((kind, bits), [None]):
            yield kind, bits, sym, exp_man


def _quantizer(kind: str, bits: int, symmetric: bool, exp_man, x: torch.Tensor) -> Quantizer:
    kw = {} if exp_man is None else {"exp": exp_man[0], "man": exp_man[1]}
    fmt = make_format(kind, bits, symmetric=symmetric, **kw)
    q = Quantizer(fmt, kind="act", granularity="tensor", symmetric=symmetric)
    q.begin_calibration()
    q(x[: x.shape[0] // 2])  # a range narrower than the data: values beyond it clamp
    q.end_calibration()
    return q


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 16, 16, generator=g) * 3
    x[0, 0, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.0, -0.0, 1e-30])  # ties, zeros, tiny
    x[-1, -1, -1, :4] = torch.tensor([1e4, -1e4, 400.0, -300.0])  # far beyond the calibrated range
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: f"{c[0]}{c[1]}{'' if c[2] else 'u'}{c[3] or ''}")
def test_fast_path_is_bit_exact_with_the_formula(case, dtype):
    kind, bits, symmetric, exp_man = case
    x = _inputs(dtype)
    q = _quantizer(kind, bits, symmetric, exp_man, x.float())
    params = {k: t.reshape(()) for k, t in q.params().items()}
    # on tensors whose ties sit exactly at the grid's half steps
    tie = (torch.arange(-40, 41, dtype=torch.float32) * 0.5 * params["scale"]).to(dtype)
    for inp in (x, tie):
        expected = q.fmt.fake_quant(inp.float(), params).to(dtype)
        assert q._fast_fake_quant(inp) is not None  # the fast path applies here
        out = q(inp)
        assert out.dtype == dtype and torch.equal(out, expected)
        assert torch.equal(torch.signbit(out), torch.signbit(expected))  # -0.0 where the formula gives it


def test_fast_path_is_skipped_when_a_gradient_is_needed():
    x = _inputs(torch.float32)
    q = _quantizer("int", 8, False, None, x)
    xg = x.clone().requires_grad_(True)
    assert q._fast_fake_quant(xg) is None
    out = q(xg)
    out.sum().backward()
    assert xg.grad is not None and torch.equal(out.detach(), q(x))  # STE gradient, same values
    q.make_learnable()
    assert q._fast_fake_quant(x) is None  # the learnable scale needs its gradient
    with torch.no_grad():
        assert q._fast_fake_quant(x) is not None


def test_cached_scalars_follow_parameter_changes():
    x = _inputs(torch.float32)
    q = _quantizer("int", 8, True, None, x)
    first = q(x)
    q.set_params(scale=q.scale * 2)
    second = q(x)
    assert not torch.equal(first, second)
    with torch.no_grad():
        q.scale.mul_(0.5)  # an in-place write
    assert torch.equal(q(x), first)
