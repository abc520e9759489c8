"""Ground-truth scenes for GenEval entries of the shapes world ("perfect generator" images)."""
from __future__ import annotations

import numpy as np

from diffq.errors import ConfigError
from diffq.testbed.world import COLORS, SHAPES, Scene, place_objects, render

MAX_OBJECTS = 4


def scene_for(entry: dict, rng: np.random.Generator) -> Scene:
    """A scene satisfying ``entry``: each include clause's count of its shape, in its colour or a
    random one; a position clause (second of two single objects, relative to the first) is
    placed with place_objects' margin."""
    include = entry["include"]
    kinds: list[tuple[str, str]] = []
    for clause in include:
        shape, color = clause["class"], clause.get("color")
        if shape not in SHAPES or (color is not None and color not in COLORS):
            raise ConfigError(f"entry {entry['prompt']!r} asks for {color or ''} {shape}, which the shapes world does "
                              f"not draw; use shapes {list(SHAPES)} and colours {list(COLORS)}")
        names = list(COLORS)
        kinds += [(shape, color or names[rng.integers(len(names))]) for _ in range(clause["count"])]
    if len(kinds) > MAX_OBJECTS:
        raise ConfigError(f"entry {entry['prompt']!r} needs {len(kinds)} objects; the shapes world holds at most "
                          f"{MAX_OBJECTS}")
    positions = [clause["position"] for clause in include if "position" in clause]
    if not positions:
        return place_objects(rng, kinds)
    if len(include) != 2 or len(kinds) != 2 or positions[0][1] != 0:
        raise ConfigError(f"entry {entry['prompt']!r}: positions are drawn only for two single objects with the second "
                          "relative to the first (position [relation, 0])")
    return place_objects(rng, kinds, relation=positions[0][0])


def render_entry(entry: dict, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] ground-truth image for ``entry`` (a ``render_fn`` for chance_levels)."""
    return render(scene_for(entry, rng))
