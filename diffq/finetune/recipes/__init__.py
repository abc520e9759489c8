"""Finetuning recipes: what trains in which order. A recipe turns the finetuning settings into a list
of :class:`Stage` objects (each a selection of what trains plus the settings it trains with), run
one after the other by :func:`diffq.finetune.stage.finetune_denoiser` on one engine.

``finetune.recipe`` names it: ``plain`` (one stage, ``finetune.train`` as written) or ``quest``
(QuEST's temporal, then activation-sensitive stages); a new one is a module of this package with
``@RECIPES.register("name")``. Recipes run twice: before calibration with ``ctx.measure`` unset, so
a selection that trains nothing stops early, and after PTQ with it set, when a selection may
measure the quantized model.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from diffq.registry import Registry
from diffq.spec import LayerSpec


@dataclass
class Stage:
    """One finetuning stage: its name, what trains (``{layer or attention module: kinds}``), the
    finetuning settings it runs with (``steps``, ``optim``, ``extra_losses``... of ``finetune``) and
    which quantizers are on while it trains: the weights of ``quantized`` layers (None: all) and the
    activations when ``acts`` (a progressive schedule turns them on stage by stage)."""

    name: str
    plan: dict[str, tuple[str, ...]]
    settings: dict[str, Any]
    quantized: list[str] | None = None
    acts: bool = True


@dataclass
class RecipeContext:
    """What a recipe may look at: the denoiser's layers ``{name: (role, module)}`` and specs, the
    finetuning settings, the attention modules whose step sizes may train, after PTQ a
    ``measure(names, bits, calls)`` callback of the quantized model (None before calibration), and
    the denoiser itself."""

    layers: Mapping[str, tuple[str, nn.Module]]
    specs: Sequence[LayerSpec]
    ft: Mapping[str, Any]
    attn_names: Sequence[str] = ()
    attn_static: bool = False
    measure: Callable[..., Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what the recipe reports (metrics.json["finetune"])
    model: nn.Module | None = None


class Recipe(ABC):
    """Base class: :meth:`stages` builds the stages from a context."""

    def check(self, ft: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """ConfigError for settings of this recipe that cannot work, before any model loads."""

    @abstractmethod
    def stages(self, ctx: RecipeContext) -> list[Stage]:
        """The stages to run, in order (ConfigError when one would train nothing)."""


RECIPES: Registry[type[Recipe]] = Registry("finetune.recipe", package=__name__)
# a recipe's settings dataclass, registered beside it as ``finetune.<section>`` (read with diffq.settings.typed)
SETTINGS: Registry[type] = Registry("finetune settings section", package=__name__)

__all__ = ["RECIPES", "Recipe", "RecipeContext", "SETTINGS", "Stage"]
