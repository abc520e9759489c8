"""The Format interface: a normalised grid, its scale parameters, its fake-quant with its own
gradient rule, its storage codes and its bit cost."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffq.errors import ConfigError

EPS = 1e-12  # smallest scale: all-zero channels quantize to exact zeros, 1/scale stays finite


def ceil_to(v: Tensor, dtype: torch.dtype) -> Tensor:
    """``v`` (positive) rounded up to ``dtype`` (a scale never shrinks the range it covers), within its range."""
    r = v.clamp(max=torch.finfo(dtype).max).to(dtype)
    return torch.where(r.float() < v, torch.nextafter(r, torch.full_like(r, float("inf"))), r)


def scaled_copy(x: Tensor, inv: float) -> Tensor:
    """``x.float() * inv`` in a new float32 buffer (one pass when ``x`` is float32), the start of the fast paths."""
    return x * inv if x.dtype == torch.float32 else x.float().mul_(inv)


def container(bits: int) -> int:
    """Smallest packing width in (1, 2, 4, 8) that holds ``bits``-bit codes."""
    return next(w for w in (1, 2, 4, 8) if w >= bits)


class Format(ABC):
    """A number format over a scaled grid: ``x ~ scale * grid_value``.

    The quantizer hands a format the grouped view ``v`` of a tensor (see :mod:`diffq.layout`)
    and the parameters it computed with :meth:`params_from_range`; the format rounds, applies
    its gradient rule (:meth:`fake_quant`) and maps grid values to codes (:meth:`encode`).
    """

    block_size: int | None = None  # elements sharing one scale, fixed by the format (block formats)

    @property
    @abstractmethod
    def name(self) -> str:
        """Short name, e.g. ``int8`` or ``fp8_e4m3``."""

    @property
    @abstractmethod
    def element_bits(self) -> float:
        """Information bits of one element's code."""

    @property
    @abstractmethod
    def storage_bits(self) -> int:
        """Bits one code takes when packed."""

    @property
    @abstractmethod
    def maxval(self) -> float:
        """Largest magnitude of the normalised grid."""

    @abstractmethod
    def round(self, y: Tensor) -> Tensor:
        """Nearest grid value of the already-scaled ``y`` (clamped into range), float32."""

    @abstractmethod
    def to_codes(self, q: Tensor) -> Tensor:
        """Grid values -> uint8 storage codes."""

    @abstractmethod
    def from_codes(self, codes: Tensor) -> Tensor:
        """uint8 storage codes -> float32 grid values (inverse of ``to_codes``)."""

    def bits_per_element(self, group_size: int | None, scale_bits: int = 16, zero_bits: int = 0,
                         stored: bool = False) -> float:
        """Element bits (information, or ``stored`` packed) plus one scale (and zero point) per
        ``group_size`` elements (None: no overhead)."""
        element = float(self.storage_bits if stored else self.element_bits)
        if group_size is None:
            return element
        return element + (scale_bits + zero_bits) / group_size

    # ------------------------------------------------------- quantizer-facing
    def check_usage(self, *, kind: str, granularity: str, symmetric: bool, observer: str) -> None:
        """ConfigError when the format cannot quantize a tensor this way."""
        if granularity == "block":
            raise ConfigError(
                f"format {self.name} with granularity 'block': block formats (nvfp4, mxfp4) need "
                "granularity=block and granularity=block needs a block format; use group:<g> otherwise"
            )
        if not symmetric:
            raise ConfigError(
                f"asymmetric quantization needs an unsigned int format (got {self.name}); "
                "use make_format('int', bits, symmetric=False) or set symmetric=true"
            )

    def param_names(self, symmetric: bool) -> tuple[str, ...]:
        """Names of the quantizer state this format needs (``scale``; ``zero_point`` ...)."""
        return ("scale",)

    def params_from_tensor(self, v: Tensor) -> dict[str, Tensor] | None:
        """Parameters computed from the observed tensor itself instead of a range (None: use the range)."""
        return None

    def params_from_range(self, lo: Tensor, hi: Tensor, symmetric: bool,
                          given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Scale parameters mapping the range ``[lo, hi]`` (per kept group) onto the grid (``given``:
        parameters already calibrated, e.g. a static second-level scale of a dynamic block format)."""
        return {"scale": (torch.maximum(-lo, hi) / self.maxval).clamp_min(EPS)}

    def calibrated_params(self, kind: str) -> tuple[str, ...]:
        """Parameters calibrated once even when the rest are computed per call (dynamic)."""
        return ()

    def to_storage(self, params: dict[str, Tensor], half: torch.dtype) -> dict[str, Tensor]:
        """The parameters as an export stores them: scales in ``half`` (rounded up), zero points as uint8."""
        return {k: v.to(torch.uint8) if k == "zero_point" else ceil_to(v, half) if k == "scale" else v.to(half)
                for k, v in params.items()}

    def from_storage(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        """Inverse of :meth:`to_storage` (float32)."""
        return {k: v.float() for k, v in stored.items()}

    def storable(self, params: dict[str, Tensor], half: torch.dtype) -> dict[str, Tensor]:
        """``params`` with the values their storage holds (trainable ones keep their gradient)."""
        stored = self.from_storage(self.to_storage({k: v.detach() for k, v in params.items()}, half))
        return {k: v + (stored[k] - v).detach() if v.requires_grad else stored[k] for k, v in params.items()}

    def to_grid(self, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Grid values of ``v``; with a gradient: straight-through on rounding, zero outside the
        grid's range (inclusive bounds, like the fused kernels)."""
        y = v * (1.0 / params["scale"])  # reciprocal-multiply, exactly as torch's fake_quantize kernels
        q = self.round(y.detach())
        if not y.requires_grad:
            return q
        return q + (y - y.detach()) * (y.detach().abs() <= self.maxval)

    def dequant(self, q: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Values of grid points ``q`` (in place when ``q`` needs no gradient: the hot path)."""
        return q * params["scale"] if q.requires_grad else q.mul_(params["scale"])

    def fake_quant(self, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Quantize-dequantize the grouped view ``v``."""
        return self.dequant(self.to_grid(v, params), params)

    def fast_fake_quant(self, x: Tensor, scale: float, inv: float, zero_point: float | None) -> Tensor | None:
        """:meth:`fake_quant` of ``x`` with per-tensor parameters (``inv``: the float32 ``1 / scale``) and no
        gradient, bit-exact with it and in fewer passes, as float32; None where the format has no fast path."""
        return None

    def encode(self, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        """uint8 codes of the grouped view ``v``, shaped ``[rows, features]``."""
        return self.to_codes(self.to_grid(v, params)).reshape(v.shape[0], -1)

    def decode(self, codes: Tensor, params: dict[str, Tensor], view_shape: tuple[int, int, int]) -> Tensor:
        """Grouped-view values of ``codes`` (inverse of :meth:`encode` followed by :meth:`dequant`)."""
        return self.dequant(self.from_codes(codes).reshape(view_shape), params)
