"""torchao ``IntxUnpackedToInt8Tensor`` from diffq's integer and ternary weights, for what no low-bit
kernel takes: convolutions and group-wise scales. The codes stay resident as int8 with their scales
and are decoded in each call (``(q * scale)`` in float32, then the model dtype: exactly diffq's
fake-quant weight), so the layer keeps its memory saving and diffq's exact numerics, not a speed-up.
Its inputs must be unquantized: torchao runs no quantized-input convolution."""
from __future__ import annotations

import torch
from torch import nn

from diffq.deployment.grid import ActRange, WeightGrid
from diffq.deployment.lowering import DEQUANT, LOWERINGS, Lowering, replace_weight

BITS = {**{f"int{b}": b for b in range(2, 9)}, "ternary": 2}


def why_not(layer: nn.Module, act: ActRange | None, device: torch.device) -> str | None:
    """Why the int8-held weight does not run ``layer`` (None: it does)."""
    if act is not None:
        return f"inputs quantized to {act.format}: torchao has no quantized-input kernel for this layer"
    return None


def intx_weight(grid: WeightGrid, dtype: torch.dtype) -> torch.Tensor:
    """The ``IntxUnpackedToInt8Tensor`` of ``grid`` (scales in float32: the decode is diffq's own)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    bits = BITS[grid.format]
    return IntxUnpackedToInt8Tensor(
        qdata=grid.values.to(torch.int8), scale=grid.scale.float(),
        zero_point=torch.zeros(grid.scale.shape, dtype=torch.int8, device=grid.scale.device),
        target_dtype=getattr(torch, f"int{bits}"), block_size=list(grid.block_size), dtype=dtype,
        activation_quantization=None)


def build(layer: nn.Module, grid: WeightGrid, act: ActRange | None) -> nn.Module:
    """Replace the layer's weight by its int8-held codes and scales."""
    return replace_weight(layer, intx_weight(grid, layer.weight.dtype))


LOWERINGS.register("torchao_intx")(Lowering(
    backend="torchao", rank=90, formats=tuple(BITS), ops=(nn.Linear, nn.Conv2d), compute=DEQUANT,
    tensor="torchao IntxUnpackedToInt8Tensor (int8-held codes)", why_not=why_not, build=build))
