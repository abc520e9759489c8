"""Quantization methods and reconstruction modes, each registered by its own module.

A method is ``apply(model, specs, calib, cfg, *, device, dtype, context) -> stats`` registered with
``@METHODS.register("name")`` (selected by ``quant.method``; ``context`` holds the pipeline and
where the job writes, for methods that generate images); an optional ``apply.check_specs(specs,
cfg)`` runs on the resolved specs before calibration, an optional ``apply.model_rules(model, cfg)``
adds rules computed from the model before the preset's, an optional ``apply.needs_pipeline(cfg)``
says why a config cannot run on a bare denoiser (None when it can); a reconstruction mode is a
:class:`~diffq.methods.reconstruct.ReconMode` registered with ``RECON_MODES`` (``quant.recon``).
A method with settings keeps their dataclass in its own module, registered with
``@SETTINGS.register("<section>")`` (the ``quant.<section>`` key; the schema is assembled from this
registry) and read with :func:`diffq.settings.typed`. Every module of this package is imported on the
first lookup, so a new method is one file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diffq.registry import Registry


@dataclass
class MethodContext:
    """What a method may need beyond the denoiser: the pipeline and its sampler settings, prompts
    to generate with, the model's cache key, the cache folder and the run folder."""

    pipe: Any
    family: str
    sampling: Any
    prompts: list[str]
    model_key: dict[str, Any]
    cache_dir: str
    seed: int
    out_dir: Path | None = None

METHODS: Registry[Callable[..., dict[str, Any]]] = Registry("quant.method", package=__name__)
RECON_MODES: Registry[Any] = Registry("quant.recon", package=__name__)
SETTINGS: Registry[type] = Registry("quant settings section", package=__name__)


def get_method(name: str) -> Callable[..., dict[str, Any]]:
    """The ``apply`` function of method ``name`` (ConfigError listing the registered ones)."""
    return METHODS.get(name)


def get_recon_mode(name: str) -> Any:
    """The reconstruction mode ``name`` (ConfigError listing the registered ones)."""
    return RECON_MODES.get(name)
