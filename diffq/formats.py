"""Number formats as data (frozen dataclasses) and their rounding / code maths.

A format rounds an already-scaled tensor ``y`` to its normalised grid (``round``), maps grid
values to storage codes and back (``to_codes`` / ``from_codes``, exact inverses on the grid)
and knows its cost in bits per element including scale overhead. Scales live elsewhere
(``diffq.quantizer``); block formats also compute their own per-block scales.
"""
from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from diffq.errors import ConfigError

__all__ = [
    "Format",
    "IntFormat",
    "FPFormat",
    "BlockFormat",
    "NVFP4Format",
    "MXFP4Format",
    "TernaryFormat",
    "BinaryFormat",
    "make_format",
    "format_from_name",
]

_FP_DEFAULTS = {8: (4, 3), 6: (2, 3), 5: (2, 2), 4: (2, 1), 3: (1, 1)}
_KINDS = ("int", "fp", "nvfp4", "mxfp4", "ternary", "binary", "none")
_NAME_EXAMPLES = "int8, uint8, int4, fp8_e4m3, fp8_e5m2, fp4_e2m1, e4m3, fp8, fp4, nvfp4, mxfp4, ternary, binary2"


def _container(bits: int) -> int:
    """Smallest packing width in (1, 2, 4, 8) that holds ``bits``-bit codes."""
    return next(w for w in (1, 2, 4, 8) if w >= bits)


class Format(ABC):
    """A number format: a normalised grid, its storage codes and its bit cost."""

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

    def bits_per_element(self, group_size: int | None, scale_bits: int = 16, zero_bits: int = 0) -> float:
        """Element bits plus one scale (and zero point) per ``group_size`` elements (None: no overhead)."""
        if group_size is None:
            return float(self.element_bits)
        return self.element_bits + (scale_bits + zero_bits) / group_size


