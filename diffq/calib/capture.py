"""Capture the FP denoiser's inputs along sampler trajectories (the calibration set)."""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from diffq.errors import CalibrationError
from diffq.models import denoiser_of, generate_images

log = logging.getLogger(__name__)


@dataclass
class CalibSample:
    """Keyword arguments of one recorded denoiser call (a batch, CFG branches included)."""

    kwargs: dict[str, Any]
    step: int  # index of the sampler step this call came from

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The kwargs moved to ``device`` (floating tensors cast to ``dtype`` if given)."""
        return map_tensors(self.kwargs, lambda t: t.to(device, dtype if (dtype and t.is_floating_point()) else None))


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) replaced by ``fn(tensor)``."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def _iter_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _iter_tensors(v, f"{prefix}.{k}")


def uniform_steps(total: int, keep: int) -> list[int]:
    """``keep`` sampler-step indices evenly spaced over ``total`` steps (first and last included)."""
    if keep >= total:
        return list(range(total))
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, keep)})


def check_finite(sample_kwargs: Mapping[str, Any], step: int) -> None:
    """Raise CalibrationError if any captured tensor holds NaN/Inf."""
    for name, t in _iter_tensors(sample_kwargs, "input"):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CalibrationError(
                f"NaN/Inf in the FP denoiser's {name[6:]} at sampler step {step}: the FP model itself "
                "diverges. Fix: run the model in float32 (model.dtype=float32) or check its weights."
            )


class CallRecorder:
    """Forward pre-hook that keeps the named kwargs of every denoiser call (in signature order: the
    latent input first)."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.signature = inspect.signature(denoiser.forward)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        self.calls.append(
            {k: map_tensors(v, lambda t: t.detach().to("cpu", copy=True))
             for k, v in bound.items() if k != "return_dict"}
        )


def capture_trajectories(
    pipe: Any,
    family: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    resolution: int,
    keep_steps: int,
    batch_size: int,
    call_kwargs: Mapping[str, Any] | None = None,
) -> list[CalibSample]:
    """Run the FP sampler on ``prompts`` and keep the denoiser inputs at evenly spaced steps.

    Only one batch of trajectories is held in memory at a time.
    """
    _, denoiser = denoiser_of(pipe)
    recorder = CallRecorder(denoiser)
    handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    samples: list[CalibSample] = []
    try:
        for start in range(0, len(prompts), batch_size):
            recorder.calls.clear()
            generate_images(
                pipe, family, prompts[start : start + batch_size], seeds[start : start + batch_size],
                steps=steps, guidance=guidance, resolution=resolution, batch_size=batch_size,
                call_kwargs=dict(call_kwargs or {}), progress=False,
            )
            for step in uniform_steps(len(recorder.calls), keep_steps):
                check_finite(recorder.calls[step], step)
                samples.append(CalibSample(recorder.calls[step], step))
    finally:
        handle.remove()
    log.info("captured %d denoiser calls from %d prompts (%d steps kept of %d)",
             len(samples), len(prompts), min(keep_steps, steps), steps)
    return samples


def flatten_samples(samples: Sequence[CalibSample]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Split samples into a flat tensor dict and a JSON structure (for the on-disk cache)."""
    tensors: dict[str, torch.Tensor] = {}
    layout = []

    def encode(obj: Any, key: str) -> Any:
        if torch.is_tensor(obj):
            tensors[key] = obj
            return {"__tensor__": key}
        if isinstance(obj, Mapping):
            return {k: encode(v, f"{key}.{k}") for k, v in obj.items()}
        return obj

    for i, s in enumerate(samples):
        layout.append({"step": s.step, "kwargs": {k: encode(v, f"{i}.{k}") for k, v in s.kwargs.items()}})
    return tensors, layout


def unflatten_samples(tensors: Mapping[str, torch.Tensor], layout: Sequence[Mapping[str, Any]]) -> list[CalibSample]:
    """Inverse of :func:`flatten_samples`."""

    def decode(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            if set(obj) == {"__tensor__"}:
                return tensors[obj["__tensor__"]]
            return {k: decode(v) for k, v in obj.items()}
        return obj

    return [CalibSample(decode(entry["kwargs"]), int(entry["step"])) for entry in layout]
