"""Reconstruction units of each architecture, in execution order.

``block``: the UNet's down/mid/up blocks (each with its resampler), or the transformer blocks of
DiT / PixArt / SD3 / FLUX (``transformer_blocks.N``, FLUX's ``single_transformer_blocks.N``).
``pair``: BRECQ / Q-Diffusion's unit, one UNet ResNet together with the Transformer that follows
it (a ResNet alone where none follows; resamplers on their own); transformer blocks as in
``block``. ``layer``: every quantized Linear / Conv2d on its own. Layers outside every unit
(conv_in, time embedding, final projection...) keep their RTN weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from diffq.errors import ConfigError
from diffq.layers import is_quant_layer

GRANULARITIES = ("layer", "block", "pair")
_UNET_BLOCK = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)$")
_UNET_PART = re.compile(
    r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.(resnets|attentions|downsamplers|upsamplers)\.\d+$")
_TRANSFORMER_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|joint_transformer_blocks)\.\d+$")


@dataclass
class Unit:
    """Modules reconstructed together; each after the first takes the previous one's output as its
    first input (a ResNet + Transformer pair), the unit's output is the last one's."""

    name: str
    modules: list[nn.Module]


def _candidates(model: nn.Module, granularity: str) -> dict[str, nn.Module]:
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown reconstruction granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if granularity == "layer":
        return {n: m for n, m in model.named_modules() if is_quant_layer(m) and m.weight_quantizer is not None}
    unet = _UNET_PART if granularity == "pair" else _UNET_BLOCK
    return {n: m for n, m in model.named_modules() if unet.match(n) or _TRANSFORMER_BLOCK.match(n)}


def _group(order: list[str], granularity: str) -> list[list[str]]:
    """Execution-ordered names as units: in ``pair``, an attention joins the ResNet run just before it."""
    units: list[list[str]] = []
    for name in order:
        prev = units[-1][-1] if units else ""
        joins = (granularity == "pair" and ".attentions." in name and ".resnets." in prev
                 and prev.split(".resnets.")[0] == name.split(".attentions.")[0])
        if joins:
            units[-1].append(name)
        else:
            units.append([name])
    return units


def find_units(model: nn.Module, granularity: str, run_once: Callable[[], Any]) -> list[Unit]:
    """Units holding quantized layers, in the order one forward (``run_once``) executes them."""
    candidates = _candidates(model, granularity)
    order: list[str] = []
    run_with_hooks([m.register_forward_pre_hook(lambda *_, n=n: order.append(n) if n not in order else None)
                    for n, m in candidates.items()], run_once)
    units = [Unit("+".join([names[0], *(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names[1:])]),
                  [candidates[n] for n in names]) for names in _group(order, granularity)]
    units = [u for u in units if any(is_quant_layer(x) for m in u.modules for x in m.modules())]
    if not units:
        raise ConfigError(f"{type(model).__name__} has no {granularity}-level units with quantized layers: use "
                          f"quant.recon=layer, or quantize layers inside its blocks")
    return units


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
