"""Quantization methods and reconstruction modes, each registered by its own module.

A method is ``apply(model, specs, calib, cfg, *, device, dtype) -> stats`` registered with
``@METHODS.register("name")`` (selected by ``quant.method``); a reconstruction mode is a
:class:`~diffq.methods.reconstruct.ReconMode` registered with ``RECON_MODES`` (``quant.recon``).
Every module of this package is imported on the first lookup, so a new method is one file.
"""
from __future__ import annotations

from typing import Any, Callable

from diffq.registry import Registry

METHODS: Registry[Callable[..., dict[str, Any]]] = Registry("quant.method", package=__name__)
RECON_MODES: Registry[Any] = Registry("quant.recon", package=__name__)


def get_method(name: str) -> Callable[..., dict[str, Any]]:
    """The ``apply`` function of method ``name`` (ConfigError listing the registered ones)."""
    return METHODS.get(name)


def get_recon_mode(name: str) -> Any:
    """The reconstruction mode ``name`` (ConfigError listing the registered ones)."""
    return RECON_MODES.get(name)
