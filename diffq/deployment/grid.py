"""What a deployment builds from: a quantized layer's own integer grid values and scales.

The values come from the weight the layer computes with (its weight source: RTN, a learned rounding,
a frozen cache or packed codes), encoded by the layer's quantizer, so a deployed layer holds exactly
the grid diffq chose, never a re-quantization of the FP weight. Scales are returned per output row
and group in the layout torchao's tensors take: ``[N, groups]`` for a linear weight ``[N, K]``,
``[O, I/g, kh, kw]`` for a convolution ``[O, I, kh, kw]`` (groups along input channels at each kernel
position, diffq's convolution grouping).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffq.export import encode_tensor
from diffq.model_quant import SplitQuantizer
from diffq.timestep_groups import TimestepGroupedQuantizer

__all__ = ["ActRange", "WeightGrid", "act_range", "weight_grid"]


@dataclass(frozen=True)
class WeightGrid:
    """A layer's weight as grid values (float32, in the weight's shape) times ``scale``.

    ``scale`` has one entry per output row and group (``block_size`` elements share one, torchao's
    ``block_size``); ``format`` is the diffq format's name (``int8``, ``fp8_e4m3``, ``ternary``...)."""

    values: Tensor
    scale: Tensor
    block_size: tuple[int, ...]
    format: str

    @property
    def group(self) -> int:
        """Elements along the reduction axis that share one scale."""
        return self.block_size[1]

    def expanded_scale(self) -> Tensor:
        """The scale repeated to the weight's shape."""
        out = self.scale
        for dim, size in enumerate(self.block_size):
            out = out.repeat_interleave(size, dim=dim) if size > 1 else out
        return out


@torch.no_grad()
def weight_grid(layer: nn.Module) -> WeightGrid:
    """The grid values and scales of the weight ``layer`` computes with (a static, scaled, symmetric
    weight quantizer: int, fp, ternary; ValueError otherwise)."""
    wq = layer.weight_quantizer
    if wq is None or not wq.symmetric or wq.fmt.block_size or "zero_point" in wq.params():
        raise ValueError(f"layer {wq.name if wq else '?'}: only symmetric scaled weight grids have a deployed form")
    w = layer.quantized_weight().detach()
    shape = tuple(w.shape)
    codes, params = encode_tensor(wq, w)
    view_shape = wq.layout.grouped_shape(shape)
    values = wq.unview(wq.fmt.from_codes(codes).reshape(view_shape), shape).float().contiguous()
    scale = params["scale"].float().expand(view_shape[0], view_shape[1], 1).reshape(view_shape[:2])
    group = view_shape[2]
    if len(shape) == 4:  # conv: groups run over (kh, kw, I/g) in that order
        out, cin, kh, kw = shape
        if wq.layout.group is None:
            return WeightGrid(values, scale.reshape(out, 1, 1, 1).contiguous(), (1, cin, kh, kw), wq.fmt.name)
        scale = scale.reshape(out, kh, kw, cin // group).permute(0, 3, 1, 2).contiguous()
        return WeightGrid(values, scale, (1, group, 1, 1), wq.fmt.name)
    return WeightGrid(values, scale.contiguous(), (1, group), wq.fmt.name)


@dataclass(frozen=True)
class ActRange:
    """A layer's static activation quantization: format, ``scale`` and ``zero_point`` (None when
    symmetric) of one per-tensor grid, or ``dynamic`` (per-token scales computed at each call)."""

    format: str
    granularity: str
    dynamic: bool
    symmetric: bool
    scale: Tensor | None = None
    zero_point: Tensor | None = None
    maxval: float = 1.0  # the format's largest grid magnitude (a static range's amax is ``scale * maxval``)
    tensor_scale: Tensor | None = None  # a block format's calibrated second-level scale (NVFP4)


def act_range(layer: nn.Module) -> ActRange | None:
    """The input quantization of ``layer`` as a deployment reads it (None: the input stays in float).
    ValueError for what no deployed kernel takes: several timestep groups."""
    q = layer.input_quantizer
    if q is None or not getattr(q, "enabled", True):
        return None
    if isinstance(q, SplitQuantizer):
        raise ValueError("split input ranges (two ranges over the features)")
    if isinstance(q, TimestepGroupedQuantizer):
        if q.groups > 1:
            raise ValueError(f"{q.groups} timestep groups of activation ranges (a static kernel takes one range)")
        q = q.parts[0]
    params = q.params()
    zero = params.get("zero_point")
    return ActRange(q.fmt.name, q.granularity, q.dynamic, zero is None, params.get("scale"), zero, q.fmt.maxval,
                    params.get("tensor_scale"))