@dataclass(frozen=True)
class IntFormat(Format):
    """Integer grid: signed narrow ``[-(2^(b-1)-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.

    Codes: signed values are stored as ``bits``-wide two's complement, unsigned as themselves.
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
        return _container(self.bits)

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


@dataclass(frozen=True)
class FPFormat(Format):
    """Sign + ``exp`` exponent bits + ``man`` mantissa bits, bias ``2^(exp-1)-1``.

    OCP conventions: E4M3 is E4M3FN (max 448, only S.1111.111 is NaN), E5M2 reserves its top
    exponent (max 57344); every other format uses all codes as finite values.
    """

    exp: int
    man: int

    def __post_init__(self) -> None:
        if self.exp < 1 or self.man < 0 or 1 + self.exp + self.man > 8:
            raise ConfigError(
                f"fp E{self.exp}M{self.man} needs 1+exp+man = {1 + self.exp + self.man} bits; "
                "pick exp>=1, man>=0 with 1+exp+man <= 8 (e.g. E4M3, E2M1)"
            )

    @property
    def bias(self) -> int:
        """Integer exponent bias."""
        return 2 ** (self.exp - 1) - 1

    @property
    def name(self) -> str:
        return f"fp{1 + self.exp + self.man}_e{self.exp}m{self.man}"

    @property
    def element_bits(self) -> float:
        return float(1 + self.exp + self.man)

    @property
    def storage_bits(self) -> int:
        return _container(1 + self.exp + self.man)

    @property
    def maxval(self) -> float:
        if (self.exp, self.man) == (4, 3):
            return 448.0
        if (self.exp, self.man) == (5, 2):
            return 57344.0
        # All codes finite (OCP FP4/FP6 rule); METHODS.md's 15.5 for E3M4 reserves the top exponent.
        return (2 - 2.0**-self.man) * 2.0 ** (2**self.exp - 1 - self.bias)

    def round_generic(self, y: Tensor) -> Tensor:
        """Round to the grid by the ExMy formula (ties to even; with M=0 a tie goes to the larger
        power of two); the reference for the fast paths."""
        y = y.float().clamp(-self.maxval, self.maxval)
        e = (torch.frexp(y).exponent - 1).clamp_min(1 - self.bias)
        step = torch.ldexp(torch.ones_like(y), e - self.man)
        return torch.round(y / step) * step

    def grid_neighbors(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(largest grid value <= y, the next grid value up), within +-maxval: the two choices of
        learned rounding, each weight with its own FP step."""
        y = y.float().clamp(-self.maxval, self.maxval)
        a = y.abs()
        e = (torch.frexp(a).exponent - 1).clamp_min(1 - self.bias)
        step = torch.ldexp(torch.ones_like(a), e - self.man)
        a_down = torch.floor(a / step) * step
        a_up = torch.minimum(a_down + step, torch.full_like(a, self.maxval))
        negative = y < 0
        return torch.where(negative, -a_up, a_down), torch.where(negative, -a_down, a_up)

    def round(self, y: Tensor) -> Tensor:
        """Nearest grid value, bit-exact with :meth:`round_generic`: a float8 cast for E5M2 (and for
        E4M3 on GPUs; on CPUs the cast is slower than :meth:`round_bits`), else :meth:`round_bits`."""
        y = y.float()
        if (self.exp, self.man) == (4, 3) and y.is_cuda:
            return y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
        if (self.exp, self.man) == (5, 2):
            return y.clamp(-57344.0, 57344.0).to(torch.float8_e5m2).float()
        return self.round_bits(y)

    def round_bits(self, y: Tensor) -> Tensor:
        """Round float32 ``y`` with one float32 addition: ``c = 1.5 * 2^(e + 23 - man)`` built from
        each value's exponent bits ``e`` (floored at the smallest normal exponent, which gives the
        subnormal step) has an ulp equal to the value's grid step, so ``(y + c) - c`` is ``y``
        rounded to the grid, ties to even as the formula (M=0: up). ``copysign`` keeps -0."""
        y = y.float().clamp(-self.maxval, self.maxval)
        c = y.view(torch.int32) & 0x7F800000
        c.clamp_min_((128 - self.bias) << 23)
        c += (23 - self.man) << 23
        c |= 0x00400000
        c = c.view(torch.float32)
        return (y + c).sub_(c).copysign_(y)

    def to_codes(self, q: Tensor) -> Tensor:
        q = q.float()
        a = q.abs()
        e = (torch.frexp(a).exponent - 1).clamp_min(1 - self.bias)
        mant = torch.ldexp(a, self.man - e).to(torch.int32)  # in [2^M, 2^(M+1)) if normal
        normal = mant >= 2**self.man
        exp_field = torch.where(normal, e + self.bias, 0)
        man_field = mant - normal.to(torch.int32) * 2**self.man
        sign = torch.signbit(q).to(torch.int32)
        return ((sign << (self.exp + self.man)) | (exp_field << self.man) | man_field).to(torch.uint8)

    def from_codes(self, codes: Tensor) -> Tensor:
        c = codes.to(torch.int32)
        man_field = c & (2**self.man - 1)
        exp_field = (c >> self.man) & (2**self.exp - 1)
        normal = exp_field > 0
        mant = (man_field + normal.to(torch.int32) * 2**self.man).float()
        e = torch.where(normal, exp_field, 1) - self.bias - self.man
        mag = torch.ldexp(mant, e)
        return torch.where(((c >> (self.exp + self.man)) & 1).bool(), -mag, mag)

    def grid(self) -> Tensor:
        """All finite non-negative representable values, ascending."""
        values = self.from_codes(torch.arange(2 ** (self.exp + self.man), dtype=torch.uint8))
        return values[values <= self.maxval]


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

    def bits_per_element(self, group_size: int | None = None, scale_bits: int = 16, zero_bits: int = 0) -> float:
        """4 + 8 scale bits / block size; the arguments are ignored (the format fixes both)."""
        return 4.0 + 8.0 / self.block_size

    @abstractmethod
    def block_scales(self, amax_block: Tensor, amax_tensor: Tensor | None) -> Tensor:
        """Per-block fp32 scale (already quantized to the scale format); never 0, NaN or Inf."""


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


@dataclass(frozen=True)
class TernaryFormat(Format):
    """BitNet b1.58 grid {-1, 0, 1}; codes ``q + 1`` in 2 bits."""

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

    def to_codes(self, q: Tensor) -> Tensor:
        return (q + 1).to(torch.uint8)

    def from_codes(self, codes: Tensor) -> Tensor:
        return codes.float() - 1.0


