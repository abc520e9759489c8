"""Integer grids: signed narrow range or unsigned with a zero point."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffq.errors import ConfigError
from diffq.formats.base import EPS, Format, container, scaled_copy
from diffq.formats.registry import FORMATS, FormatKind


@dataclass(frozen=True)
class IntFormat(Format):
    """Integer grid: signed narrow ``[-(2^(b-1)-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.

    Codes: signed values are stored as ``bits``-wide two's complement, unsigned as themselves.
    Unsigned grids are the asymmetric ones (with a zero point).
    """

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(
                f"int bits must be in 2..8 (got {self.bits}); use bits>=16 to keep the layer floating point"
            )

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def element_bits(self) -> float:
        return float(self.bits)

    @property
    def storage_bits(self) -> int:
        return container(self.bits)

    @property
    def qmin(self) -> int:
        """Smallest integer code value."""
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer code value."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def maxval(self) -> float:
        return float(self.qmax)

    def round(self, y: Tensor) -> Tensor:
        return torch.round(y.float()).clamp(self.qmin, self.qmax)

    def grid_neighbors(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(largest grid value <= y, smallest > it): the two choices of learned rounding (unclamped)."""
        down = torch.floor(y.float())
        return down, down + 1

    def to_codes(self, q: Tensor) -> Tensor:
        return (q.to(torch.int16) & (2**self.bits - 1)).to(torch.uint8)

    def from_codes(self, codes: Tensor) -> Tensor:
        c = codes.to(torch.int16)
        if self.signed:
            c = c - ((c >> (self.bits - 1)) & 1) * 2**self.bits
        return c.float()

    def check_usage(self, *, kind: str, granularity: str, symmetric: bool, observer: str) -> None:
        super().check_usage(kind=kind, granularity=granularity, symmetric=symmetric or not self.signed,
                            observer=observer)

    def param_names(self, symmetric: bool) -> tuple[str, ...]:
        return ("scale",) if symmetric else ("scale", "zero_point")

    def params_from_range(self, lo: Tensor, hi: Tensor, symmetric: bool,
                          given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        if symmetric:
            return super().params_from_range(lo, hi, symmetric)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(EPS)
        zero_point = (self.qmin - torch.round(lo / scale)).clamp(self.qmin, self.qmax)
        return {"scale": scale, "zero_point": zero_point}

    def to_grid(self, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Integer codes (zero point included); STE inside ``[qmin, qmax]``, zero gradient outside."""
        y = v * (1.0 / params["scale"])
        q = torch.round(y.detach())
        if "zero_point" in params:
            q.add_(params["zero_point"])
        inside = (q >= self.qmin) & (q <= self.qmax) if y.requires_grad else None
        q.clamp_(self.qmin, self.qmax)
        return q if inside is None else q + (y - y.detach()) * inside

    def dequant(self, q: Tensor, params: dict[str, Tensor]) -> Tensor:
        if q.requires_grad:
            q = q - params["zero_point"] if "zero_point" in params else q
            return q * params["scale"]
        if "zero_point" in params:
            q.sub_(params["zero_point"])
        return q.mul_(params["scale"])

    def fast_fake_quant(self, x: Tensor, scale: float, inv: float, zero_point: float | None) -> Tensor | None:
        """Round, clamp, rescale in place on one buffer. With a zero point the clamp takes the shifted range
        (``round(y) + z`` clamped, minus ``z``, is ``round(y)`` clamped to ``[qmin - z, qmax - z]``), and adding
        0.0 turns a rounded negative's -0.0 into the +0.0 that subtracting the zero point gives."""
        q = scaled_copy(x, inv).round_()
        if zero_point is None:
            return q.clamp_(self.qmin, self.qmax).mul_(scale)
        return q.clamp_(self.qmin - zero_point, self.qmax - zero_point).mul_(scale).add_(0.0)


def _build(bits: int, exp: int | None, man: int | None, symmetric: bool) -> IntFormat:
    return IntFormat(bits, signed=symmetric)


FORMATS.register("int")(FormatKind(_build, r"(?P<u>u?)int(?P<bits>\d+)",
                                   lambda m: IntFormat(int(m["bits"]), signed=not m["u"]),
                                   ("int8", "uint8", "int4"), float_from_bits=16, symmetric_only=False))
