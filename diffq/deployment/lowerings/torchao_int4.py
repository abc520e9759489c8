"""torchao ``Int4TilePackedTo4dTensor`` from diffq's symmetric INT4 weights: tinygemm's int4 x bf16
kernel on CUDA GPUs (compute capability 8.0 and up), bf16 models, inputs unquantized. tinygemm decodes
``(q - 8) * scale + zero``: diffq's code ``c`` in [-7, 7] is stored as ``c + 8`` with zero 0, and a
per-channel scale is repeated over groups of 128 (tinygemm's groups are 32 to 256 wide), so the kernel
decodes exactly diffq's grid.
"""
from __future__ import annotations

import torch
from torch import nn

from diffq.deployment.grid import ActRange, WeightGrid
from diffq.deployment.lowering import KERNEL, LOWERINGS, Lowering, replace_weight

GROUPS = (32, 64, 128, 256)
CHANNEL_GROUP = 128
INNER_K_TILES = 8


def why_not(layer: nn.Module, act: ActRange | None, device: torch.device) -> str | None:
    """Why tinygemm does not run ``layer`` (None: it does)."""
    if device.type != "cuda":
        return f"torchao's int4 kernel (tinygemm) needs a CUDA GPU; this device is {device.type}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "tinygemm needs compute capability 8.0+"
    if layer.weight.dtype != torch.bfloat16:
        return f"tinygemm runs bfloat16 models (this one is {layer.weight.dtype})"
    if act is not None:
        return "tinygemm takes unquantized inputs (int4 weight-only)"
    gran = layer.weight_quantizer.layout.granularity
    if gran.kind == "group" and gran.size not in GROUPS:
        return f"tinygemm's groups are {GROUPS} wide (this layer: {gran.size})"
    if gran.kind not in ("group", "channel", "tensor"):
        return f"{gran.kind} weight scales"
    return None


def _pad(t: torch.Tensor, rows: int, cols: int, value: float) -> torch.Tensor:
    out = torch.full((rows, cols), value, dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def build(layer: nn.Module, grid: WeightGrid, act: ActRange | None) -> nn.Module:
    """Replace the layer's weight by tinygemm's packed int4 tiles of diffq's codes and scales."""
    from torchao.quantization import Int4TilePackedTo4dTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros
    from torchao.utils import find_multiple

    n, k = grid.values.shape
    group = CHANNEL_GROUP if grid.group == k else grid.group
    n_pad, k_pad = find_multiple(n, 8), find_multiple(k, 1024)
    device = layer.weight.device
    codes = _pad((grid.values + 8).to(torch.int32), n_pad, k_pad, 8).to(device)
    scale = _pad(grid.expanded_scale()[:, ::group], n_pad, k_pad // group, 1.0).to(device, torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack(
        (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous(), INNER_K_TILES)
    weight = Int4TilePackedTo4dTensor(
        qdata=packed, scale_and_zero=pack_tinygemm_scales_and_zeros(scale, torch.zeros_like(scale), torch.bfloat16),
        block_size=[1, group], shape=torch.Size([n, k]), act_pre_scale=None)
    return replace_weight(layer, weight)


LOWERINGS.register("torchao_int4")(Lowering(
    backend="torchao", rank=10, formats=("int4",), ops=(nn.Linear,), compute=KERNEL,
    tensor="torchao Int4TilePackedTo4dTensor (tinygemm)", why_not=why_not, build=build))
