"""Low-rank FP adapters on quantized layers, in one of two modes (``finetune.lora.mode``):

- ``merge`` (EfficientDM's LoRA-QAT): the layer quantizes ``W + (alpha / r) * B @ A`` instead of
  ``W``; :func:`merge_adapter` folds the update into ``W``, and the layer then computes exactly
  what it did with the adapter attached, since the same sum is quantized: no cost, and no capacity,
  at inference;
- ``side`` (1.58-bit FLUX): a branch ``y = Q(W) x + (alpha / r) * B (A x)`` beside the quantized
  weight (:class:`~diffq.layers.SideBranch`, :func:`attach_side`), kept at inference in the model
  dtype, exported with the layer and counted in its cost.

``B`` starts at zero in both, so training starts from the PTQ model.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from diffq.errors import ConfigError
from diffq.layers import SideBranch, add_side_branch, is_quant_layer, side_branches

LORA_MODES = ("merge", "side")


def check_lora(lora: Mapping[str, Any]) -> None:
    """ConfigError for an unknown ``finetune.lora.mode``."""
    if lora["mode"] not in LORA_MODES:
        raise ConfigError(f"unknown finetune.lora.mode {lora['mode']!r}: use one of {', '.join(LORA_MODES)} "
                          "(merge: folded into the weight before rounding; side: a branch kept at inference)")


def _kaiming(rank: int, fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    a = torch.empty(rank, fan_in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # as nn.Linear and PEFT do
    return a


class LoRA(nn.Module):
    """``B @ A`` reshaped to a weight of ``shape``, scaled by ``alpha / rank`` (float32 parameters)."""

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, generator: torch.Generator | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        fan_in = math.prod(shape[1:])
        self.shape, self.scale = tuple(shape), alpha / rank
        self.A = nn.Parameter(_kaiming(rank, fan_in, generator).to(device))
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
    """Fold the layer's adapter into its weight and remove it (a side branch is not an adapter: it stays)."""
    if layer.adapter is None:
        return
    layer.weight.data = layer.latent_weight().detach()
    layer.adapter = None


def attach_side(layer: nn.Module, rank: int, alpha: float, generator: torch.Generator | None = None) -> SideBranch:
    """Give a quantized layer a float32 side branch of ``rank`` (``A`` Kaiming-uniform, ``B`` zero), or
    return the one it has (a later stage trains it on); returns it."""
    if not is_quant_layer(layer):
        raise TypeError(f"{type(layer).__name__} is not a quantized layer")
    if layer.side is not None:
        return layer.side
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1 (got {rank})")
    side = add_side_branch(layer, rank, alpha / rank, torch.float32)
    with torch.no_grad():
        side.A.copy_(_kaiming(rank, side.A[0].numel(), generator).view_as(side.A))
    return side


def describe_side_branches(model: nn.Module) -> str:
    """spec.txt's lines on the side branches kept at inference ('' when there are none)."""
    sides = side_branches(model)
    if not sides:
        return ""
    n = sum(p.numel() for s in sides.values() for p in s.parameters())
    width = max(map(len, sides))
    return (f"\nside branches (LoRA kept at inference): {len(sides)} layers, {n} parameters\n"
            + "".join(f"  {name.ljust(width)}  {s.extra_repr()}\n" for name, s in sides.items()))
