"""diffq's ternary kernel for 1.58-bit linear layers: the {-1, 0, 1} weights packed four to a byte
and unpacked inside the matmul (:mod:`diffq.kernels.ternary`: Triton on a GPU, row tiles on the CPU),
so only the 2-bit codes and one scale per output row stay resident. An int8 per-token input grid
(``ternary_w158a8``) is applied to the input before the matmul, as diffq's fake-quant does."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from diffq.deployment.grid import ActRange, WeightGrid
from diffq.deployment.lowering import KERNEL, LOWERINGS, Lowering
from diffq.kernels.ternary import pack_ternary, ternary_linear, unpack_ternary

KERNEL_NAME = "diffq 2-bit ternary kernel"  # what the coverage table says (load_deployed repacks these rows)


class TernaryLinear(nn.Module):
    """A linear layer with 2-bit packed ternary weights (``packed`` ``[N, ceil(K/4)]`` uint8, ``scale``
    ``[N]``); ``input_bits``: inputs quantized per token to that many bits first (None: as they come)."""

    def __init__(self, packed: Tensor, scale: Tensor, in_features: int, bias: Tensor | None,
                 input_bits: int | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, packed.shape[0]
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.input_bits = input_bits

    @classmethod
    def from_grid(cls, grid: WeightGrid, bias: Tensor | None, input_bits: int | None = None) -> TernaryLinear:
        """Pack a ternary :class:`WeightGrid` (one scale per row)."""
        return cls(pack_ternary(grid.values), grid.scale.reshape(-1).float(), grid.values.shape[1], bias, input_bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``[N, K]`` (for saving in a torchao layout and for tests; not used by forward)."""
        return (unpack_ternary(self.packed, self.in_features, torch.float32) * self.scale[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if self.input_bits is not None:
            qmax = 2 ** (self.input_bits - 1) - 1
            step = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / qmax
            x = (x.float() / step).round_().clamp_(-qmax, qmax).mul_(step).to(x.dtype)
        return ternary_linear(x, self.packed, self.scale, self.in_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"2-bit packed ternary" + ("" if self.input_bits is None else f", int{self.input_bits} inputs"))


def why_not(layer: nn.Module, act: ActRange | None, device: torch.device) -> str | None:
    """Why the ternary kernel does not run ``layer`` (None: it does)."""
    if layer.weight_quantizer.layout.granularity.kind not in ("channel", "tensor"):
        return "the ternary kernel takes one scale per output row"
    if act is not None and not (act.dynamic and act.granularity == "token" and act.symmetric
                                and act.format.startswith("int")):
        return f"inputs quantized as {act.format}/{act.granularity}: the ternary kernel takes per-token int inputs"
    return None


def build(layer: nn.Module, grid: WeightGrid, act: ActRange | None) -> nn.Module:
    """A :class:`TernaryLinear` in place of the layer."""
    bits = None if act is None else int(act.format.removeprefix("int"))
    bias = None if layer.bias is None else layer.bias.detach()
    return TernaryLinear.from_grid(grid, bias, bits).to(layer.weight.device)


LOWERINGS.register("ternary")(Lowering(
    backend="torchao", rank=10, formats=("ternary",), ops=(nn.Linear,), compute=KERNEL,
    tensor=KERNEL_NAME, why_not=why_not, build=build))
