"""BitNet b1.58 ternary grid {-1, 0, 1} with BitNet's identity straight-through gradient."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffq.formats.base import Format
from diffq.formats.registry import FORMATS, FormatKind


@dataclass(frozen=True)
class TernaryFormat(Format):
    """Grid {-1, 0, 1}; codes ``q + 1`` in 2 bits (log2(3) bits of information)."""

    @property
    def name(self) -> str:
        return "ternary"

    @property
    def element_bits(self) -> float:
        return math.log2(3)

    @property
    def storage_bits(self) -> int:
        return 2

    @property
    def maxval(self) -> float:
        return 1.0

    def round(self, y: Tensor) -> Tensor:
        return torch.round(y.float()).clamp(-1.0, 1.0)

    def to_grid(self, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Ternary values; the gradient passes straight through everywhere (BitNet's STE: weights
        beyond the clip range keep learning instead of freezing)."""
        y = v * (1.0 / params["scale"])
        q = self.round(y.detach())
        return q + (y - y.detach()) if y.requires_grad else q

    def to_codes(self, q: Tensor) -> Tensor:
        return (q + 1).to(torch.uint8)

    def from_codes(self, codes: Tensor) -> Tensor:
        return codes.float() - 1.0


FORMATS.register("ternary")(FormatKind(lambda bits, exp, man, symmetric: TernaryFormat(), "ternary",
                                       lambda m: TernaryFormat(), ("ternary",)))
