"""Deployment: run what diffq quantized on real low-bit kernels (:func:`deploy`), and save and load the
result as a folder plain diffusers with torchao loads (:func:`save_deployed`, :func:`load_deployed`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffq.deployment.lowering import (
    BACKENDS,
    LOWERINGS,
    DeployReport,
    Lowering,
    Placement,
    deploy_denoiser,
    deployment_of,
    mark_deployed,
)
from diffq.deployment.saving import load_deployed, save_deployed

__all__ = ["BACKENDS", "LOWERINGS", "DeployReport", "Lowering", "Placement", "deploy", "deployment_of", "load_deployed",
           "save_deployed"]


def deploy(target: Any, backend: str = "torchao", device: torch.device | str | None = None) -> DeployReport:
    """Lower the quantized denoiser of ``target`` (a pipeline, or the denoiser itself) onto ``backend``'s
    kernels in place; returns the coverage report (``report.table()``: kernel or simulated, per layer)."""
    from diffq.models.loading import denoiser_of

    model = target if isinstance(target, nn.Module) else denoiser_of(target)[1]
    report = deploy_denoiser(model, backend, None if device is None else torch.device(device))
    mark_deployed(model, report)
    return report
