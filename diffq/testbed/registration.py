"""The testbed's world, ``shapes``, registered with :data:`diffq.worlds.WORLDS`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffq.testbed import assets
from diffq.testbed.detector import ShapesDetector
from diffq.testbed.prompts import evaluation_metadata, training_example
from diffq.testbed.world import render
from diffq.worlds import Examples, World, register_world


@register_world
class ShapesWorld(World):
    """Coloured shapes on a plain background: the prompts, scenes and models of the testbed."""

    name = "shapes"

    def evaluation_metadata(self) -> list[dict[str, Any]]:
        """The world's GenEval set (201 prompts, six tasks)."""
        return list(evaluation_metadata())

    def training_examples(self, n: int, seed: int = 0) -> Examples:
        """``n`` training captions and their renders (uint8 ``[n, 32, 32, 3]``), drawn with ``seed``."""
        rng = np.random.default_rng(seed)
        examples = [training_example(rng) for _ in range(n)]
        return Examples([e.caption for e in examples], np.stack([render(e.scene) for e in examples]))

    def detector(self) -> ShapesDetector:
        """The exact detector of rendered shapes."""
        return ShapesDetector()

    def asset_path(self, name: str) -> str:
        """Absolute path of a testbed asset folder (e.g. ``unet_pipeline``, ``clip``)."""
        return assets.asset_path(name)

    def owns_asset(self, path: str | Path) -> bool:
        """Whether ``path`` points inside the testbed asset folder."""
        return assets.is_testbed_asset(path)

    def check_asset_folder(self, path: str | Path) -> None:
        """CheckpointError naming the first missing file and the training command that makes it."""
        assets.check_asset_folder(path)
