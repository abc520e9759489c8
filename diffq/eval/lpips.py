"""LPIPS between paired images (torchmetrics), skipped with a clear reason when its backbone is absent.

torchmetrics ships LPIPS' linear heads but takes the backbone (AlexNet / VGG16 / SqueezeNet
ImageNet weights) from torchvision, which downloads it. Offline (``HF_HUB_OFFLINE=1`` or no
network) and not yet in the torch hub cache, LPIPS is skipped and the reason recorded, never
a crash.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from diffq.errors import ConfigError

log = logging.getLogger(__name__)

BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def backbone_file(net: str) -> Path:
    """Where torchvision keeps the backbone's weights in the torch hub cache."""
    import torchvision

    if net not in BACKBONES:
        raise ConfigError(f"unknown LPIPS network {net!r}: use one of {', '.join(BACKBONES)}")
    url = getattr(torchvision.models, BACKBONES[net]).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def offline() -> bool:
    """Whether downloads are off (the Hugging Face offline switches)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "DIFFQ_OFFLINE"))


def load_lpips(net: str = "alex") -> tuple[Any | None, str | None]:
    """(torchmetrics LPIPS metric, None), or (None, why it is skipped)."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    path = backbone_file(net)
    if not path.exists() and offline():
        reason = (f"LPIPS skipped: its {net} backbone weights ({path.name}) are not in the torch hub cache "
                  f"({path.parent}) and downloads are off; run once online, or copy the file there")
        log.warning(reason)
        return None, reason
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        reason = f"LPIPS skipped: could not get its {net} backbone weights ({err}); run once online or copy {path.name} to {path.parent}"
        log.warning(reason)
        return None, reason
    return metric.eval(), None


@torch.no_grad()
def lpips_pairs(a: torch.Tensor, b: torch.Tensor, metric: Any, batch_size: int = 64) -> dict[str, Any]:
    """Mean and per-image LPIPS of paired float images ``[N, 3, H, W]`` in [0, 1]."""
    per_image = torch.cat([metric(a[i : i + batch_size].clamp(0, 1), b[i : i + batch_size].clamp(0, 1)).reshape(-1)
                           for i in range(0, len(a), batch_size)])
    metric.reset()
    return {"mean": float(per_image.mean()), "per_image": [round(float(v), 5) for v in per_image]}
