"""The registry of format kinds (``format:`` in a config): how each is built and named."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from diffq.registry import Registry


@dataclass(frozen=True)
class FormatKind:
    """One ``format:`` value: ``build(bits, exp, man, symmetric)`` from config fields, and
    ``parse(match)`` for names matching ``pattern`` (e.g. ``int8``)."""

    build: Callable[..., object]
    pattern: str
    parse: Callable[[re.Match], object]
    examples: tuple[str, ...]
    float_from_bits: int | None = None  # bits at or above which the tensor stays floating point
    symmetric_only: bool = True


FORMATS: Registry[FormatKind] = Registry("format kind", package="diffq.formats")
