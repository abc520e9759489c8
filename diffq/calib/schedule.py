"""What a sampler run says about its noise levels: for every scheduler step, the coefficients
``(a, b)`` of the denoiser's input ``x = a * x0 + b * noise``, and the final latent ``x0``.

They let training data be built from the teacher's own generated latents: noise ``x0`` afresh at
any of the sampler's timesteps and hand the denoiser the conditioning it had there.

- flow matching (``FlowMatch*`` schedulers): ``x = (1 - sigma) x0 + sigma noise``;
- sigma schedulers of variance-preserving models (Euler, DPM-Solver...): the denoiser sees
  ``x / sqrt(1 + sigma^2)``, i.e. ``a = 1 / sqrt(1 + sigma^2)``, ``b = sigma a``;
- timestep schedulers (DDIM, DDPM, PNDM...): ``a = sqrt(alpha_bar_t)``, ``b = sqrt(1 - alpha_bar_t)``.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def is_flow_matching(scheduler: Any) -> bool:
    """Whether the scheduler integrates a rectified flow (the denoiser predicts a velocity)."""
    return "FlowMatch" in type(scheduler).__name__


def prediction_type(scheduler: Any) -> str:
    """What the denoiser predicts: ``flow`` (velocity ``noise - x0``), ``epsilon`` or ``v_prediction``."""
    if is_flow_matching(scheduler):
        return "flow"
    return str(getattr(scheduler.config, "prediction_type", "epsilon"))


def noise_coefficients(scheduler: Any, timestep: Any) -> tuple[float, float] | None:
    """``(a, b)`` of the step the scheduler has just taken (call after ``scheduler.step``); None
    for a scheduler whose noise level it cannot read."""
    sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if sigmas is not None and index is not None:
        sigma = float(sigmas[index - 1])
        if is_flow_matching(scheduler):
            return 1.0 - sigma, sigma
        a = 1.0 / math.sqrt(1.0 + sigma * sigma)
        return a, sigma * a
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is not None:
        t = int(torch.as_tensor(timestep).flatten()[0])
        ab = float(alphas[t])
        return math.sqrt(ab), math.sqrt(1.0 - ab)
    return None


class StepRecorder:
    """Context manager around ``pipe.scheduler.step``: records each step's noise coefficients and
    the last step's output (the final latent, in the denoiser's latent layout)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.coefficients: list[tuple[float, float] | None] = []
        self.final: torch.Tensor | None = None

    def __enter__(self) -> "StepRecorder":
        original = self.scheduler.step

        def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = original(model_output, timestep, sample, *args, **kwargs)
            self.coefficients.append(noise_coefficients(self.scheduler, timestep))
            prev = out[0] if isinstance(out, tuple) else out.prev_sample
            self.final = prev.detach().to("cpu", torch.float32)
            return out

        self.scheduler.step = step
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.scheduler.step  # the class's method again
