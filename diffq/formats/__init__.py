"""Number formats: each kind is one module of this package registered in :data:`FORMATS`.

A format rounds an already-scaled tensor to its normalised grid, computes its own scale
parameters from an observed range, fake-quantizes with its own gradient rule, maps grid values
to storage codes and back, and knows its cost in bits per element including scale overhead.
"""
from __future__ import annotations

import re

from diffq.errors import ConfigError
from diffq.formats.base import EPS, Format
from diffq.formats.registry import FORMATS, FormatKind

# registration order is the order users see in messages
# isort: off
from diffq.formats.integer import IntFormat
from diffq.formats.floating import FP_DEFAULTS, FPFormat
from diffq.formats.block import BlockFormat, MXFP4Format, NVFP4Format
from diffq.formats.ternary import TernaryFormat
from diffq.formats.binary import BinaryFormat
# isort: on

__all__ = [
    "EPS",
    "FORMATS",
    "FP_DEFAULTS",
    "Format",
    "FormatKind",
    "IntFormat",
    "FPFormat",
    "BlockFormat",
    "NVFP4Format",
    "MXFP4Format",
    "TernaryFormat",
    "BinaryFormat",
    "make_format",
    "format_from_name",
]


def make_format(kind: str, bits: int, exp: int | None = None, man: int | None = None,
                symmetric: bool = True) -> Format | None:
    """Build a format from config fields; None means "keep floating point" (kind none, or bits >= 16 for int/fp)."""
    if kind == "none":
        return None
    if kind not in FORMATS:
        raise ConfigError(f"unknown format kind {kind!r}; valid kinds: {', '.join([*FORMATS.names(), 'none'])}")
    entry = FORMATS.get(kind)
    if entry.float_from_bits is not None and bits >= entry.float_from_bits:
        return None
    if not symmetric and entry.symmetric_only:
        raise ConfigError(f"asymmetric quantization (zero point) needs format int, not {kind!r}; set symmetric=true")
    return entry.build(bits, exp, man, symmetric)


def format_from_name(name: str) -> Format:
    """Parse a format name (``int8``, ``uint4``, ``fp8_e4m3``, ``e2m1``, ``fp8``, ``nvfp4``, ``binary2``...)."""
    n = name.strip().lower()
    for kind in FORMATS.names():
        entry = FORMATS.get(kind)
        if m := re.fullmatch(entry.pattern, n):
            return entry.parse(m)
    examples = ", ".join(e for k in FORMATS.names() for e in FORMATS.get(k).examples)
    raise ConfigError(f"unknown format name {name!r}; examples: {examples}")
