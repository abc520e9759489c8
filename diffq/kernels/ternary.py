"""2-bit packed ternary weights: pack/unpack and a matmul that never holds the whole float weight.

Storage: each weight in {-1, 0, 1} becomes the 2-bit code ``value + 1``; four codes share a byte, the lowest K
index in the lowest bits, so a row of K weights takes ``ceil(K / 4)`` bytes (padding codes are 1, i.e. value 0).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional: without it (or off CUDA) ternary_linear takes the pure-torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

_SHIFTS = (0, 2, 4, 6)
_TILE_BYTES = 4 * 1024 * 1024  # one unpacked tile of the CPU path is at most about this big
_MIN_TILE_ROWS = 64


def _check_packed(packed: Tensor, k: int) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed ternary weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != (k + 3) // 4:
        raise ValueError(f"packed has {packed.shape[1]} bytes a row, but k={k} needs {(k + 3) // 4}")


def pack_ternary(values: Tensor) -> Tensor:
    """Pack ``[N, K]`` values in {-1, 0, 1} (any dtype) into uint8 ``[N, ceil(K/4)]``, four 2-bit codes a byte."""
    if values.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D [N, K] tensor, got shape {tuple(values.shape)}")
    if not ((values == -1) | (values == 0) | (values == 1)).all():
        raise ValueError("pack_ternary expects entries in {-1, 0, 1}")
    n, k = values.shape
    codes = (values.to(torch.int16) + 1).to(torch.uint8)
    pad = (-k) % 4
    if pad:
        codes = F.pad(codes, (0, pad), value=1)  # code 1 is the value 0
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=values.device)
    groups = codes.view(n, -1, 4) << shifts  # four codes per byte, disjoint bits
    return (groups[..., 0] | groups[..., 1] | groups[..., 2] | groups[..., 3]).contiguous()


def unpack_ternary(packed: Tensor, k: int, dtype: torch.dtype = torch.int8) -> Tensor:
    """Inverse of :func:`pack_ternary`: uint8 ``[N, ceil(k/4)]`` -> ``[N, k]`` values in {-1, 0, 1} in ``dtype``."""
    _check_packed(packed, k)
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3  # [N, B, 4]
    codes = codes.view(packed.shape[0], -1)[:, :k]
    return codes.to(dtype).sub_(1)


def default_tile_rows(n: int, k: int, dtype: torch.dtype) -> int:
    """Rows of one CPU tile: the unpacked tile is at most ~4 MiB in ``dtype``, and at least 64 rows."""
    per_row = max(1, k * torch.empty((), dtype=dtype).element_size())
    return max(1, min(n, max(_MIN_TILE_ROWS, _TILE_BYTES // per_row)))


def _check_linear_args(x: Tensor, packed: Tensor, scale: Tensor, k: int, bias: Tensor | None) -> None:
    _check_packed(packed, k)
    if not x.is_floating_point() or x.shape[-1] != k:
        raise ValueError(f"x must be a float tensor [..., {k}], got {x.dtype} {tuple(x.shape)}")
    n = packed.shape[0]
    if scale.shape != (n,):
        raise ValueError(f"scale must have shape ({n},), got {tuple(scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def ternary_linear_cpu(x: Tensor, packed: Tensor, scale: Tensor, k: int, bias: Tensor | None = None,
                       tile_rows: int | None = None) -> Tensor:
    """Pure-torch ``x @ (unpack(packed) * scale[:, None]).T + bias``, unpacking ``tile_rows`` output rows at a time.

    Only one unpacked tile (``[tile_rows, k]`` in ``x.dtype``) exists at a time, never the whole float weight.
    The ternary tile is exact in any float dtype, so the matmul runs in ``x.dtype``; its output tile is then
    scaled and biased in float32 and cast once to ``x.dtype``. For bfloat16 this rounds twice (matmul output,
    final cast) instead of up to four times in bf16 (rounded scale, product, bias add), the smallest error here.
    """
    _check_linear_args(x, packed, scale, k, bias)
    n = packed.shape[0]
    rows = tile_rows if tile_rows is not None else default_tile_rows(n, k, x.dtype)
    if rows < 1:
        raise ValueError(f"tile_rows must be >= 1, got {rows}")
    x2d = x.reshape(-1, k)
    out = torch.empty(x2d.shape[0], n, dtype=x.dtype, device=x.device)
    scale32 = scale.to(device=x.device, dtype=torch.float32)
    bias32 = None if bias is None else bias.to(device=x.device, dtype=torch.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        tile = unpack_ternary(packed[r0:r1], k, x.dtype)
        y = F.linear(x2d, tile).float().mul_(scale32[r0:r1])
        if bias32 is not None:
            y.add_(bias32[r0:r1])
        out[:, r0:r1] = y
    return out.reshape(*x.shape[:-1], n)


if triton is not None:

    @triton.jit
    def _ternary_mm_kernel(a_ptr, w_ptr, scale_ptr, bias_ptr, c_ptr, M, N, K,
                           stride_am, stride_ak, stride_wn, stride_wb, stride_cm, stride_cn,
                           HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """C[M, N] = A[M, K] @ W[N, K]^T * scale[N] (+ bias[N]); W is read 2-bit packed and unpacked here."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + (offs_k[None, :] // 4) * stride_wb,
                           mask=mask_n[:, None] & mask_k[None, :], other=1)
            codes = (byte >> ((offs_k[None, :] % 4) * 2).to(tl.uint8)) & 3
            w = codes.to(tl.float32) - 1.0  # [BLOCK_N, BLOCK_K], zero where masked (code 1)
            if DOT_F32:
                acc += tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(a, tl.trans(w.to(a.dtype)))
        acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def ternary_linear_triton(x: Tensor, packed: Tensor, scale: Tensor, k: int, bias: Tensor | None = None) -> Tensor:
    """Triton ``x @ (unpack(packed) * scale[:, None]).T + bias``; float32 accumulation, output in ``x.dtype``.

    float32 inputs use an IEEE float32 dot (no TF32); 16-bit inputs use a 16-bit dot (exact for ternary weights).
    Under ``TRITON_INTERPRET=1`` every dot is done in float32 (numpy has no bfloat16).
    """
    if triton is None:
        raise RuntimeError("ternary_linear_triton needs triton, which is not installed")
    _check_linear_args(x, packed, scale, k, bias)
    n = packed.shape[0]
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    packed = packed.to(x.device).contiguous()
    scale = scale.to(x.device).contiguous()
    bias_arg = scale if bias is None else bias.to(x.device).contiguous()  # an unused pointer when no bias
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _ternary_mm_kernel[grid](
        x2d, packed, scale, bias_arg, out, m, n, k,
        x2d.stride(0), x2d.stride(1), packed.stride(0), packed.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, DOT_F32=x.dtype == torch.float32 or _interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out.reshape(*x.shape[:-1], n)


def ternary_linear(x: Tensor, packed: Tensor, scale: Tensor, k: int, bias: Tensor | None = None,
                   tile_rows: int | None = None) -> Tensor:
    """``y = x @ (unpack(packed) * scale[:, None]).T + bias`` in ``x.dtype``, x ``[..., k]`` -> y ``[..., N]``.

    CUDA tensors with Triton installed run the fused Triton kernel; anything else runs
    :func:`ternary_linear_cpu` (``tile_rows`` only applies there).
    """
    if x.is_cuda and triton is not None:
        return ternary_linear_triton(x, packed, scale, k, bias)
    return ternary_linear_cpu(x, packed, scale, k, bias, tile_rows)
