"""AdaRound: learned up/down rounding of a layer's weight on its quantizer's grid (INT or FP).

``W~ = s * clamp(down(W/s) + h(V) * (up - down))`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1, where
down/up are the grid neighbours of ``W/s`` (integers for INT; for FP each weight's own step, so
the same code learns rounding on FP grids). ``h`` starts at the fractional position of ``W/s``
between its neighbours, so the initial soft weight is the FP weight (clamped to the grid's
range); the regulariser ``sum(1 - |2h - 1|^beta)`` pushes ``h`` to 0 or 1; the final weight
rounds up where ``V >= 0``. Scale-aware variant (FP4DiT): the trained variable is ``V' = s * V``
with ``s`` each weight's absolute grid step, so a weight's rounding moves at a speed inverse to its
step (small FP steps near zero would otherwise learn as slowly as the coarse ones).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from diffq.errors import ConfigError
from diffq.formats import FPFormat, IntFormat
from diffq.quantizer import Quantizer

ZETA, GAMMA = 1.1, -0.1


def clamp_grid(fmt: IntFormat | FPFormat, grid: Tensor, params: dict[str, Tensor]) -> Tensor:
    """Grid values (in units of the scale) clamped to what ``fmt`` represents (with its zero point)."""
    if isinstance(fmt, IntFormat):
        zero = params.get("zero_point")
        q = grid if zero is None else grid + zero
        q = q.clamp(fmt.qmin, fmt.qmax)
        return q if zero is None else q - zero
    return grid.clamp(-fmt.maxval, fmt.maxval)


class AdaRound(nn.Module):
    """Learnable rounding of one weight tensor under a calibrated (static) weight quantizer."""

    def __init__(self, quantizer: Quantizer, weight: Tensor, scale_aware: bool = False):
        super().__init__()
        fmt = quantizer.fmt
        if not isinstance(fmt, (IntFormat, FPFormat)) or quantizer.dynamic:
            raise ConfigError(f"learned rounding needs a static int or fp weight quantizer; {quantizer.extra_repr()} "
                              "is not one: use quant.weight.format=int or fp, or quant.recon=none")
        self.quantizer = quantizer
        self.shape = tuple(weight.shape)
        with torch.no_grad():
            v = quantizer.view(weight.detach())
            params = {k: t.detach() for k, t in quantizer.qparams(v).items()}
            y = v * (1.0 / params["scale"])
            down, up = fmt.grid_neighbors(y)
            step = up - down
            frac = torch.where(step > 0, (y - down) / step.clamp_min(1e-12), torch.zeros_like(y)).clamp(0, 1)
            # h(V0) = frac: invert the rectified sigmoid (clamped away from its flat ends)
            p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
            v0 = torch.log(p / (1 - p))
            v_scale = torch.where(step > 0, step * params["scale"], torch.ones_like(step)) if scale_aware else None
        self.register_buffer("down", down)
        self.register_buffer("step", step)
        self.register_buffer("v_scale", v_scale)
        self.params = params
        self.dtype = weight.dtype
        self.V = nn.Parameter(v0 if v_scale is None else v0 * v_scale)

    def logits(self) -> Tensor:
        """``V`` (the trained variable divided by each weight's step in the scale-aware variant)."""
        return self.V if self.v_scale is None else self.V / self.v_scale

    def h(self) -> Tensor:
        """Soft rounding in [0, 1] per weight."""
        return (torch.sigmoid(self.logits()) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2h - 1|^beta)``: zero when every h is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def _dequant(self, grid: Tensor) -> Tensor:
        return self.quantizer.unview(clamp_grid(self.quantizer.fmt, grid, self.params) * self.params["scale"],
                                     self.shape)

    def forward(self, weight: Tensor | None = None) -> Tensor:
        """The soft-rounded fake-quant weight (``weight`` is ignored: the grid neighbours are fixed)."""
        return self._dequant(self.down + self.h() * self.step).to(self.dtype)

    @torch.no_grad()
    def hard(self) -> Tensor:
        """The final weight: up where ``V >= 0``, else down; every value on the grid."""
        return self._dequant(self.down + (self.logits() >= 0).float() * self.step)


class HeldRounding(nn.Module):
    """A learned rounding kept while the FP weight trains again (QuEST's code: the latent weight with
    the AdaRound bit frozen): ``Q(W) = s * clamp(down(W/s) + b * (up - down))`` with ``b`` each weight's
    learned up/down bit, straight-through to ``W`` and to the quantizer's parameters. At the weight it
    was learned on it gives the learned rounding exactly; once ``W`` moves past a grid point its code
    moves with it (``down`` changes, ``b`` stays), so finetuning after a reconstruction can change codes."""

    def __init__(self, quantizer: Quantizer, weight: Tensor, rounded: Tensor) -> None:
        super().__init__()
        if not isinstance(quantizer.fmt, (IntFormat, FPFormat)) or quantizer.dynamic:
            raise ConfigError(f"a held rounding needs a static int or fp weight quantizer, not "
                              f"{quantizer.extra_repr()}")
        self.quantizer = quantizer
        with torch.no_grad():
            params = quantizer.qparams(quantizer.view(weight))
            down, up = quantizer.fmt.grid_neighbors(quantizer.view(weight) * (1.0 / params["scale"]))
            grid = quantizer.view(rounded) * (1.0 / params["scale"])
            step = up - down
            bit = torch.where(step > 0, (grid - down) / step.clamp_min(1e-12), torch.zeros_like(step))
        self.register_buffer("bit", bit.round().clamp(0, 1))

    def forward(self, weight: Tensor) -> Tensor:
        """The held-rounding fake-quant weight of ``weight`` (gradient: straight-through)."""
        q = self.quantizer
        v = q.view(weight)
        params = q.qparams(v)
        y = v * (1.0 / params["scale"])  # as AdaRound divides: the same neighbours at the same weight
        down, up = q.fmt.grid_neighbors(y.detach())
        target = down + self.bit * (up - down)
        grid = clamp_grid(q.fmt, target, params)
        y = grid + (y - y.detach()) * (grid == target)  # value: the grid; gradient: identity inside its range
        return q.unview(y * params["scale"], tuple(weight.shape)).to(weight.dtype)


def beta_schedule(step: int, total: int, warmup: float, start: float, end: float) -> float | None:
    """Beta of the rounding regulariser, decayed linearly from ``start`` to ``end`` after the
    warm-up (BRECQ's LinearTempDecay); None during the warm-up (regulariser off)."""
    first = int(warmup * total)
    if step < first:
        return None
    return end + (start - end) * max(0.0, 1 - (step - first) / max(1, total - first))
