"""Reconstruction units of each architecture, in execution order.

``block``: the UNet's down/mid/up blocks (each a ResNet + Transformer unit, with its resampler),
or the transformer blocks of DiT / PixArt / SD3 / FLUX (``transformer_blocks.N``, FLUX's
``single_transformer_blocks.N``). ``layer``: every quantized Linear / Conv2d on its own.
Layers outside every block (conv_in, time embedding, final projection...) keep their RTN
weights.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

from diffq.errors import ConfigError
from diffq.layers import is_quant_layer

GRANULARITIES = ("layer", "block")
_UNET_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)$")
_TRANSFORMER_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|joint_transformer_blocks)\.\d+$")


def _candidates(model: nn.Module, granularity: str) -> dict[str, nn.Module]:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown reconstruction granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if granularity == "layer":
        return {n: m for n, m in model.named_modules() if is_quant_layer(m) and m.weight_quantizer is not None}
    return {n: m for n, m in model.named_modules() if _UNET_BLOCK.match(n) or _TRANSFORMER_BLOCK.match(n)}


def find_blocks(model: nn.Module, granularity: str, run_once: Callable[[], Any]) -> list[tuple[str, nn.Module]]:
    """Units holding quantized layers, in the order one forward (``run_once``) executes them."""
    candidates = {n: m for n, m in _candidates(model, granularity).items()
                  if any(is_quant_layer(x) for x in m.modules())}
    if not candidates:
        raise ConfigError(f"{type(model).__name__} has no {granularity}-level units with quantized layers: use "
                          f"quant.recon=layer, or quantize layers inside its blocks")
    order: list[str] = []
    run_with_hooks([m.register_forward_pre_hook(lambda *_, n=n: order.append(n) if n not in order else None)
                    for n, m in candidates.items()], run_once)
    return [(n, candidates[n]) for n in order]


def run_with_hooks(hooks: Sequence[Any], run_once: Callable[[], Any]) -> None:
    """Run ``run_once`` without gradients, then remove ``hooks`` (also on failure)."""
    try:
        with torch.no_grad():
            run_once()
    finally:
        for h in hooks:
            h.remove()


def quant_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Quantized layers inside ``block`` (itself included when it is one)."""
    return {n: m for n, m in block.named_modules() if is_quant_layer(m)}

