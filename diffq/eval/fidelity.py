"""Fidelity of quantized samples to the FP model's samples from the same seeds."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from diffq.errors import ConfigError

MAX_PSNR_DB = 100.0  # identical images (MSE 0) report this instead of infinity


def sqnr(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """Signal-to-quantization-noise ratio in dB over a set of outputs (e.g. a denoiser's, FP vs quantized)."""
    signal = sum(float(r.double().square().sum()) for r in ref)
    noise = sum(float((o.double() - r.double()).square().sum()) for r, o in zip(ref, out))
    return 10 * math.log10(signal / max(noise, 1e-30))


def psnr(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image over [0, 1] images ``[N, C, H, W]``; capped at MAX_PSNR_DB."""
    mse = (ref.double() - test.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(10 ** (-MAX_PSNR_DB / 10)))).float()


def ssim(ref: torch.Tensor, test: torch.Tensor, window: str = "local") -> torch.Tensor:
    """SSIM per image. ``local``: Gaussian window 11, σ 1.5 (smaller for images under 11 px);
    ``global``: :func:`global_ssim`, MixDQ's content metric."""
    if window not in SSIM_WINDOWS:
        raise ConfigError(f"unknown SSIM window {window!r}: use one of {list(SSIM_WINDOWS)}")
    if window == "global":
        return global_ssim(ref, test)
    kernel = min(11, (min(ref.shape[-2:]) // 2) * 2 - 1)
    return structural_similarity_index_measure(
        test.float(), ref.float(), data_range=1.0, kernel_size=kernel, reduction="none"
    )


def global_ssim(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """SSIM per image with a uniform window of the largest odd size that fits, averaged over the
    positions where the window lies inside the image (no padding) and over channels, with sample
    covariances: skimage's ``structural_similarity(win_size=511)`` on 512-px images as MixDQ's code
    measures content, i.e. (nearly) whole-image statistics. Float64, data range 1."""
    side = min(ref.shape[-2:])
    k = side - (1 - side % 2)
    x, y = ref.double(), test.double()
    moments = [F.avg_pool2d(t, k, stride=1) for t in (x, y, x * x, y * y, x * y)]
    mx, my, xx, yy, xy = moments
    norm = k * k / (k * k - 1)  # sample covariance
    vx, vy, cxy = norm * (xx - mx * mx), norm * (yy - my * my), norm * (xy - mx * my)
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


SSIM_WINDOWS = ("local", "global")

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
