"""Seeded, batch-invariant image generation with any of the six pipeline families."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from diffq.errors import ConfigError
from diffq.models.tiny import FAMILIES

__all__ = ["generate_images", "sample_seeds", "dit_label_ids"]

logger = logging.getLogger(__name__)

# transformer sample sizes PixArt's aspect-ratio bins exist for; others (tiny models) must not bin
_PIXART_BINNED_SIZES = (32, 64, 128, 256)
_RESERVED = (
    "prompt", "class_labels", "generator", "output_type", "num_inference_steps", "guidance_scale",
    "height", "width", "num_images_per_prompt", "return_dict",
)


def sample_seeds(base_seed: int, n: int, stream: str = "diffq") -> list[int]:
    """Per-sample seeds in [0, 2**32) derived from (stream, base_seed, sample index), stable across
    processes, so the FP and the quantized model see the same noise for sample i. A search that
    must not see the evaluation's noise draws from its own ``stream``."""
    return [
        int.from_bytes(hashlib.sha256(f"{stream}:{base_seed}:{i}".encode()).digest()[:4], "little")
        for i in range(n)
    ]


def dit_label_ids(pipe: DiffusionPipeline, labels: Sequence[str]) -> list[int]:
    """Class ids of DiT label names; unknown names raise ConfigError listing valid ones."""
    names = [label.strip() for label in labels]
    if not pipe.labels:
        raise ConfigError(
            f"{type(pipe).__name__} has no class names (no id2label in its model_index.json): "
            "load a checkpoint that has them, e.g. facebook/DiT-XL-2-256"
        )
    unknown = sorted({n for n in names if n not in pipe.labels})
    if unknown:
        valid = sorted(pipe.labels)
        shown = ", ".join(valid[:40]) + (f", ... ({len(valid)} in all, see pipe.labels)" if len(valid) > 40 else "")
        raise ConfigError(f"unknown DiT class label(s) {unknown}: use class names the model knows: {shown}")
    return pipe.get_label_ids(names)


def dit_resolution(pipe: DiffusionPipeline) -> int:
    """The one resolution a DiT pipeline generates at: its latent size times the VAE's downsampling."""
    return int(pipe.transformer.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1))


def _check_args(pipe: DiffusionPipeline, family: str, n: int, n_seeds: int, batch_size: int,
                resolution: int, call_kwargs: dict[str, Any]) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}: use one of {', '.join(FAMILIES)}")
    if n != n_seeds:
        raise ConfigError(f"got {n} prompts but {n_seeds} seeds: pass one seed per prompt (see sample_seeds)")
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be at least 1")
    clash = sorted(set(call_kwargs) & set(_RESERVED))
    if clash:
        raise ConfigError(
            f"model.call_kwargs sets {clash}, which diffq sets itself: remove them "
            "(use model.steps, model.guidance, model.resolution)"
        )
    if family == "dit":
        native = dit_resolution(pipe)
        if resolution != native:
            raise ConfigError(f"DiT generates only at its native resolution {native}: set model.resolution={native}")


@torch.no_grad()
def generate_images(
    pipe: DiffusionPipeline,
    family: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    resolution: int,
    batch_size: int = 4,
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Generate one image per prompt as float32 [N, 3, H, W] in [0, 1] on CPU.

    Sample i draws its noise from a CPU generator seeded with ``seeds[i]``, so images do not
    depend on the batch size or the device. For DiT each prompt is a class label name.
    """
    call_kwargs = dict(call_kwargs or {})
    _check_args(pipe, family, len(prompts), len(seeds), batch_size, resolution, call_kwargs)
    if not prompts:
        return torch.empty(0, 3, resolution, resolution)
    if family == "pixart" and pipe.transformer.config.sample_size not in _PIXART_BINNED_SIZES:
        call_kwargs.setdefault("use_resolution_binning", False)
    labels = dit_label_ids(pipe, prompts) if family == "dit" else None
    common: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
    if family != "dit":
        common.update(height=resolution, width=resolution)
    images: list[torch.Tensor] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
        stop = start + batch_size
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:stop]]
        batch = {"class_labels": labels[start:stop]} if labels is not None else {"prompt": list(prompts[start:stop])}
        out = pipe(**batch, generator=generators, **common, **call_kwargs).images
        images.append(torch.from_numpy(np.asarray(out, dtype=np.float32)).permute(0, 3, 1, 2))
    logger.debug("generated %d images at %d px", len(prompts), resolution)
    return torch.cat(images).clamp_(0, 1).contiguous()
