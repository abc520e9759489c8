"""GenEval-shapes: generate the world's evaluation prompts and score them with the shapes detector."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from diffq.eval.fid import to_uint8_hwc as to_uint8
from diffq.eval.geneval import GenEvalResult, chance_levels, score
from diffq.testbed.detector import ShapesDetector
from diffq.testbed.groundtruth import render_entry
from diffq.testbed.prompts import evaluation_metadata


def geneval_images(
    pipe: Any, family: str, entries: Sequence[dict], images_per_prompt: int, seed: int, **sampling: Any
) -> torch.Tensor:
    """Prompt-major images for ``entries`` (image j of prompt i uses seed ``sample_seeds(seed)[i*k+j]``)."""
    from diffq.models import generate_images, sample_seeds  # the pipelines' stack, loaded when generating

    prompts = [e["prompt"] for e in entries for _ in range(images_per_prompt)]
    return generate_images(pipe, family, prompts, sample_seeds(seed, len(prompts)), **sampling)


def geneval_shapes(images: torch.Tensor, entries: Sequence[dict] | None = None,
                   images_per_prompt: int = 4) -> GenEvalResult:
    """Score prompt-major images of ``entries`` (default: the world's evaluation set)."""
    entries = list(entries or evaluation_metadata())
    return score(entries, ShapesDetector()(to_uint8(images)), images_per_prompt)


def chance(entries: Sequence[dict] | None = None, seed: int = 0, images_per_prompt: int = 4) -> dict[str, float]:
    """Per-task accuracy of a generator that draws a random prompt of the same task."""
    entries = list(entries or evaluation_metadata())
    return chance_levels(entries, render_entry, ShapesDetector(), np.random.default_rng(seed), images_per_prompt).tasks
