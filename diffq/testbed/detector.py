"""Deterministic classical detector for the shapes world (the testbed's GenEval backend).

Like GenEval's pipeline (instance masks first, then a colour classification of each masked
object), it finds objects by foreground and names each one's colour as a whole, so an object
whose shading drifts (generated images do) stays one object of one colour.

Every pixel's foreground strength is its coverage along the closest background-to-colour
segment in RGB: an anti-aliased edge pixel is a blend of the background and its object's colour,
so it lies on that segment (half-yellow is nearer green than yellow, but on yellow's segment).
Pixels covered at least CORE_COVERAGE form 8-connected components (the objects; specks below
MIN_PIXELS are dropped). An object's colour is the palette colour whose segment passes closest
to the mean of its core pixels. Its coverage along that colour, with rim pixels (coverage >=
RIM_COVERAGE, within RIM px), is upsampled bilinearly UPSAMPLE times and cut at half its peak
(0.5 on renders), the shape's edge: its extent is the box, and it gives the fill ratio of the
box and the drop of the mass centre below the box centre. Triangles drop (about 0.14 of the
height; circles and squares 0); squares fill their box (about 0.98; circles 0.78). A
triangle's apex is a sliver the 0.5 cut loses, so its box is fitted instead: base line,
centroid, and side sqrt(2 * area). On renders boxes are within 0.4 px of the drawn shapes, and
the thresholds hold under Gaussian noise (sigma 8 of 255) and blur (sigma 0.8 px).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from diffq.errors import ConfigError
from diffq.eval.geneval import Detection
from diffq.testbed.world import BACKGROUND, COLORS

CORE_COVERAGE = 0.35  # above 0.25, so objects 1.5 px apart never share an 8-connected component
RIM_COVERAGE = 0.2  # faint rims below this drown in pixel noise of generated images
RIM = 2.0
MIN_PIXELS = 4
UPSAMPLE = 4
TRIANGLE_DROP = 0.06  # measured: triangles >= 0.085, circles and squares <= 0.025
SQUARE_FILL = 0.87  # measured: squares >= 0.87, circles <= 0.82

_NAMES = tuple(COLORS)
_BG = np.array(BACKGROUND, dtype=np.float32)
_DIRS = np.array([COLORS[c] for c in _NAMES], dtype=np.float32) - _BG
_EIGHT = np.ones((3, 3), dtype=bool)


def pixel_colors(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index into COLORS of the closest background-to-colour segment, and the
    coverage (position along it: 0 background, 1 full colour)."""
    x = image.astype(np.float32) - _BG
    coverage = np.clip(x @ _DIRS.T / (_DIRS**2).sum(1), 0, 1)  # [H, W, K]
    residual = np.linalg.norm(x[..., None, :] - coverage[..., None] * _DIRS, axis=-1)
    best = residual.argmin(-1)
    return best, np.take_along_axis(coverage, best[..., None], -1)[..., 0]


def classify_shape(fill: float, drop: float) -> str:
    """Shape from the box fill ratio and the mass-centre drop (fraction of the box height)."""
    if drop > TRIANGLE_DROP:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def _measure(weights: np.ndarray, top: int, left: int) -> tuple[str, tuple[float, float, float, float]]:
    """Shape and box of one object's coverage crop whose pixel (0, 0) is image pixel (top, left)."""
    fine = ndimage.zoom(np.pad(weights, 1), UPSAMPLE, order=1, grid_mode=True, mode="grid-constant")
    ys, xs = np.nonzero(fine >= weights.max() / 2)  # non-empty: a sample 1/8 px off the peak keeps 7/8 of it
    top, left = top - 1, left - 1  # the padding
    x0, x1 = left + xs.min() / UPSAMPLE, left + (xs.max() + 1) / UPSAMPLE
    y0, y1 = top + ys.min() / UPSAMPLE, top + (ys.max() + 1) / UPSAMPLE
    area = len(ys) / UPSAMPLE**2
    cx, cy = left + (xs.mean() + 0.5) / UPSAMPLE, top + (ys.mean() + 0.5) / UPSAMPLE
    shape = classify_shape(area / ((x1 - x0) * (y1 - y0)), (cy - (y0 + y1) / 2) / (y1 - y0))
    if shape == "triangle":
        side = float(np.sqrt(2 * area))
        x0, y0, x1 = cx - side / 2, y1 - side, cx + side / 2
    return shape, (float(x0), float(y0), float(x1), float(y1))


def segment_colors(mean_rgb: np.ndarray) -> np.ndarray:
    """Index into COLORS of the background-to-colour segment closest to each RGB row ``[n, 3]``."""
    x = mean_rgb.astype(np.float32) - _BG
    coverage = np.clip(x @ _DIRS.T / (_DIRS**2).sum(1), 0, 1)
    return np.linalg.norm(x[:, None, :] - coverage[..., None] * _DIRS, axis=-1).argmin(-1)


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in one uint8 image ``[H, W, 3]``, largest first."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ConfigError(f"detect expects a uint8 RGB image [H, W, 3], got {image.dtype} {tuple(image.shape)}; "
                          "convert with (x * 255).round().astype(np.uint8) and put channels last")
    _, strength = pixel_colors(image)
    core = strength >= CORE_COVERAGE
    labels, n = ndimage.label(core, _EIGHT)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    labels[np.isin(labels, index[ndimage.sum_labels(core, labels, index) < MIN_PIXELS])] = 0
    kept = np.unique(labels[labels > 0])
    if len(kept) == 0:
        return []
    means = np.stack([ndimage.mean(image[..., c].astype(np.float32), labels, kept) for c in range(3)], -1)
    colors = segment_colors(means)
    x = image.astype(np.float32) - _BG
    along = np.clip(x @ _DIRS.T / (_DIRS**2).sum(1), 0, 1)  # [H, W, K] coverage along every colour
    dist, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    owner = np.where((strength >= RIM_COVERAGE) & (dist <= RIM), labels[iy, ix], 0)
    dets = []
    for label, k in zip(kept, colors):
        sl = ndimage.find_objects((owner == label).astype(np.int32))[0]
        weights = np.where(owner[sl] == label, along[sl][..., k], 0)
        shape, box = _measure(weights, sl[0].start, sl[1].start)
        dets.append(Detection(shape, box, labels == label, _NAMES[k], 1.0))
    return sorted(dets, key=lambda d: -int(d.mask.sum()))


def detect_batch(images: np.ndarray) -> list[list[Detection]]:
    """Objects per image of a uint8 batch ``[N, H, W, 3]``."""
    if images.ndim != 4:
        raise ConfigError(f"detect_batch expects a batch [N, H, W, 3], got shape {tuple(images.shape)}; "
                          "stack images with np.stack, or call detect on a single image")
    return [detect(image) for image in images]


class ShapesDetector:
    """The shapes world's backend of the GenEval ``Detector`` protocol."""

    def __call__(self, images: np.ndarray) -> list[list[Detection]]:
        return detect_batch(images)
