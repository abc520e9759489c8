"""LPIPS between paired images, skipped with a clear reason when its backbone is absent.

The network is the one torchmetrics' LPIPS metric wraps. torchmetrics ships LPIPS' linear heads
but takes the backbone (AlexNet / VGG16 / SqueezeNet ImageNet weights) from torchvision, which
downloads it. Offline (``HF_HUB_OFFLINE=1`` or no network) and not yet in the torch hub cache,
LPIPS is skipped and the reason recorded, never a crash. ``random_backbone=True`` builds the same
network with an untrained backbone (no download): meaningless values, but the wiring and the
maths can be tested offline.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffq.errors import ConfigError

log = logging.getLogger(__name__)

BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


class PairedLPIPS(nn.Module):
    """LPIPS of paired float images ``[N, 3, H, W]`` in [0, 1]: one distance per pair."""

    def __init__(self, net: str = "alex", random_backbone: bool = False) -> None:
        from torchmetrics.functional.image.lpips import _NoTrainLpips

        check_net(net)
        super().__init__()
        self.net = _NoTrainLpips(net=net, pnet_rand=random_backbone).eval()

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a, b, normalize=True).reshape(-1)


def check_net(net: str) -> None:
    """ConfigError unless ``net`` names an LPIPS backbone (``eval.lpips_net``)."""
    if net not in BACKBONES:
        raise ConfigError(f"unknown LPIPS network {net!r} (eval.lpips_net): use one of {', '.join(BACKBONES)}")


def backbone_file(net: str) -> Path:
    """Where torchvision keeps the backbone's weights in the torch hub cache."""
    import torchvision

    check_net(net)
    url = getattr(torchvision.models, BACKBONES[net]).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def offline() -> bool:
    """Whether downloads are off (the Hugging Face offline switches)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "DIFFQ_OFFLINE"))


def load_lpips(net: str = "alex") -> tuple[PairedLPIPS | None, str | None]:
    """(LPIPS network with its ImageNet backbone, None), or (None, why it is skipped)."""
    path = backbone_file(net)
    if not path.exists() and offline():
        reason = (f"LPIPS skipped: its {net} backbone weights ({path.name}) are not in the torch hub cache "
                  f"({path.parent}) and downloads are off; run once online, or copy the file there")
        log.warning(reason)
        return None, reason
    try:
        metric = PairedLPIPS(net)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        reason = (f"LPIPS skipped: could not get its {net} backbone weights ({err}); "
                  f"run once online or copy {path.name} to {path.parent}")
        log.warning(reason)
        return None, reason
    return metric, None


@torch.no_grad()
def lpips_pairs(a: torch.Tensor, b: torch.Tensor, metric: Any, batch_size: int = 64) -> dict[str, Any]:
    """Mean and per-image LPIPS of paired float images ``[N, 3, H, W]`` in [0, 1]."""
    per_image = torch.cat([metric(a[i : i + batch_size].clamp(0, 1), b[i : i + batch_size].clamp(0, 1)).reshape(-1)
                           for i in range(0, len(a), batch_size)])
    return {"mean": float(per_image.mean()), "per_image": [round(float(v), 5) for v in per_image]}
