"""Sample grids: one row per model (FP above quantized), prompts as column captions."""
from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def spread_indices(prompts: Sequence[str], tags: Sequence[str | None], n: int) -> list[int]:
    """``n`` image indices for a grid that shows the evaluation set's range: the first image of each
    distinct prompt, taken in turn from each task (``tags``, e.g. GenEval's counting, colors,
    position...) in order of first appearance, then further images when there are fewer prompts."""
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    by_task: dict[str | None, list[int]] = {}
    for i in first.values():
        by_task.setdefault(tags[i], []).append(i)
    picks: list[int] = []
    queues = list(by_task.values())
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop(0))
    picks += [i for i in range(len(prompts)) if i not in set(picks)][: n - len(picks)]
    return picks


def image_grid(
    rows: Sequence[torch.Tensor], row_labels: Sequence[str], captions: Sequence[str], cell: int = 128, gap: int = 4
) -> Image.Image:
    """Tile ``rows`` of [N, 3, H, W] images in [0, 1]; tiny images are upscaled (nearest)."""
    n = rows[0].shape[0]
    tile = cell - gap
    font = ImageFont.load_default()
    label_w, cap_lines = 90, 3
    cap_h = 12 * cap_lines + 6
    grid = Image.new("RGB", (label_w + n * cell, cap_h + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for j, caption in enumerate(captions[:n]):
        wrapped = textwrap.wrap(caption, width=max(8, cell // 6))[:cap_lines]
        draw.multiline_text((label_w + j * cell + 3, 3), "\n".join(wrapped), fill="black", font=font, spacing=1)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        y = cap_h + i * cell
        draw.text((4, y + cell // 2 - 6), label, fill="black", font=font)
        arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for j in range(n):
            grid.paste(Image.fromarray(arr[j]).resize((tile, tile), Image.NEAREST), (label_w + j * cell, y))
    return grid
