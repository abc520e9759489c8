"""Calibration data: capture the FP sampler's denoiser inputs, cache them, hand them to methods."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from diffq.calib.cache import cache_key, cache_path, load_tensors, save_tensors
from diffq.calib.capture import CalibSample, capture_trajectories, flatten_samples, unflatten_samples, uniform_steps
from diffq.errors import ConfigError
from diffq.models import sample_seeds

log = logging.getLogger(__name__)

__all__ = ["CalibSample", "calibration_prompts", "load_or_capture", "uniform_steps"]

_CACHE_VERSION = 1


def calibration_prompts(prompts: Sequence[str], prompts_file: str | None, count: int) -> list[str]:
    """The ``count`` calibration prompts (cycled when fewer are given)."""
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"calibration prompt file {path} does not exist: fix calib.prompts_file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"calibration prompt file {path} is empty: put one prompt per line")
    if not prompts:
        raise ConfigError("no calibration prompts: set calib.prompts or calib.prompts_file")
    if count <= 0:
        raise ConfigError(f"calib.num_prompts must be positive (got {count})")
    return [prompts[i % len(prompts)] for i in range(count)]


def load_or_capture(
    pipe: Any,
    family: str,
    *,
    model_key: dict[str, Any],
    prompts: Sequence[str],
    seed: int,
    steps: int,
    guidance: float,
    resolution: int,
    keep_steps: int,
    batch_size: int,
    call_kwargs: dict[str, Any],
    cache_dir: str | None,
) -> tuple[list[CalibSample], bool]:
    """The calibration set for this config, from the cache when present; returns (samples, hit)."""
    seeds = sample_seeds(seed, len(prompts))
    key = cache_key({
        "v": _CACHE_VERSION, "model": model_key, "prompts": list(prompts), "seeds": seeds, "steps": steps,
        "guidance": guidance, "resolution": resolution, "keep": keep_steps, "call_kwargs": call_kwargs,
    })
    path = cache_path(cache_dir, "calib", key) if cache_dir else None
    if path is not None and (hit := load_tensors(path)) is not None:
        tensors, meta = hit
        log.info("calibration set loaded from cache %s", path)
        return unflatten_samples(tensors, meta["layout"]), True
    samples = capture_trajectories(
        pipe, family, prompts, seeds, steps=steps, guidance=guidance, resolution=resolution,
        keep_steps=keep_steps, batch_size=batch_size, call_kwargs=call_kwargs,
    )
    if path is not None:
        tensors, layout = flatten_samples(samples)
        save_tensors(path, tensors, {"layout": layout})
        log.info("calibration set cached at %s", path)
    return samples, False
