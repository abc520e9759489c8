"""torchao ``Float8Tensor`` from diffq's FP8 E4M3 weights (one scale per output row): ``torch._scaled_mm``
on CUDA GPUs with FP8 tensor cores (compute capability 8.9 and up). A static input range becomes
torchao's dynamic per-row input scale pinned to diffq's calibrated range (``hp_value_lb = hp_value_ub``
= the range's amax, so every row gets diffq's one scale); a per-token dynamic input stays per-token.
"""
from __future__ import annotations

import torch
from torch import nn

from diffq.deployment.grid import ActRange, WeightGrid
from diffq.deployment.lowering import KERNEL, LOWERINGS, Lowering, replace_weight

MIN_CAPABILITY = (8, 9)


def why_not(layer: nn.Module, act: ActRange | None, device: torch.device) -> str | None:
    """Why ``Float8Tensor`` does not run ``layer`` (None: it does)."""
    if device.type != "cuda":
        return f"torchao's fp8 kernels need a CUDA GPU with FP8 tensor cores (sm89+); this device is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return f"torchao's fp8 kernels need compute capability 8.9+ (this GPU: {capability})"
    if layer.weight_quantizer.layout.granularity.kind not in ("channel", "tensor"):
        return "Float8Tensor takes one weight scale per output row"
    if act is not None and (act.format != "fp8_e4m3" or act.zero_point is not None
                            or act.granularity not in ("tensor", "token")):
        return f"inputs quantized as {act.format}/{act.granularity}: the fp8 kernel takes e4m3 per-tensor or per-token"
    return None


def build(layer: nn.Module, grid: WeightGrid, act: ActRange | None) -> nn.Module:
    """Replace the layer's weight by a ``Float8Tensor`` of diffq's e4m3 grid values and scales."""
    from torchao.quantization import Float8Tensor, PerRow
    from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs

    kwargs = {}
    if act is not None:
        bound = None if act.dynamic else float(act.scale.reshape(-1)[0]) * act.maxval
        kwargs["act_quant_kwargs"] = QuantizeTensorToFloat8Kwargs(
            float8_dtype=torch.float8_e4m3fn, granularity=PerRow(), hp_value_lb=bound, hp_value_ub=bound)
    device = layer.weight.device
    qdata = grid.values.to(torch.float8_e4m3fn)
    weight = Float8Tensor(qdata.to(device), grid.scale.expand(qdata.shape[0], 1).contiguous().to(device),
                          block_size=[1, qdata.shape[1]], dtype=layer.weight.dtype, **kwargs)
    return replace_weight(layer, weight)


LOWERINGS.register("torchao_float8")(Lowering(
    backend="torchao", rank=20, formats=("fp8_e4m3",), ops=(nn.Linear,), compute=KERNEL,
    tensor="torchao Float8Tensor (torch._scaled_mm)", why_not=why_not, build=build))
