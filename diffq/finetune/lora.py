"""Low-rank FP adapters on quantized layers (EfficientDM's LoRA-QAT): the layer quantizes
``W + (alpha / r) * B @ A`` instead of ``W``; ``B`` starts at zero, so training starts from the
PTQ model. :func:`merge_adapter` folds the update into ``W``; the layer then computes exactly what
it did with the adapter attached, since the same sum is quantized."""
from __future__ import annotations

import math

import torch
from torch import nn

from diffq.layers import is_quant_layer


class LoRA(nn.Module):
    """``B @ A`` reshaped to a weight of ``shape``, scaled by ``alpha / rank`` (float32 parameters)."""

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, generator: torch.Generator | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        fan_in = math.prod(shape[1:])
        self.shape, self.scale = tuple(shape), alpha / rank
        a = torch.empty(rank, fan_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear and PEFT do
        self.A = nn.Parameter(a.to(device))
        self.B = nn.Parameter(torch.zeros(shape[0], rank, device=device))

    def forward(self) -> torch.Tensor:
        """The weight update."""
        return (self.B @ self.A).mul(self.scale).reshape(self.shape)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, scale={self.scale:g}"


def attach_adapter(layer: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None) -> LoRA:
    """Give a quantized layer a LoRA adapter of ``rank``; returns it."""
    if not is_quant_layer(layer):
        raise TypeError(f"{type(layer).__name__} is not a quantized layer")
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1 (got {rank})")
    layer.adapter = LoRA(tuple(layer.weight.shape), rank, alpha, generator, layer.weight.device)
    return layer.adapter


@torch.no_grad()
def merge_adapter(layer: nn.Module) -> None:
    """Fold the layer's adapter into its weight and remove it."""
    if layer.adapter is None:
        return
    layer.weight.data = layer.latent_weight().detach()
    layer.adapter = None
