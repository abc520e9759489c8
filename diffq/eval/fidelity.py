"""Fidelity of quantized samples to the FP model's samples from the same seeds."""
from __future__ import annotations

from typing import Callable

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from diffq.errors import ConfigError

MAX_PSNR_DB = 100.0  # identical images (MSE 0) report this instead of infinity


def psnr(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image over [0, 1] images ``[N, C, H, W]``; capped at MAX_PSNR_DB."""
    mse = (ref.double() - test.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-MAX_PSNR_DB / 10)))).float()


def ssim(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """SSIM per image (Gaussian window 11, σ 1.5; smaller window for images under 11 px)."""
    kernel = min(11, (min(ref.shape[-2:]) // 2) * 2 - 1)
    return structural_similarity_index_measure(
        test.float(), ref.float(), data_range=1.0, kernel_size=kernel, reduction="none"
    )


FIDELITY_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"psnr": psnr, "ssim": ssim}


def fidelity_metrics(ref: torch.Tensor, test: torch.Tensor, names: list[str]) -> dict[str, dict]:
    """Per-image values and their mean for each requested metric."""
    if ref.shape != test.shape:
        raise ValueError(f"image batches differ in shape: {tuple(ref.shape)} vs {tuple(test.shape)}")
    out = {}
    for name in names:
        if name not in FIDELITY_METRICS:
            raise ConfigError(f"unknown eval metric {name!r}; available: {sorted(FIDELITY_METRICS)}")
        values = FIDELITY_METRICS[name](ref, test)
        out[name] = {"mean": float(values.mean()), "per_image": [round(float(v), 4) for v in values]}
    return out
