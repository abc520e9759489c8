"""torchao ``NVFP4Tensor`` and ``MXTensor`` from diffq's NVFP4 / MXFP4 weights: FP4 tensor-core matmuls on
Blackwell GPUs (compute capability 10.0 and up). The e2m1 codes are diffq's, packed two to a byte; the
block scales are diffq's (NVFP4: the e4m3 block factors and the fp32 tensor scale; MXFP4: the e8m0
powers of two). A quantized input keeps diffq's grid: NVFP4 with diffq's calibrated tensor scale and
per-call block scales, MXFP4 with per-call e8m0 block scales (floor rounding, as OCP MX and diffq do).
"""
from __future__ import annotations

import torch
from torch import nn

from diffq.deployment.grid import ActRange, WeightGrid
from diffq.deployment.lowering import KERNEL, LOWERINGS, Lowering, replace_weight
from diffq.export import encode_tensor

MIN_CAPABILITY = (10, 0)


def why_not(layer: nn.Module, act: ActRange | None, device: torch.device) -> str | None:
    """Why torchao's FP4 kernels do not run ``layer`` (None: they do)."""
    fmt = layer.weight_quantizer.fmt.name
    if device.type != "cuda":
        return f"torchao's {fmt} kernels need a Blackwell GPU (sm100+); this device is {device.type}"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"torchao's {fmt} kernels need compute capability 10.0+ (this GPU: " \
               f"{torch.cuda.get_device_capability(device)})"
    if act is not None and act.format != fmt:
        return f"{fmt} weights with {act.format} inputs (the FP4 kernel takes both in one format)"
    return None


def fp4_parts(layer: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """diffq's e2m1 codes of the layer's weight packed two to a byte ``[N, K/2]``, and its parameters."""
    from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked, pack_uint4

    wq = layer.weight_quantizer
    w = layer.quantized_weight().detach()
    codes, params = encode_tensor(wq, w)
    values = wq.fmt.from_codes(codes).reshape(w.shape)
    return pack_uint4(f32_to_f4_unpacked(values.float())), params


def build_nvfp4(layer: nn.Module, grid: WeightGrid | None, act: ActRange | None) -> nn.Module:
    """Replace the layer's weight by an ``NVFP4Tensor`` of diffq's codes and two-level scales."""
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, QuantizeTensorToNVFP4Kwargs

    qdata, params = fp4_parts(layer)
    ts = params["tensor_scale"].float().reshape(())
    factors = (params["scale"].float() / ts).reshape(qdata.shape[0], -1).to(torch.float8_e4m3fn)
    kwargs = {}
    if act is not None:
        kwargs = {"act_quant_kwargs": QuantizeTensorToNVFP4Kwargs(),
                  "act_per_tensor_scale": act.tensor_scale.float().reshape(())}
    weight = NVFP4Tensor(qdata, factors, 16, layer.weight.dtype, per_tensor_scale=ts, **kwargs)
    return replace_weight(layer, weight)


def build_mxfp4(layer: nn.Module, grid: WeightGrid | None, act: ActRange | None) -> nn.Module:
    """Replace the layer's weight by an ``MXTensor`` of diffq's codes and e8m0 block scales."""
    from torchao.prototype.mx_formats.mx_tensor import MXTensor, QuantizeTensorToMXKwargs
    from torchao.quantization.quantize_.common import KernelPreference

    qdata, params = fp4_parts(layer)
    scale = params["scale"].float().reshape(qdata.shape[0], -1).to(torch.float8_e8m0fnu)
    fp4 = torch.float4_e2m1fn_x2
    act_kwargs = None if act is None else QuantizeTensorToMXKwargs(
        elem_dtype=fp4, block_size=32, kernel_preference=KernelPreference.AUTO)
    weight = MXTensor(qdata, scale, fp4, 32, layer.weight.dtype, KernelPreference.AUTO, act_kwargs, False)
    return replace_weight(layer, weight)


LOWERINGS.register("torchao_nvfp4")(Lowering(
    backend="torchao", rank=20, formats=("nvfp4",), ops=(nn.Linear,), compute=KERNEL,
    tensor="torchao NVFP4Tensor", why_not=why_not, build=build_nvfp4))
LOWERINGS.register("torchao_mxfp4")(Lowering(
    backend="torchao", rank=20, formats=("mxfp4",), ops=(nn.Linear,), compute=KERNEL,
    tensor="torchao MXTensor (mxfp4)", why_not=why_not, build=build_mxfp4))
