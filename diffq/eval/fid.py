"""FID and KID between two image sets, on the standard Inception features (see ``inception.py``).

Two backends compute the distances from the same features, so their numbers differ only by
the maths each library does:

- ``torchmetrics``: ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` with
  :class:`~diffq.eval.inception.InceptionFeatures` as their feature network;
- ``clean-fid``: ``cleanfid.fid.frechet_distance`` / ``kernel_distance``.

Reference features of real images (a folder, or a registered world's training renders) are computed
once and cached content-addressed under ``<cache_dir>/fid_reference/``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffq.cache import cache_key, cache_path, load_tensors, save_tensors
from diffq.errors import CheckpointError, ConfigError
from diffq.eval.inception import InceptionFeatures
from diffq.worlds import get_world, is_world

log = logging.getLogger(__name__)

BACKENDS = ("torchmetrics", "clean-fid")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class FidResult:
    """FID and KID of ``fake`` against ``real`` features, with the settings that produced them."""

    fid: float
    kid_mean: float
    kid_std: float
    n_real: int
    n_fake: int
    backend: str
    resize: str
    weights: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] ``[N, 3, H, W]`` -> uint8 (round to nearest, as PNG files store them)."""
    if images.dtype == torch.uint8:
        return images
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] ``[N, 3, H, W]`` -> uint8 ``[N, H, W, 3]`` arrays (the GenEval detectors' input)."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: InceptionFeatures, batch_size: int = 50,
                     desc: str = "inception features") -> torch.Tensor:
    """Pool3 features ``[N, 2048]`` (float64) of images ``[N, 3, H, W]`` (uint8, or float in [0, 1])."""
    x = to_uint8(images)
    device = next(extractor.parameters(), torch.empty(0)).device
    chunks = [extractor(x[i : i + batch_size].to(device)).double().cpu()
              for i in tqdm(range(0, len(x), batch_size), desc=desc, unit="batch", disable=len(x) <= batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, 2048, dtype=torch.float64)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, extractor: InceptionFeatures, backend: str = "torchmetrics",
            kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0) -> FidResult:
    """FID and KID of ``fake`` against ``real``; each is images or features ``[N, 2048]``."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown FID backend {backend!r}: use one of {', '.join(BACKENDS)}")
    real_f, fake_f = _features(real, extractor, "real"), _features(fake, extractor, "generated")
    if min(len(real_f), len(fake_f)) < 2:
        raise ConfigError(f"FID needs at least 2 images per set, got {len(real_f)} real and {len(fake_f)} generated; "
                          "raise eval.images_per_prompt or the number of prompts")
    subset = min(kid_subset_size, len(real_f), len(fake_f))
    if backend == "torchmetrics":
        fid, kid_mean, kid_std = _torchmetrics(real_f, fake_f, extractor, subset, kid_subsets, seed)
    else:
        fid, kid_mean, kid_std = _cleanfid(real_f, fake_f, subset, kid_subsets, seed)
    return FidResult(fid, kid_mean, kid_std, len(real_f), len(fake_f), backend, extractor.resize, extractor.source)


def _features(x: torch.Tensor, extractor: InceptionFeatures, name: str) -> torch.Tensor:
    if x.ndim == 2:
        return x.double()
    return extract_features(x, extractor, desc=f"inception features ({name})")


def _torchmetrics(real: torch.Tensor, fake: torch.Tensor, extractor: InceptionFeatures, subset: int,
                  subsets: int, seed: int) -> tuple[float, float, float]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=extractor, normalize=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    kid = KernelInceptionDistance(feature=extractor, subsets=subsets, subset_size=subset, normalize=False)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return float(fid.compute()), float(kid_mean), float(kid_std)


def _cleanfid(real: torch.Tensor, fake: torch.Tensor, subset: int, subsets: int,
              seed: int) -> tuple[float, float, float]:
    from cleanfid.fid import frechet_distance, kernel_distance

    r, f = real.numpy(), fake.numpy()
    fid = frechet_distance(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        # clean-fid's KID averages subsets; its std is not returned, so the spread is measured the same way
        kids = [kernel_distance(r, f, num_subsets=1, max_subset_size=subset) for _ in range(subsets)]
    finally:
        np.random.set_state(state)
    return float(fid), float(np.mean(kids)), float(np.std(kids))


def image_files(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted; none when it is not a folder."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if root.is_dir() else []


def load_image_folder(folder: str | Path, limit: int | None = None) -> torch.Tensor:
    """uint8 images ``[N, 3, H, W]`` of a folder (sorted, recursive), all of the first one's size."""
    from PIL import Image, UnidentifiedImageError

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"reference image folder {root} does not exist: "
                              "point eval.fid.reference at a folder of images")
    files = image_files(root)[:limit]
    if len(files) < 2:
        raise CheckpointError(f"reference image folder {root} has {len(files)} images (png/jpg/webp/bmp); "
                              "FID needs many")
    arrays = []
    for p in tqdm(files, desc="reference images", disable=len(files) < 500):
        try:
            arrays.append(np.asarray(Image.open(p).convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise CheckpointError(f"reference image {p} is unreadable ({err}); remove or replace it") from err
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise CheckpointError(f"reference images in {root} have different sizes {sorted(shapes)[:3]}; "
                              "resize them to one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def reference_images(reference: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` real images, uint8 ``[N, 3, H, W]``: a registered world's training examples drawn with
    ``seed`` when ``reference`` names a world, else the images of the folder ``reference``."""
    if is_world(reference):
        images = get_world(reference).training_examples(n, seed).images
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return load_image_folder(reference, n)


def reference_features(reference: str, n: int, extractor: InceptionFeatures, cache_dir: str | Path | None,
                       seed: int = 0) -> tuple[torch.Tensor, bool]:
    """Features of ``n`` real images: ``reference`` is a registered world's name (its renders) or a folder.

    Cached by content: the folder's file names, sizes and modification times (or the world seed),
    ``n``, the resize mode and the weights. Returns (features, cache hit).
    """
    if is_world(reference):
        source: dict[str, Any] = {"world": reference, "seed": seed}
    else:
        root = Path(reference).expanduser()
        files = image_files(root)
        source = {"folder": str(root.resolve()), "files": [(str(p.relative_to(root)), p.stat().st_size,
                                                          p.stat().st_mtime_ns) for p in files[:n]]}
    key = cache_key({**source, "n": n, "resize": extractor.resize, "weights": extractor.source})
    path = cache_path(cache_dir, "fid_reference", key) if cache_dir else None
    if path is not None and (hit := load_tensors(path)) is not None:
        log.info("FID reference features loaded from cache %s", path)
        return hit[0]["features"], True
    images = reference_images(reference, n, seed)
    features = extract_features(images, extractor, desc="inception features (reference)")
    if path is not None:
        save_tensors(path, {"features": features}, {"reference": source, "n": len(features)})
    return features, False
