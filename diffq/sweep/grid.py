"""The sweep's comparison grid: FP on top, then one row per finished job that sampled the first
one's evaluation set (same prompts and seeds: with a seed sweep, the jobs of the first seed), each
labelled with its configuration; its columns spread over the evaluation set's tasks."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffq.eval.grids import image_grid, spread_indices


def _image(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float().div_(255)


def comparison_grid(rows: list[dict[str, Any]], path: Path, columns: int = 8) -> bool:
    """Write ``path`` from the sample folders of the job rows ``rows`` (in their order); False when no
    finished job has samples. Only jobs that share the first job's FP images get a row."""
    jobs = []
    for r in rows:
        m_path = r["_dir"] / "metrics.json"
        if r["status"] != "ok" or not m_path.exists():
            continue
        m = json.loads(m_path.read_text())
        jobs.append((r, m))
    if not jobs:
        return False
    fp_root, prompts = Path(jobs[0][1]["samples"]["fp"]), jobs[0][1]["prompts"]
    entries = sorted(fp_root.glob("[0-9]*/metadata.jsonl"))
    k = max(1, len(prompts) // max(1, len(entries)))
    tags = [json.loads(e.read_text()).get("tag") for e in entries for _ in range(k)]
    ids = spread_indices(prompts, tags + [None] * (len(prompts) - len(tags)), columns)  # one per task in turn

    def side(root: Path) -> torch.Tensor:
        return torch.stack([_image(root / f"{i // k:05d}" / "samples" / f"{i % k:05d}.png") for i in ids])

    images, labels = [side(fp_root)], ["FP"]
    for r, m in jobs:
        if m["samples"]["fp"] != str(fp_root):
            continue
        images.append(side(Path(m["samples"]["quant"])))
        labels.append("\n".join(textwrap.wrap(r["label"], 14)[:4]))  # the label column is 14 characters wide
    image_grid(images, labels, [prompts[i] for i in ids]).save(path)
    return True
