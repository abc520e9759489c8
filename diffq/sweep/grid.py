"""The sweep's comparison grid: FP on top, then one row per finished job, the same prompts and
seeds in every column (every job of a sweep samples the same evaluation set)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffq.eval.grids import image_grid


def _image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float().div_(255)


def comparison_grid(sweep_dir: Path, rows: list[dict[str, Any]], path: Path, columns: int = 8) -> bool:
    """Write ``path`` from the jobs' sample folders; False when no finished job has samples. Only
    jobs that share the first job's FP images (same prompts and seeds) get a row."""
    jobs = []
    for r in rows:
        m_path = sweep_dir / r["job"] / "metrics.json"
        if r["status"] != "ok" or not m_path.exists():
            continue
        m = json.loads(m_path.read_text())
        jobs.append((r, m))
    if not jobs:
        return False
    fp_root, prompts = Path(jobs[0][1]["samples"]["fp"]), jobs[0][1]["prompts"]
    k = max(1, len(prompts) // max(1, len(list(fp_root.glob("[0-9]*/metadata.jsonl")))))
    ids = list(range(0, len(prompts), k))[:columns]  # the first image of each of the first prompts

    def side(root: Path) -> torch.Tensor:
        return torch.stack([_image(root / f"{i // k:05d}" / "samples" / f"{i % k:05d}.png") for i in ids])

    images, labels = [side(fp_root)], ["FP"]
    for r, m in jobs:
        if m["samples"]["fp"] != str(fp_root):
            continue
        images.append(side(Path(m["samples"]["quant"])))
        labels.append(f"{r['job']}: {r['quant']}"[:14])
    image_grid(images, labels, [prompts[i] for i in ids]).save(path)
    return True
