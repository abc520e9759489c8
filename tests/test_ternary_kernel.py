"""2-bit packed ternary weights: bit-exact packing, a tiled CPU matmul, and the Triton kernel (interpreter, GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffq.kernels import ternary
from diffq.kernels.ternary import pack_ternary, ternary_linear, ternary_linear_cpu, unpack_ternary

ROOT = Path(__file__).resolve().parents[1]


def _layer(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ternary weight [n, k] int8, its packing, scale [n], bias [n])."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.1 + 0.01
    bias = torch.randn(n, generator=g)
    return w, pack_ternary(w), scale, bias


def _reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize, then a float32 matmul (float64 accumulation to make the reference itself exact)."""
    y = F.linear(x.double(), w.double() * scale.double()[:, None], None if bias is None else bias.double())
    return y.float()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("k", [64, 4 * 17 + 1, 4 * 17 + 3])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float32])
def test_pack_round_trip_is_bit_exact(k: int, dtype: torch.dtype) -> None:
    w = _layer(33, k)[0].to(dtype)
    packed = pack_ternary(w)
    assert packed.dtype == torch.uint8
    assert packed.shape == (33, (k + 3) // 4)  # four codes a byte
    for out_dtype in (torch.int8, torch.float32, torch.bfloat16):
        back = unpack_ternary(packed, k, out_dtype)
        assert back.dtype == out_dtype and back.shape == (33, k)
        assert torch.equal(back.to(torch.int64), w.to(torch.int64))


def test_pack_layout_is_value_plus_one_lowest_index_in_lowest_bits() -> None:
    w = torch.tensor([[-1, 0, 1, 1, 0]])
    packed = pack_ternary(w)
    # codes 0, 1, 2, 2 -> 0b10_10_01_00; the fifth code 1 is padded with code 1 (value 0).
    assert packed.tolist() == [[0b10100100, 0b01010101]]


def test_pack_rejects_non_ternary_values() -> None:
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(torch.tensor([[0, 2, 1, -1]]))
    with pytest.raises(ValueError, match="bytes a row"):
        unpack_ternary(torch.zeros(2, 3, dtype=torch.uint8), 16)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 70), (2, 5, 70)])
def test_cpu_linear_matches_dequantized_matmul_float32(with_bias: bool, shape: tuple[int, ...]) -> None:
    w, packed, scale, bias = _layer(200, 70)  # 200 rows: not a multiple of the 64-row tile
    b = bias if with_bias else None
    x = torch.randn(*shape)
    y = ternary_linear(x, packed, scale, 70, b, tile_rows=64)
    assert y.shape == (*shape[:-1], 200) and y.dtype == torch.float32
    assert _rel(y, _reference(x, w, scale, b)) < 1e-5
    assert _rel(ternary_linear(x, packed, scale, 70, b), _reference(x, w, scale, b)) < 1e-5  # default tile


@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_linear_bfloat16_within_tolerance(with_bias: bool) -> None:
    w, packed, scale, bias = _layer(300, 256)
    b = bias if with_bias else None
    x = torch.randn(3, 9, 256).bfloat16()
    y = ternary_linear(x, packed, scale.bfloat16(), 256, None if b is None else b.bfloat16(), tile_rows=128)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 9, 300)
    # The float32 reference of the same (bf16) inputs; bf16 keeps 8 mantissa bits (2**-9 relative per rounding).
    ref = _reference(x.float(), w, scale.bfloat16().float(), None if b is None else b.bfloat16().float())
    assert _rel(y, ref) < 1e-2


def test_cpu_path_never_unpacks_the_whole_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    w, packed, scale, bias = _layer(1024, 96)
    shapes: list[tuple[int, ...]] = []
    real = ternary.unpack_ternary

    def recording(p: torch.Tensor, k: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
        out = real(p, k, dtype)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(ternary, "unpack_ternary", recording)
    x = torch.randn(4, 96)
    y = ternary_linear_cpu(x, packed, scale, 96, bias, tile_rows=128)
    assert len(shapes) == 8 and max(s[0] for s in shapes) == 128
    assert _rel(y, _reference(x, w, scale, bias)) < 1e-5


def test_default_tile_is_about_4_mib_and_at_least_64_rows() -> None:
    assert ternary.default_tile_rows(3072, 3072, torch.bfloat16) * 3072 * 2 <= 4 * 2**20
    assert ternary.default_tile_rows(3072, 3072, torch.bfloat16) > 64
    assert ternary.default_tile_rows(10_000, 100_000, torch.float32) == 64
    assert ternary.default_tile_rows(10, 8, torch.float32) == 10


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from diffq.kernels.ternary import pack_ternary, ternary_linear_triton
    torch.manual_seed(0)
    for m, n, k in [(5, 40, 70), (16, 32, 64)]:
        w = torch.randint(-1, 2, (n, k))
        scale, bias, x = torch.rand(n) + 0.5, torch.randn(n), torch.randn(m, k)
        for dtype, b in [(torch.float32, bias), (torch.float32, None), (torch.bfloat16, bias)]:
            xd = x.to(dtype)
            y = ternary_linear_triton(xd, pack_ternary(w), scale, k, b)
            ref = F.linear(xd.double(), w.double() * scale.double()[:, None], None if b is None else b.double())
            assert y.dtype == dtype and y.shape == (m, n)
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            print(m, n, k, str(dtype).split(".")[1], b is not None, err)
""")


def test_triton_kernel_under_interpreter() -> None:
    pytest.importorskip("triton")
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    run = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.strip().splitlines()]
    assert len(rows) == 6
    for _m, _n, _k, dtype, _bias, err in rows:
        assert float(err) < (1e-6 if dtype == "float32" else 1e-2), rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_dispatcher_uses_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    calls: list[str] = []
    real = ternary.ternary_linear_triton
    monkeypatch.setattr(ternary, "ternary_linear_triton", lambda *a, **kw: calls.append("triton") or real(*a, **kw))
    monkeypatch.setattr(ternary, "ternary_linear_cpu", lambda *a, **kw: pytest.fail("took the CPU path on CUDA"))
    w, packed, scale, bias = _layer(300, 1000)
    x = torch.randn(2, 33, 1000)
    ref = _reference(x, w, scale, bias)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 5e-3)]:
        xd = x.to(dtype).cuda()
        y = ternary.ternary_linear(xd, packed.cuda(), scale.cuda(), 1000, bias.cuda())
        assert y.dtype == dtype and y.shape == (2, 33, 300) and y.is_cuda
        assert _rel(y.cpu(), _reference(xd.float().cpu(), w, scale, bias) if dtype != torch.float32 else ref) < tol
    assert calls == ["triton"] * 3
