"""Q-Diffusion shortcut splitting: separate activation quantizers for the two halves of the UNet
up path's concatenation.

Each up-block ResNet consumes ``torch.cat([hidden_states, skip], dim=1)``: the upsampled path
and the skip connection from the down path, whose ranges differ by far. The layers that read
that concatenation channel for channel (the ResNet's ``conv1``, after its GroupNorm + SiLU, and
its 1x1 ``conv_shortcut``) get a :class:`~diffq.model_quant.SplitQuantizer`: the input quantizer and a copy of it,
one for channels ``[:k]`` (hidden path) and one for ``[k:]`` (skip), each with its own range.
``k`` comes from the skip tensors the up block receives in one forward pass.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from torch import nn

from diffq.layers import is_quant_layer
from diffq.methods.blocks import run_with_hooks
from diffq.quantizer import Quantizer

_UP_BLOCK = re.compile(r"^up_blocks\.\d+$")


def concat_splits(model: nn.Module, run_once: Callable[[], Any]) -> dict[str, int]:
    """``{layer name: k}`` for the quantized layers reading an up-block concatenation, ``k`` the
    channels of the hidden path (skip channels measured in one forward, ``run_once``)."""
    skips: dict[str, list[int]] = {}

    def record(name: str):
        def hook(module, args, kwargs):
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            skips[name] = [int(t.shape[1]) for t in reversed(res)]  # consumed last first
        return hook

    ups = {n: m for n, m in model.named_modules() if _UP_BLOCK.match(n)}
    run_with_hooks([m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in ups.items()], run_once)
    splits = {}
    for name, block in ups.items():
        for i, resnet in enumerate(getattr(block, "resnets", [])):
            if name not in skips or i >= len(skips[name]):
                continue
            k = resnet.in_channels - skips[name][i]
            for attr in ("conv1", "conv_shortcut"):
                layer = getattr(resnet, attr, None)
                if layer is not None and is_quant_layer(layer) and isinstance(layer.input_quantizer, Quantizer):
                    splits[f"{name}.resnets.{i}.{attr}"] = k
    return splits