@dataclass(frozen=True)
class BinaryFormat(Format):
    """BinaryDM multi-basis binarisation ``Σ_i σ_i·sign(r_i)``, ``r_{i+1} = r_i - σ_i·sign(r_i)``.

    Not a scaled grid: ``round`` is one sign basis; the quantizer uses ``fake_quant`` with
    per-output-channel ``sigma`` [bases, out]. Codes pack the ``bases`` sign bits of one weight
    (bit i set = basis i positive); ``to_codes`` takes signs [bases, ...], ``from_codes`` returns them.
    """

    bases: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.bases <= 4:
            raise ConfigError(f"binary bases must be in 1..4 (got {self.bases}); BinaryDM uses 1 or 2")

    @property
    def name(self) -> str:
        return f"binary{self.bases}"

    @property
    def element_bits(self) -> float:
        return float(self.bases)

    @property
    def storage_bits(self) -> int:
        return _container(self.bases)

    @property
    def maxval(self) -> float:
        return 1.0

    def round(self, y: Tensor) -> Tensor:
        return torch.where(y >= 0, 1.0, -1.0).float()

    def bits_per_element(self, group_size: int | None, scale_bits: int = 16, zero_bits: int = 0) -> float:
        """``bases`` sign bits plus ``bases`` scales per ``group_size`` (row) elements."""
        if group_size is None:
            return float(self.bases)
        return self.bases * (1 + scale_bits / group_size)

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

    def fake_quant(self, w2d: Tensor, sigma: Tensor) -> Tensor:
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


def make_format(
    kind: str,
    bits: int,
    exp: int | None = None,
    man: int | None = None,
    symmetric: bool = True,
    bases: int = 2,
) -> Format | None:
    """Build a format from config fields; None means "keep floating point" (kind none, or bits >= 16)."""
    if kind not in _KINDS:
        raise ConfigError(f"unknown format kind {kind!r}; valid kinds: {', '.join(_KINDS)}")
    if kind == "none" or (kind in ("int", "fp") and bits >= 16):
        return None
    if not symmetric and kind != "int":
        raise ConfigError(
            f"asymmetric quantization (zero point) needs format int, not {kind!r}; set symmetric=true"
        )
    if kind == "int":
        return IntFormat(bits, signed=symmetric)
    if kind == "fp":
        return _fp_format(bits, exp, man)
    if kind == "nvfp4":
        return NVFP4Format()
    if kind == "mxfp4":
        return MXFP4Format()
    if kind == "ternary":
        return TernaryFormat()
    return BinaryFormat(bases)


def _fp_format(bits: int, exp: int | None, man: int | None) -> FPFormat:
    if exp is None and man is None:
        if bits not in _FP_DEFAULTS:
            raise ConfigError(
                f"no default fp layout for bits={bits}; set exp and man (1+exp+man = bits) "
                f"or use bits in {sorted(_FP_DEFAULTS)}"
            )
        exp, man = _FP_DEFAULTS[bits]
    exp = bits - 1 - man if exp is None else exp
    man = bits - 1 - exp if man is None else man
    if 1 + exp + man != bits:
        ex, mx = _FP_DEFAULTS.get(bits, (1, bits - 2))
        raise ConfigError(
            f"fp E{exp}M{man} needs {1 + exp + man} bits but bits={bits}: pick exp+man+1 = bits, "
            f"e.g. exp={ex} man={mx} for {bits} bits"
        )
    return FPFormat(exp, man)


def format_from_name(name: str) -> Format:
    """Parse a format name (``int8``, ``uint4``, ``fp8_e4m3``, ``e2m1``, ``fp8``, ``nvfp4``, ``binary2``...)."""
    n = name.strip().lower()
    fixed = {"nvfp4": NVFP4Format(), "mxfp4": MXFP4Format(), "ternary": TernaryFormat()}
    if n in fixed:
        return fixed[n]
    if m := re.fullmatch(r"(u?)int(\d+)", n):
        return IntFormat(int(m[2]), signed=not m[1])
    if m := re.fullmatch(r"(?:fp(\d+)_)?e(\d)m(\d)", n):
        fmt = FPFormat(int(m[2]), int(m[3]))
        if m[1] and int(m[1]) != fmt.element_bits:
            raise ConfigError(f"format {name!r}: E{fmt.exp}M{fmt.man} has {fmt.element_bits:.0f} bits, not {m[1]}")
        return fmt
    if (m := re.fullmatch(r"fp(\d+)", n)) and int(m[1]) in _FP_DEFAULTS:
        return FPFormat(*_FP_DEFAULTS[int(m[1])])
    if m := re.fullmatch(r"binary(\d)", n):
        return BinaryFormat(int(m[1]))
    raise ConfigError(f"unknown format name {name!r}; examples: {_NAME_EXAMPLES}")
