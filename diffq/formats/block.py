"""Block formats: E2M1 elements sharing one scale per block (NVFP4, MXFP4)."""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from diffq.errors import ConfigError
from diffq.formats.base import Format
from diffq.formats.floating import FPFormat
from diffq.formats.registry import FORMATS, FormatKind

_E2M1 = FPFormat(2, 1)
_E4M3 = FPFormat(4, 3)


class BlockFormat(Format):
    """E2M1 elements sharing one scale per ``block_size`` consecutive elements."""

    block_size: int

    @property
    def element_bits(self) -> float:
        return 4.0

    @property
    def storage_bits(self) -> int:
        return 4

    @property
    def maxval(self) -> float:
        return 6.0

    def round(self, y: Tensor) -> Tensor:
        return _E2M1.round(y)

    def to_codes(self, q: Tensor) -> Tensor:
        return _E2M1.to_codes(q)

    def from_codes(self, codes: Tensor) -> Tensor:
        return _E2M1.from_codes(codes)

    def bits_per_element(self, group_size: int | None = None, scale_bits: int = 16, zero_bits: int = 0,
                         stored: bool = False) -> float:
        """4 + 8 scale bits / block size; the arguments are ignored (the format fixes both)."""
        return 4.0 + 8.0 / self.block_size

    @abstractmethod
    def block_scales(self, amax_block: Tensor, amax_tensor: Tensor | None) -> Tensor:
        """Per-block fp32 scale (already quantized to the scale format); never 0, NaN or Inf."""

    def check_usage(self, *, kind: str, granularity: str, symmetric: bool, observer: str) -> None:
        if granularity != "block":
            raise ConfigError(
                f"format {self.name} with granularity {granularity!r}: block formats (nvfp4, mxfp4) need "
                "granularity=block and granularity=block needs a block format; use group:<g> otherwise"
            )
        if observer != "minmax":
            raise ConfigError(f"{self.name} sets its block scales from the block max; use observer=minmax")
        if not symmetric:
            raise ConfigError(f"asymmetric quantization needs an unsigned int format (got {self.name}); "
                              "set symmetric=true")

    def params_from_range(self, lo: Tensor, hi: Tensor, symmetric: bool,
                          given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        amax = torch.maximum(-lo, hi)
        return {"scale": self.block_scales(amax, amax.amax())}


@dataclass(frozen=True)
class NVFP4Format(BlockFormat):
    """NVFP4: block 16, E4M3 block scale times an fp32 tensor scale ``amax / (6 * 448)``."""

    block_size: int = 16

    @property
    def name(self) -> str:
        return "nvfp4"

    def tensor_scale(self, amax_tensor: Tensor) -> Tensor:
        """fp32 second-level scale ``amax / (6 * 448)`` (amax floored at 1e-12)."""
        return amax_tensor.float().clamp_min(1e-12) / (6.0 * 448.0)

    def block_scales(self, amax_block: Tensor, amax_tensor: Tensor | None) -> Tensor:
        """``e4m3(amax_block / 6 / ts) * ts``; the e4m3 factor is floored at its smallest subnormal
        2^-9, so all-zero (or underflowing) blocks keep a positive scale and quantize to 0."""
        if amax_tensor is None:
            amax_tensor = amax_block.amax()
        ts = self.tensor_scale(amax_tensor)
        ratio = (amax_block.float() / 6.0 / ts).clamp(2.0**-9, 448.0)
        return _E4M3.round(ratio) * ts

    def param_names(self, symmetric: bool) -> tuple[str, ...]:
        return ("scale", "tensor_scale")

    def calibrated_params(self, kind: str) -> tuple[str, ...]:
        """Activations: the second-level scale is calibrated (static, as ModelOpt does), so an
        image's output does not depend on its batch companions; block scales stay per call."""
        return ("tensor_scale",) if kind == "act" else ()

    def params_from_range(self, lo: Tensor, hi: Tensor, symmetric: bool,
                          given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        amax = torch.maximum(-lo, hi)
        if given and "tensor_scale" in given:
            ts = given["tensor_scale"]
            return {"scale": self.block_scales(amax, ts * (6.0 * 448.0)), "tensor_scale": ts}
        return {"scale": self.block_scales(amax, amax.amax()), "tensor_scale": self.tensor_scale(amax.amax())}

    def to_storage(self, params: dict[str, Tensor], half: torch.dtype) -> dict[str, Tensor]:
        """E4M3 block factors (``scale / tensor_scale``) and the fp32 tensor scale."""
        ts = params["tensor_scale"].float()
        return {"scale": (params["scale"] / ts).to(torch.float8_e4m3fn), "tensor_scale": ts}

    def from_storage(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        ts = stored["tensor_scale"].float()
        return {"scale": stored["scale"].float() * ts, "tensor_scale": ts}


@dataclass(frozen=True)
class MXFP4Format(BlockFormat):
    """MXFP4 (OCP MX): block 32, E8M0 scale ``2^(floor(log2 amax) - 2)``; values in (6, 8)·scale clip to 6."""

    block_size: int = 32

    @property
    def name(self) -> str:
        return "mxfp4"

    def block_scales(self, amax_block: Tensor, amax_tensor: Tensor | None = None) -> Tensor:
        """Power-of-two scale per block (E8M0 range 2^-127..2^127; an all-zero block gets 2^-3)."""
        e = (torch.frexp(amax_block.float()).exponent - 1 - 2).clamp(-127, 127)
        return torch.ldexp(torch.ones_like(amax_block, dtype=torch.float32), e)

    def to_storage(self, params: dict[str, Tensor], half: torch.dtype) -> dict[str, Tensor]:
        """E8M0: the biased exponent of each power-of-two block scale, one byte."""
        return {"scale": (torch.frexp(params["scale"].float()).exponent - 1 + 127).to(torch.uint8)}

    def from_storage(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        e = stored["scale"].to(torch.int32) - 127
        return {"scale": torch.ldexp(torch.ones_like(e, dtype=torch.float32), e)}


FORMATS.register("nvfp4")(FormatKind(lambda bits, exp, man, symmetric: NVFP4Format(), "nvfp4",
                                     lambda m: NVFP4Format(), ("nvfp4",)))
FORMATS.register("mxfp4")(FormatKind(lambda bits, exp, man, symmetric: MXFP4Format(), "mxfp4",
                                     lambda m: MXFP4Format(), ("mxfp4",)))
