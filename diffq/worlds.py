"""Procedural worlds a model was trained on (``model.world``): each one's GenEval prompts and
detector, its training examples (the real images of FID references and of finetuning data) and
the trained model folders it ships.

A world is a :class:`World` subclass in its own package, registered with ``@register_world``;
``WORLDS`` imports the modules of ``WORLD_PACKAGES`` on first lookup, so the layers below name a
world only by the string users pass (``model.world``, ``eval.geneval.metadata``, ``eval.fid.reference``).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple, TypeVar

from diffq.registry import Registry

if TYPE_CHECKING:
    import numpy as np

# the packages whose modules register the worlds (imported on first lookup)
WORLD_PACKAGES = ("diffq.testbed",)


class Examples(NamedTuple):
    """Training examples of a world: captions and their images (uint8 ``[N, H, W, 3]``)."""

    captions: list[str]
    images: np.ndarray


class World(ABC):
    """A procedural world: prompts, scenes, a detector that scores them, and its model folders."""

    name: ClassVar[str]

    @abstractmethod
    def evaluation_metadata(self) -> list[dict[str, Any]]:
        """The world's GenEval entries (``tag``, ``prompt``, ``include``, ``exclude``)."""

    @abstractmethod
    def training_examples(self, n: int, seed: int = 0) -> Examples:
        """``n`` examples of the training distribution, the same for the same ``seed``."""

    @abstractmethod
    def detector(self) -> Callable[[np.ndarray], list[list[Any]]]:
        """Its GenEval detector: uint8 images ``[N, H, W, 3]`` to detections per image."""

    @abstractmethod
    def asset_path(self, name: str) -> str:
        """Absolute path of the asset folder ``name`` (a trained model shipped with the world)."""

    @abstractmethod
    def owns_asset(self, path: str | Path) -> bool:
        """Whether ``path`` points inside the world's asset folders."""

    @abstractmethod
    def check_asset_folder(self, path: str | Path) -> None:
        """Raise CheckpointError naming what is missing from the asset folder ``path``."""


W = TypeVar("W", bound=type[World])

WORLDS: Registry[type[World]] = Registry("model.world", package=WORLD_PACKAGES)


def register_world(cls: W) -> W:
    """Class decorator: register a World subclass under its ``name``."""
    return WORLDS.register(cls.name)(cls)


def get_world(name: str) -> World:
    """The registered world ``name``; ConfigError listing the registered ones otherwise."""
    return WORLDS.get(name)()


def world_names() -> list[str]:
    """Names of the registered worlds."""
    return WORLDS.names()


def is_world(name: object) -> bool:
    """Whether ``name`` is a registered world's name (else e.g. a path or None)."""
    return isinstance(name, str) and name in WORLDS


def world_of(path: str | Path) -> World | None:
    """The world whose assets hold ``path``, if any."""
    for name in WORLDS.names():
        world = get_world(name)
        if world.owns_asset(path):
            return world
    return None


def world_asset(world: str, name: str) -> str:
    """Absolute path of a world's asset folder (the OmegaConf resolver ``${world_asset:world,name}``)."""
    return get_world(world).asset_path(name)

