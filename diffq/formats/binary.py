"""BinaryDM multi-basis binarisation with learnable per-channel scales."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diffq.errors import ConfigError
from diffq.formats.base import Format, container
from diffq.formats.registry import FORMATS, FormatKind


@dataclass(frozen=True)
class BinaryFormat(Format):
    """BinaryDM multi-basis binarisation ``Σ_i σ_i·sign(r_i)``, ``r_{i+1} = r_i - σ_i·sign(r_i)``.

    Not a scaled grid: ``round`` is one sign basis and the parameters are learnable per-output-channel
    ``sigma`` [bases, out], initialised from the weight itself (``params_from_tensor``). Codes pack
    the ``bases`` sign bits of one weight (bit i set = basis i positive); ``to_codes`` takes signs
    [bases, ...], ``from_codes`` returns them. ``bits`` in a config is the number of bases.
    """

    bases: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.bases <= 4:
            raise ConfigError(f"binary bits (= sign bases) must be in 1..4 (got {self.bases}); BinaryDM uses 1 or 2")

    @property
    def name(self) -> str:
        return f"binary{self.bases}"

    @property
    def element_bits(self) -> float:
        return float(self.bases)

    @property
    def storage_bits(self) -> int:
        return container(self.bases)

    @property
    def maxval(self) -> float:
        return 1.0

    def round(self, y: Tensor) -> Tensor:
        return torch.where(y >= 0, 1.0, -1.0).float()

    def bits_per_element(self, group_size: int | None, scale_bits: int = 16, zero_bits: int = 0,
                         stored: bool = False) -> float:
        """``bases`` sign bits (``stored``: their packed width) plus ``bases`` scales per ``group_size``
        (row) elements."""
        signs = float(self.storage_bits if stored else self.bases)
        return signs if group_size is None else signs + self.bases * scale_bits / group_size

    def signs(self, w2d: Tensor, sigma: Tensor) -> Tensor:
        """Sign of each basis' residual, [bases, out, K] in {-1, +1} (sign(0) = +1)."""
        r = w2d.detach().float()
        out = []
        for s in sigma.detach().float():
            b = self.round(r)
            out.append(b)
            r = r - s[:, None] * b
        return torch.stack(out)

    def combine(self, signs: Tensor, sigma: Tensor) -> Tensor:
        """``Σ_i sigma_i[:, None] * signs_i``, summed in basis order."""
        out = sigma[0][:, None] * signs[0]
        for s, b in zip(sigma[1:], signs[1:]):
            out = out + s[:, None] * b
        return out

    def binarize(self, w2d: Tensor, sigma: Tensor) -> Tensor:
        """Binarised ``w2d`` [out, K]; clipped STE to ``w2d`` (zero where |w| > 1), true gradient to ``sigma``."""
        out = self.combine(self.signs(w2d, sigma), sigma)
        if w2d.requires_grad:
            out = out + (w2d - w2d.detach()) * (w2d.detach().abs() <= 1.0)
        return out

    def init_sigma(self, w2d: Tensor) -> Tensor:
        """Per-channel mean |residual| of each basis, [bases, out]."""
        r = w2d.detach().float()
        sigmas = []
        for _ in range(self.bases):
            s = r.abs().mean(dim=1)
            sigmas.append(s)
            r = r - s[:, None] * self.round(r)
        return torch.stack(sigmas)

    def to_codes(self, q: Tensor) -> Tensor:
        weights = (2 ** torch.arange(self.bases, dtype=torch.int32, device=q.device)).view(-1, *([1] * (q.dim() - 1)))
        return ((q > 0).to(torch.int32) * weights).sum(0).to(torch.uint8)

    def from_codes(self, codes: Tensor) -> Tensor:
        shifts = torch.arange(self.bases, dtype=torch.int32, device=codes.device).view(-1, *([1] * codes.dim()))
        return ((codes.to(torch.int32)[None] >> shifts) & 1).float() * 2.0 - 1.0

    # ------------------------------------------------------- quantizer-facing
    def check_usage(self, *, kind: str, granularity: str, symmetric: bool, observer: str) -> None:
        if kind != "weight" or granularity != "channel":
            raise ConfigError(f"{self.name} quantizes weights per output channel; use kind=weight, granularity=channel")
        super().check_usage(kind=kind, granularity=granularity, symmetric=symmetric, observer=observer)

    def param_names(self, symmetric: bool) -> tuple[str, ...]:
        return ("sigma",)

    def params_from_tensor(self, v: Tensor) -> dict[str, Tensor]:
        """``sigma`` of the grouped weight view ``v`` (see :meth:`init_sigma`)."""
        return {"sigma": self.init_sigma(v.reshape(v.shape[0], -1))}

    def fake_quant(self, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        return self.binarize(v.reshape(v.shape[0], -1), params["sigma"]).reshape(v.shape)

    def encode(self, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        return self.to_codes(self.signs(v.reshape(v.shape[0], -1), params["sigma"]))

    def decode(self, codes: Tensor, params: dict[str, Tensor], view_shape: tuple[int, int, int]) -> Tensor:
        return self.combine(self.from_codes(codes), params["sigma"]).reshape(view_shape)



FORMATS.register("binary")(FormatKind(lambda bits, exp, man, symmetric: BinaryFormat(bits), r"binary(?P<bits>\d)",
                                      lambda m: BinaryFormat(int(m["bits"])), ("binary2",)))
