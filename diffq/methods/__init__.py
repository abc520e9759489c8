"""Quantization methods; each exposes ``apply(model, specs, calib, cfg, *, device, dtype)``."""
from __future__ import annotations

from typing import Callable

from diffq.errors import ConfigError
from diffq.methods import fp_search, rtn

METHODS: dict[str, Callable] = {"rtn": rtn.apply, "fp_search": fp_search.apply}


def get_method(name: str) -> Callable:
    """The ``apply`` function of method ``name``."""
    if name not in METHODS:
        raise ConfigError(f"unknown quant.method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]
