"""Floating-point ExMy grids (OCP conventions) with fast, bit-exact rounding."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from diffq.errors import ConfigError
from diffq.formats.base import Format, container, scaled_copy
from diffq.formats.registry import FORMATS, FormatKind

FP_DEFAULTS = {8: (4, 3), 6: (2, 3), 5: (2, 2), 4: (2, 1), 3: (1, 1)}  # (exp, man) of fp<bits> without a layout


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
        return container(1 + self.exp + self.man)

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

    def cast_dtype(self, y: Tensor) -> torch.dtype | None:
        """The float8 type whose cast rounds ``y`` exactly as the formula, where :meth:`round` uses it: E5M2,
        and E4M3 on GPUs (on CPUs the E4M3 cast is slower than :meth:`round_bits`)."""
        if (self.exp, self.man) == (5, 2):
            return torch.float8_e5m2
        return torch.float8_e4m3fn if (self.exp, self.man) == (4, 3) and y.is_cuda else None

    def round(self, y: Tensor) -> Tensor:
        """Nearest grid value, bit-exact with :meth:`round_generic`: a float8 cast where :meth:`cast_dtype`
        names one, else :meth:`round_bits`."""
        y = y.float()
        cast = self.cast_dtype(y)
        if cast is not None:
            return y.clamp(-self.maxval, self.maxval).to(cast).float()
        return self.round_bits(y)

    def round_bits(self, y: Tensor) -> Tensor:
        """Round float32 ``y`` with one float32 addition: ``c = 1.5 * 2^(e + 23 - man)`` built from
        each value's exponent bits ``e`` (floored at the smallest normal exponent, which gives the
        subnormal step) has an ulp equal to the value's grid step, so ``(y + c) - c`` is ``y``
        rounded to the grid, ties to even as the formula (M=0: up). ``copysign`` keeps -0."""
        return self.round_bits_(y.float().clamp(-self.maxval, self.maxval), y)

    def round_bits_(self, y: Tensor, sign: Tensor) -> Tensor:
        """:meth:`round_bits` in place on the float32 buffer ``y``, already clamped to +-maxval; ``sign``: a
        tensor with ``y``'s signs (what ``y`` was clamped or scaled from)."""
        c = y.view(torch.int32) & 0x7F800000
        step = c.clamp_min_((128 - self.bias) << 23).view(torch.float32)  # 2^max(e, 1 - bias)
        magic = 1.5 * 2.0 ** (23 - self.man)  # c = magic * step, exact
        return y.add_(step, alpha=magic).sub_(step, alpha=magic).copysign_(sign)

    def fast_fake_quant(self, x: Tensor, scale: float, inv: float, zero_point: float | None) -> Tensor | None:
        """Scale, clamp, round (in place, or the float8 cast) and rescale."""
        y = scaled_copy(x, inv).clamp_(-self.maxval, self.maxval)
        cast = self.cast_dtype(y)
        y = y.to(cast).float() if cast is not None else self.round_bits_(y, x)
        return y.mul_(scale)

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


def fp_format(bits: int, exp: int | None = None, man: int | None = None, symmetric: bool = True) -> FPFormat:
    """The ExMy format of ``bits`` bits (a default layout when neither ``exp`` nor ``man`` is set)."""
    if exp is None and man is None:
        if bits not in FP_DEFAULTS:
            raise ConfigError(
                f"no default fp layout for bits={bits}; set exp and man (1+exp+man = bits) "
                f"or use bits in {sorted(FP_DEFAULTS)}"
            )
        exp, man = FP_DEFAULTS[bits]
    exp = bits - 1 - man if exp is None else exp
    man = bits - 1 - exp if man is None else man
    if 1 + exp + man != bits:
        ex, mx = FP_DEFAULTS.get(bits, (1, bits - 2))
        raise ConfigError(
            f"fp E{exp}M{man} needs {1 + exp + man} bits but bits={bits}: pick exp+man+1 = bits, "
            f"e.g. exp={ex} man={mx} for {bits} bits"
        )
    return FPFormat(exp, man)


def _parse(m: re.Match) -> FPFormat:
    if m["plain"] is not None:
        if int(m["plain"]) not in FP_DEFAULTS:
            raise ConfigError(f"no default fp layout for {m[0]!r}; name the layout, e.g. fp8_e4m3")
        return FPFormat(*FP_DEFAULTS[int(m["plain"])])
    fmt = FPFormat(int(m["exp"]), int(m["man"]))
    if m["bits"] and int(m["bits"]) != fmt.element_bits:
        raise ConfigError(f"format {m[0]!r}: E{fmt.exp}M{fmt.man} has {fmt.element_bits:.0f} bits, not {m['bits']}")
    return fmt


FORMATS.register("fp")(FormatKind(
    fp_format, r"(?:fp(?P<bits>\d+)_)?e(?P<exp>\d)m(?P<man>\d)|fp(?P<plain>\d+)", _parse,
    ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "e4m3", "fp8", "fp4"), float_from_bits=16))
