"""Where each layer of a denoiser sits: its UNet resolution level, or its transformer block.

BinaryDM gives high-resolution layers two sign bases and binarises the model progressively from
the middle outwards (the middle block, then level by level from the lowest); both need the layers
grouped by position:

- UNets (``down_blocks`` / ``mid_block`` / ``up_blocks``): level ``i`` of ``down_blocks.i`` works at
  ``1 / 2**i`` of the input resolution (its downsampler reads level ``i`` too), ``up_blocks.j`` at
  level ``L - 1 - j`` (``L`` levels), the middle block at the lowest level ``L - 1``;
- transformers (``transformer_blocks`` then ``single_transformer_blocks``, in execution order):
  block ``i`` of ``N`` is ``min(i, N - 1 - i)`` blocks from the nearer end.

Layers outside the blocks (patch / conv embeddings, time embeddings, final projections) have no
position (None).
"""
from __future__ import annotations

import math
import re

from torch import nn

from diffq.roles import QUANTIZABLE_TYPES

__all__ = ["unet_levels", "block_positions", "high_resolution_layers", "middle_out_groups"]

_UNET_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^mid_block\.")
_DIT_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)]


def is_unet(model: nn.Module) -> bool:
    """Whether ``model`` has the UNet's down / mid / up blocks."""
    return hasattr(model, "down_blocks") and hasattr(model, "up_blocks")


def unet_levels(model: nn.Module) -> dict[str, int | None]:
    """Each quantizable layer's resolution level (0: the input resolution) or None outside the blocks."""
    n = len(model.down_blocks)
    out: dict[str, int | None] = {}
    for name in _layers(model):
        m = _UNET_BLOCK.match(name)
        if m is None:
            out[name] = None
        elif m.group(1) is None:
            out[name] = n - 1
        else:
            i = int(m.group(2))
            out[name] = i if m.group(1) == "down_blocks" else n - 1 - i
    return out


def block_positions(model: nn.Module) -> dict[str, tuple[int, int] | None]:
    """Each quantizable layer's (block index in execution order, number of blocks), or None."""
    double = len(getattr(model, "transformer_blocks", None) or [])
    total = double + len(getattr(model, "single_transformer_blocks", None) or [])
    out: dict[str, tuple[int, int] | None] = {}
    for name in _layers(model):
        m = _DIT_BLOCK.match(name)
        out[name] = None if m is None else (int(m.group(2)) + (double if m.group(1).startswith("single") else 0),
                                            total)
    return out


def high_resolution_layers(model: nn.Module, min_resolution: float = 0.5, edge_blocks: int = 1) -> list[str]:
    """The layers BinaryDM calls high-resolution: in a UNet, those of the levels working at
    ``min_resolution`` of the input or more (never the lowest level, the middle block's); in a
    transformer, those of the first and last ``edge_blocks`` blocks."""
    if is_unet(model):
        lowest = len(model.down_blocks) - 1
        top = math.floor(math.log2(1 / min_resolution) + 1e-9) if min_resolution > 0 else lowest
        return [n for n, lv in unet_levels(model).items() if lv is not None and lv <= min(top, lowest - 1)]
    return [n for n, pos in block_positions(model).items()
            if pos is not None and min(pos[0], pos[1] - 1 - pos[0]) < edge_blocks]


def middle_out_groups(model: nn.Module) -> list[list[str]]:
    """The quantizable layers in groups from the middle of the network outwards (UNet: the middle
    block, then each resolution level's down and up blocks from the lowest, as BinaryDM's code groups
    its UNet; transformer: the middle blocks first); layers outside the blocks join the last
    (outermost) group."""
    if is_unet(model):
        lowest = len(model.down_blocks) - 1
        depth = {n: None if lv is None else 0 if n.startswith("mid_block.") else lowest - lv + 1
                 for n, lv in unet_levels(model).items()}
    else:
        pos = block_positions(model)
        edge = {n: None if p is None else min(p[0], p[1] - 1 - p[0]) for n, p in pos.items()}
        deepest = max((e for e in edge.values() if e is not None), default=0)
        depth = {n: None if e is None else deepest - e for n, e in edge.items()}
    last = max((d for d in depth.values() if d is not None), default=0)
    groups: list[list[str]] = [[] for _ in range(last + 1)]
    for name, d in depth.items():
        groups[last if d is None else d].append(name)
    return [g for g in groups if g]
