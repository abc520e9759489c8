"""torchao ``Int8Tensor`` from diffq's integer weights (2 to 8 bits, symmetric, one scale per output
row): int8 weight-only, int8 x int8 with diffq's calibrated static input range (``int_scaled_matmul``;
an asymmetric range's zero point carried over), or with per-token dynamic input scales.

Two roundings differ from diffq's fake-quant, both the kernel's own: torchao clamps inputs to
``[-128, 127]`` where diffq's symmetric grid stops at -127 (an input beyond its calibrated range lands
one step further), and the product is scaled once per output (rounded in the model dtype) instead of
rounding each weight to the model dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from diffq.deployment.grid import ActRange, WeightGrid
from diffq.deployment.lowering import KERNEL, LOWERINGS, Lowering, replace_weight
from diffq.errors import ConfigError

INT_WEIGHTS = tuple(f"int{b}" for b in range(2, 9))


def _input_rank(layer: nn.Module) -> int:
    q = layer.input_quantizer
    q = q.parts[0] if hasattr(q, "parts") else q
    if q.last_shape is None:
        raise ConfigError(f"layer {q.name}: its input's rank is unknown (a static int8 range needs it): run the "
                          "denoiser once on any input before deploying (one pipeline call; the CLI does it for you)")
    return len(q.last_shape)


def why_not(layer: nn.Module, act: ActRange | None, device: torch.device) -> str | None:
    """Why ``Int8Tensor`` does not run ``layer`` (None: it does)."""
    if layer.weight_quantizer.layout.granularity.kind not in ("channel", "tensor"):
        return "Int8Tensor's int8 kernels take one weight scale per output row (not groups)"
    if act is None:
        return None
    if act.format != "int8" and act.format != "uint8":
        return f"inputs in {act.format}: torchao's int8 kernels quantize inputs to int8"
    if act.dynamic and not (act.granularity == "token" and act.symmetric):
        return f"dynamic {act.granularity} input scales (the int8 kernel takes per-token or one static range)"
    if not act.dynamic and act.granularity != "tensor":
        return f"static {act.granularity} input ranges (the int8 kernel takes one static range)"
    if not act.dynamic:
        _input_rank(layer)
    return None


def build(layer: nn.Module, grid: WeightGrid, act: ActRange | None) -> nn.Module:
    """Replace the layer's weight by an ``Int8Tensor`` holding diffq's grid values and scales."""
    from torchao.quantization import Int8Tensor, MappingType, PerRow, PerTensor
    from torchao.quantization.quantize_.workflows import QuantizeTensorToInt8Kwargs

    dtype = layer.weight.dtype
    qdata = grid.values.to(torch.int8)
    scale = grid.scale.expand(qdata.shape[0], 1).contiguous()
    kwargs = {}
    if act is not None and act.dynamic:
        kwargs["act_quant_kwargs"] = QuantizeTensorToInt8Kwargs(granularity=PerRow())
    elif act is not None:
        shape = (1,) * _input_rank(layer)
        asym = act.zero_point is not None
        kwargs["act_quant_kwargs"] = QuantizeTensorToInt8Kwargs(
            granularity=PerTensor(), mapping_type=MappingType.ASYMMETRIC if asym else MappingType.SYMMETRIC)
        kwargs["act_quant_scale"] = act.scale.float().reshape(shape)
        if asym:  # diffq's uint8 grid [0, 255] is torchao's int8 grid [-128, 127] shifted by 128
            kwargs["act_quant_zero_point"] = (act.zero_point.float() - 128).to(torch.int8).reshape(shape)
    weight = Int8Tensor(qdata.to(layer.weight.device), scale.to(layer.weight.device), [1, qdata.shape[1]], dtype,
                        **kwargs)
    return replace_weight(layer, weight)


LOWERINGS.register("torchao_int8")(Lowering(
    backend="torchao", rank=20, formats=INT_WEIGHTS, ops=(nn.Linear,), compute=KERNEL,
    tensor="torchao Int8Tensor", why_not=why_not, build=build))
