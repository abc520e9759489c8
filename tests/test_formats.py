"""Number formats: grids, rounding (fast paths vs the ExMy formula), codes, block scales, bits."""
from __future__ import annotations

import math

import pytest
import torch

from diffq.errors import ConfigError
from diffq.formats import (
    BinaryFormat,
    FPFormat,
    IntFormat,
    MXFP4Format,
    NVFP4Format,
    TernaryFormat,
    format_from_name,
    make_format,
)

FP8 = [(FPFormat(4, 3), torch.float8_e4m3fn), (FPFormat(5, 2), torch.float8_e5m2)]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of float32 tensors (distinguishes -0.0 from 0.0)."""
    return torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


def torch_cast(fmt: FPFormat, dtype: torch.dtype, y: torch.Tensor) -> torch.Tensor:
    return y.clamp(-fmt.maxval, fmt.maxval).to(dtype).float()


def finite_values(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(dtype).float()
    ok = values.isfinite()
    return codes[ok], values[ok]


def midpoints(grid: torch.Tensor) -> torch.Tensor:
    g = grid.unique()
    mids = (g[1:] + g[:-1]) / 2
    return torch.cat([mids, -mids])


@pytest.mark.parametrize("fmt,dtype", FP8, ids=["e4m3", "e5m2"])
def test_fp8_formula_matches_torch_cast(fmt: FPFormat, dtype: torch.dtype) -> None:
    _, values = finite_values(dtype)
    gen = torch.Generator().manual_seed(0)
    normals = torch.randn(1_000_000, generator=gen)
    scales = [1e-40 / 3, 2.0**-(fmt.bias + fmt.man), 1e-2, 1.0, fmt.maxval / 4, fmt.maxval * 2]
    specials = torch.tensor([0.0, -0.0, 1e-40, -1e-40, fmt.maxval * 1.06, 1e30, -1e30])
    for y in [values, midpoints(values), specials, *[normals * s for s in scales]]:
        expected = torch_cast(fmt, dtype, y)
        assert bits_equal(fmt.round_generic(y), expected)
        assert bits_equal(fmt.round(y), expected)
    assert bits_equal(fmt.round(values), values)  # every representable value is a fixed point


def test_e2m1_ladder_formula_and_ties() -> None:
    fmt = FPFormat(2, 1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.equal(fmt.grid(), grid)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    tie_expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])  # to the even code
    for y, expected in [(ties, tie_expected), (-ties, -tie_expected), (grid, grid), (-grid, -grid)]:
        assert bits_equal(fmt.round(y), expected)
        assert bits_equal(fmt.round_generic(y), expected)
    near = torch.cat([torch.nextafter(ties, torch.zeros(7)), torch.nextafter(ties, torch.full((7,), 9.0))])
    y = torch.cat([near, -near, torch.randn(200_000) * 3, torch.tensor([7.0, 1e9, -1e9, 0.1, -0.1])])
    assert bits_equal(fmt.round(y), fmt.round_generic(y))


def brute_force_rne(fmt: FPFormat, y: torch.Tensor) -> torch.Tensor:
    """Nearest grid value; ties to the even code."""
    grid = fmt.grid()
    full = torch.cat([grid, -grid])
    dist = (y.clamp(-fmt.maxval, fmt.maxval)[:, None] - full[None]).abs()
    best = dist.min(1, keepdim=True).values
    tied = dist == best
    even = (fmt.to_codes(full) & 1) == 0
    choice = torch.where(tied.sum(1, keepdim=True) > 1, tied & even[None], tied).float().argmax(1)
    return full[choice]


@pytest.mark.parametrize("exp,man", [(1, 2), (2, 3), (3, 2), (2, 2), (1, 1), (3, 4)])
def test_generic_formula_is_round_to_nearest_even(exp: int, man: int) -> None:
    fmt = FPFormat(exp, man)
    grid = fmt.grid()
    y = torch.cat([grid, midpoints(grid), torch.randn(4000) * fmt.maxval / 2, torch.tensor([fmt.maxval * 3])])
    assert torch.equal(fmt.round(y).abs(), brute_force_rne(fmt, y).abs())
    assert torch.equal(torch.sign(fmt.round(y)), torch.sign(brute_force_rne(fmt, y)))


def test_small_fp_grids_and_maxvals() -> None:
    assert torch.equal(FPFormat(1, 2).grid(), torch.arange(8) * 0.5)  # uniform 0..3.5
    assert torch.equal(FPFormat(3, 0).grid(), torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]))
    maxvals = {(2, 1): 6, (3, 0): 16, (1, 2): 3.5, (2, 3): 7.5, (3, 2): 28, (3, 4): 31, (4, 3): 448, (5, 2): 57344}
    for (e, m), vmax in maxvals.items():
        assert FPFormat(e, m).maxval == vmax
        assert FPFormat(e, m).grid().max().item() == vmax
    assert len(FPFormat(4, 3).grid()) == 127 and len(FPFormat(5, 2).grid()) == 124


@pytest.mark.parametrize("fmt,dtype", FP8, ids=["e4m3", "e5m2"])
def test_fp8_codes_equal_torch_bit_patterns(fmt: FPFormat, dtype: torch.dtype) -> None:
    codes, values = finite_values(dtype)
    assert torch.equal(fmt.to_codes(values), codes)
    assert torch.equal(values.to(dtype).view(torch.uint8), fmt.to_codes(values))
    assert bits_equal(fmt.from_codes(codes), values)


@pytest.mark.parametrize("fmt", [FPFormat(2, 1), FPFormat(3, 0), FPFormat(1, 2), FPFormat(2, 3), FPFormat(3, 2)])
def test_fp_code_round_trip(fmt: FPFormat) -> None:
    codes = torch.arange(2 ** (1 + fmt.exp + fmt.man), dtype=torch.int32).to(torch.uint8)
    values = fmt.from_codes(codes)
    assert torch.equal(fmt.to_codes(values), codes)  # all codes finite, incl. -0
    assert int(codes.max()) < 2**fmt.storage_bits


@pytest.mark.parametrize("fmt", [IntFormat(8), IntFormat(4), IntFormat(2), IntFormat(8, signed=False), IntFormat(3)])
def test_int_codes_round_trip(fmt: IntFormat) -> None:
    grid = torch.arange(fmt.qmin, fmt.qmax + 1).float()
    codes = fmt.to_codes(grid)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2**fmt.storage_bits
    assert torch.equal(fmt.from_codes(codes), grid)
    assert torch.equal(fmt.round(grid), grid)
    assert fmt.maxval == fmt.qmax


def test_int_grid_bounds_and_error() -> None:
    assert (IntFormat(8).qmin, IntFormat(8).qmax) == (-127, 127)
    assert (IntFormat(4).qmin, IntFormat(4).qmax) == (-7, 7)
    assert (IntFormat(8, signed=False).qmin, IntFormat(8, signed=False).qmax) == (0, 255)
    fmt, scale = IntFormat(4), 0.37
    x = torch.empty(100_000).uniform_(-7 * scale, 7 * scale)
    err = (x - fmt.round(x / scale) * scale).abs()
    assert err.max() <= scale / 2 * (1 + 1e-6)
    assert torch.equal(fmt.round(torch.tensor([-100.0, 100.0, 2.5, -2.5])), torch.tensor([-7.0, 7.0, 2.0, -2.0]))


def test_mxfp4_block_scales() -> None:
    fmt = MXFP4Format()
    amax = torch.tensor([7.0, 6.0, 0.3, 0.0, 1e-30])
    scales = fmt.block_scales(amax, None)
    assert torch.equal(scales[:3], torch.tensor([1.0, 1.0, 2.0**-4]))  # 2^(floor(log2 amax) - 2)
    assert scales.isfinite().all() and (scales > 0).all()
    assert torch.equal(torch.log2(scales), torch.log2(scales).round())  # E8M0: powers of two
    block = torch.tensor([7.0, -6.5, 5.0, 0.3, 0.0])  # amax 7 -> scale 1, (6, 8) clips to 6
    q = fmt.round(block / scales[0]) * scales[0]
    assert torch.equal(q, torch.tensor([6.0, -6.0, 4.0, 0.5, 0.0]))
    zero_block = torch.zeros(32)
    assert torch.equal(fmt.round(zero_block / scales[3]) * scales[3], zero_block)


def test_nvfp4_block_scales() -> None:
    fmt, e4m3 = NVFP4Format(), FPFormat(4, 3)
    amax_tensor = torch.tensor(10.0)
    amax = torch.tensor([10.0, 1.0, 0.01, 0.0, 3.3])
    scales = fmt.block_scales(amax, amax_tensor)
    ts = fmt.tensor_scale(amax_tensor)
    assert ts.item() == pytest.approx(10.0 / (6 * 448))
    assert torch.equal(e4m3.round(scales / ts) * ts, scales)  # e4m3-representable block factors
    assert scales.isfinite().all() and (scales > 0).all()
    assert scales[0].item() == pytest.approx(10.0 / 6, rel=1e-6)  # block amax maps to 6
    assert torch.equal(fmt.round(torch.zeros(16) / scales[3]) * scales[3], torch.zeros(16))
    assert (fmt.block_size, MXFP4Format().block_size) == (16, 32)


def test_bits_per_element() -> None:
    assert IntFormat(8).bits_per_element(64) == 8 + 16 / 64
    assert IntFormat(8, signed=False).bits_per_element(64, zero_bits=8) == 8 + 24 / 64
    assert IntFormat(4).bits_per_element(None) == 4
    assert FPFormat(4, 3).bits_per_element(32, scale_bits=8) == 8.25
    assert NVFP4Format().bits_per_element() == 4.5
    assert MXFP4Format().bits_per_element() == 4.25
    assert TernaryFormat().element_bits == math.log2(3) and TernaryFormat().storage_bits == 2
    assert BinaryFormat(2).bits_per_element(64) == 2 * (1 + 16 / 64)
    assert [f.storage_bits for f in (IntFormat(8), IntFormat(4), FPFormat(2, 3), BinaryFormat(1))] == [8, 4, 8, 1]


def test_ternary() -> None:
    fmt = TernaryFormat()
    y = torch.tensor([-2.0, -1.0, -0.6, -0.4, 0.0, 0.4, 0.5, 0.6, 1.0, 3.0])
    assert torch.equal(fmt.round(y), torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]))
    grid = torch.tensor([-1.0, 0.0, 1.0])
    assert torch.equal(fmt.to_codes(grid), torch.tensor([0, 1, 2], dtype=torch.uint8))
    assert torch.equal(fmt.from_codes(fmt.to_codes(grid)), grid)
    assert fmt.maxval == 1.0


def test_binary_bases() -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.5
    one, two = BinaryFormat(1), BinaryFormat(2)
    s1 = one.init_sigma(w)
    assert torch.allclose(s1[0], w.abs().mean(1))
    assert torch.equal(one.binarize(w, s1), s1[0][:, None] * torch.where(w >= 0, 1.0, -1.0))
    s2 = two.init_sigma(w)
    assert torch.equal(s2[0], s1[0])
    err1 = (one.binarize(w, s1) - w).square().mean()
    err2 = (two.binarize(w, s2) - w).square().mean()
    assert err2 < 0.5 * err1
    signs = two.signs(w, s2)
    assert torch.equal(two.from_codes(two.to_codes(signs)), signs)
    assert int(two.to_codes(signs).max()) <= 3
    assert torch.equal(one.binarize(torch.zeros(1, 2), torch.ones(1, 1)), torch.ones(1, 2))  # sign(0) = +1


def test_binary_clipped_ste() -> None:
    fmt = BinaryFormat(2)
    w = torch.tensor([[-1.5, -1.0, -0.3, 0.0, 0.2, 1.0, 2.0]], requires_grad=True)
    sigma = fmt.init_sigma(w).requires_grad_(True)
    upstream = torch.arange(1.0, 8.0)[None]
    (fmt.binarize(w, sigma) * upstream).sum().backward()
    inside = (w.detach().abs() <= 1).float()
    assert torch.equal(w.grad, upstream * inside)
    signs = fmt.signs(w, sigma)
    assert torch.allclose(sigma.grad, (signs * upstream).sum(-1))


def test_make_format_and_names() -> None:
    assert make_format("none", 8) is None and make_format("int", 16) is None and make_format("fp", 16) is None
    assert make_format("int", 8) == IntFormat(8)
    assert make_format("int", 8, symmetric=False) == IntFormat(8, signed=False)
    defaults = {8: (4, 3), 6: (2, 3), 5: (2, 2), 4: (2, 1), 3: (1, 1)}
    for bits, (e, m) in defaults.items():
        assert make_format("fp", bits) == FPFormat(e, m)
    assert make_format("fp", 8, exp=5, man=2) == FPFormat(5, 2)
    assert make_format("fp", 6, exp=3) == FPFormat(3, 2)
    assert make_format("binary", 2) == BinaryFormat(2) and make_format("binary", 1) == BinaryFormat(1)
    assert isinstance(make_format("nvfp4", 4), NVFP4Format) and isinstance(make_format("mxfp4", 4), MXFP4Format)
    names = {
        "int8": IntFormat(8), "uint8": IntFormat(8, signed=False), "int4": IntFormat(4),
        "fp8_e4m3": FPFormat(4, 3), "fp8_e5m2": FPFormat(5, 2), "fp4_e2m1": FPFormat(2, 1),
        "fp6_e3m2": FPFormat(3, 2), "e4m3": FPFormat(4, 3), "E2M1": FPFormat(2, 1), "fp8": FPFormat(4, 3),
        "fp4": FPFormat(2, 1), "nvfp4": NVFP4Format(), "mxfp4": MXFP4Format(), "ternary": TernaryFormat(),
        "binary2": BinaryFormat(2),
    }
    for name, fmt in names.items():
        assert format_from_name(name) == fmt
        assert format_from_name(fmt.name) == fmt


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: make_format("float", 8), r"unknown format kind 'float'.*int, fp, nvfp4"),
        (lambda: make_format("fp", 4, exp=5, man=3), r"fp E5M3 needs 9 bits but bits=4.*exp=2 man=1"),
        (lambda: make_format("int", 12), r"int bits must be in 2\.\.8 \(got 12\).*bits>=16"),
        (lambda: make_format("fp", 8, symmetric=False), r"asymmetric.*needs format int.*symmetric=true"),
        (lambda: make_format("nvfp4", 4, symmetric=False), r"asymmetric"),
        (lambda: make_format("fp", 7), r"no default fp layout for bits=7"),
        (lambda: FPFormat(5, 3), r"1\+exp\+man = 9"),
        (lambda: BinaryFormat(5), r"bases\) must be in 1\.\.4"),
        (lambda: make_format("binary", 8), r"binary bits \(= sign bases\) must be in 1\.\.4 \(got 8\)"),
        (lambda: format_from_name("int9"), r"int bits must be in 2\.\.8"),
        (lambda: format_from_name("bf8x"), r"unknown format name 'bf8x'; examples: int8"),
        (lambda: format_from_name("fp4_e4m3"), r"has 8 bits, not 4"),
    ],
)
def test_config_errors(build, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=match):
        build()
