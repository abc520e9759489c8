"""The shapes world: procedural RGB images of coloured circles, squares and triangles.

Scenes hold 1-4 non-overlapping objects on a plain background; captions use GenEval's
phrasing ("a photo of two blue squares", "a photo of a green triangle left of a yellow
circle"). Everything is deterministic from a numpy Generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (24, 24, 24)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 40),
    "yellow": (235, 215, 50),
    "green": (50, 180, 70),
    "blue": (50, 90, 230),
    "purple": (160, 70, 200),
    "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
SIZE_RANGE = (3.5, 5.5)  # half-extent of an object in pixels
MIN_GAP = 1.5  # pixels between object boxes


@dataclass(frozen=True)
class Obj:
    """One object: shape, colour name, centre (x right, y down, pixels) and half-extent."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) bounding box in pixels."""
        return (self.cx - self.size, self.cy - self.size, self.cx + self.size, self.cy + self.size)


@dataclass(frozen=True)
class Scene:
    """Objects of one image."""

    objects: tuple[Obj, ...]


def _masks(objects: Sequence[Obj], size: int, ss: int) -> np.ndarray:
    """Boolean coverage masks [n, size*ss, size*ss] (vectorised over objects and pixels)."""
    coords = (np.arange(size * ss) + 0.5) / ss
    y, x = coords[None, :, None], coords[None, None, :]
    cx = np.array([o.cx for o in objects])[:, None, None]
    cy = np.array([o.cy for o in objects])[:, None, None]
    r = np.array([o.size for o in objects])[:, None, None]
    dx, dy = x - cx, y - cy
    circle = dx**2 + dy**2 <= r**2
    square = (np.abs(dx) <= r * 0.9) & (np.abs(dy) <= r * 0.9)
    # upward isosceles triangle inscribed in the box: apex at the top, base at the bottom
    triangle = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    kinds = np.array([SHAPES.index(o.shape) for o in objects])[:, None, None]
    return np.where(kinds == 0, circle, np.where(kinds == 1, square, triangle))


def render(scene: Scene, size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """The scene as uint8 [size, size, 3], anti-aliased by supersampling."""
    canvas = np.empty((size * supersample, size * supersample, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    if scene.objects:
        masks = _masks(scene.objects, size, supersample)
        colors = np.array([COLORS[o.color] for o in scene.objects], dtype=np.float32)
        # objects do not overlap, so painting order does not matter: pick the covering object
        covered = masks.any(0)
        index = masks.argmax(0)
        canvas[covered] = colors[index[covered]]
    img = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


def _overlaps(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return not (ax1 + MIN_GAP <= bx0 or bx1 + MIN_GAP <= ax0 or ay1 + MIN_GAP <= by0 or by1 + MIN_GAP <= ay0)


def relation_holds(a: Obj, b: Obj, relation: str, margin: float = 0.1) -> bool:
    """Whether ``a`` is ``relation`` ``b`` by GenEval's rule (box-centre offset beyond a margin)."""
    offset = np.array([a.cx - b.cx, a.cy - b.cy])
    dims = 2 * (a.size + b.size)
    revised = np.maximum(np.abs(offset) - margin * dims, 0) * np.sign(offset)
    norm = np.linalg.norm(offset)
    if norm == 0 or np.all(np.abs(revised) < 1e-3):
        return False
    dx, dy = revised / norm
    return {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


def place_objects(
    rng: np.random.Generator,
    kinds: Sequence[tuple[str, str]],
    relation: str | None = None,
    size: int = IMAGE_SIZE,
    tries: int = 200,
) -> Scene:
    """Place objects ``(shape, colour)`` without overlap; with ``relation``, object 1 is
    ``relation`` object 0 (GenEval order: the second include clause refers to the first)."""
    lo, hi = SIZE_RANGE
    hi = min(hi, lo + (hi - lo) * 2 / max(len(kinds), 2))  # crowded scenes get smaller objects
    for _ in range(tries):
        objs: list[Obj] = []
        for shape, color in kinds:
            for _ in range(20):  # re-draw this object's place before restarting the scene
                r = rng.uniform(lo, hi)
                obj = Obj(shape, color, rng.uniform(r + 0.5, size - r - 0.5), rng.uniform(r + 0.5, size - r - 0.5), r)
                if not any(_overlaps(obj, o) for o in objs):
                    objs.append(obj)
                    break
            else:
                break
        else:
            if relation is None or relation_holds(objs[1], objs[0], relation, margin=0.2):
                return Scene(tuple(objs))
    raise RuntimeError(f"could not place {len(kinds)} objects in {tries} tries")  # pragma: no cover


def _a(color: str | None, shape: str) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def describe(shape: str, color: str | None, count: int = 1) -> str:
    """Noun phrase: 'a red circle', 'a circle', 'three blue squares'."""
    if count == 1:
        return _a(color, shape)
    return f"{NUMBERS[count]} {color + ' ' if color else ''}{PLURALS[shape]}"
