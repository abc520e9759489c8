"""Granularity (parsed once from its config string) and the grouped view it implies.

Every quantized tensor is handled through a grouped view ``[rows, groups, group_size]``:
weights ``[out, ...]`` become ``[out, 1, K]`` (tensor / channel) or ``[out, K/g, g]`` (group /
block; a convolution's ``[out, in, kh, kw]`` grouped along its input channels at each kernel
position, ``[out, kh, kw, in]``, the order a channels-last im2col GEMM reduces over),
activations (feature axis moved last, other axes flattened into tokens) become
``[N, 1, C]`` or ``[N, C/g, g]``. Scales broadcast against that view: tensor ``[1, 1, 1]``,
weight channel ``[out, 1, 1]``, activation channel ``[1, 1, C]``, token ``[N, 1, 1]``, group
``[rows, G, 1]``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from torch import Tensor

from diffq.errors import ConfigError

__all__ = ["Granularity", "Layout"]

_PLAIN = ("tensor", "channel", "token", "block")


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale: ``tensor``, ``channel``, ``token``, ``group`` (of ``size``) or ``block``."""

    kind: str
    size: int | None = None

    @classmethod
    def parse(cls, text: str | Granularity) -> Granularity:
        """Parse ``tensor``, ``channel``, ``token``, ``group:<g>`` or ``block`` (ConfigError otherwise)."""
        if isinstance(text, Granularity):
            return text
        if text in _PLAIN:
            return cls(text)
        m = re.fullmatch(r"group:(\d+)", str(text))
        if m and int(m[1]) > 0:
            return cls("group", int(m[1]))
        raise ConfigError(
            f"unknown granularity {text!r}; use tensor, channel, token, group:<g> (e.g. group:64) or block"
        )

    def __str__(self) -> str:
        return f"group:{self.size}" if self.kind == "group" else self.kind


@dataclass(frozen=True)
class Layout:
    """The grouped view of a weight (``kind="weight"``) or an activation with its feature axis."""

    kind: str
    granularity: Granularity
    feature_axis: int = -1
    block: int | None = None  # elements per block of a block format (granularity block)

    def __post_init__(self) -> None:
        if self.kind not in ("weight", "act"):
            raise ConfigError(f"quantizer kind must be 'weight' or 'act' (got {self.kind!r})")
        if self.granularity.kind == "token" and self.kind == "weight":
            raise ConfigError("granularity 'token' is for activations; use tensor, channel or group:<g> for weights")

    @property
    def group(self) -> int | None:
        """Elements per group along the reduction axis (None: the whole axis)."""
        return self.granularity.size if self.granularity.kind == "group" else self.block

    def _channels_last(self, shape: tuple[int, ...]) -> bool:
        return self.kind == "weight" and len(shape) == 4 and self.group is not None

    def grouped_shape(self, shape: tuple[int, ...], name: str = "") -> tuple[int, int, int]:
        """``(rows, groups, group_size)`` of a tensor of ``shape`` (ConfigError if the group does not divide)."""
        if self.kind == "weight":
            rows, k = shape[0], math.prod(shape[1:])
        else:
            k = shape[self.feature_axis]
            rows = math.prod(shape) // max(k, 1)
        gs = self.group or k
        if self._channels_last(shape) and shape[1] % gs:
            raise ConfigError(f"group size {gs} does not divide the {shape[1]} input channels of layer "
                              f"{name or '<unnamed>'}; use a divisor of {shape[1]} or skip this layer")
        if k % gs:
            divisor = max(d for d in range(1, gs + 1) if k % d == 0)
            raise ConfigError(
                f"group size {gs} does not divide K={k} (features of layer {name or '<unnamed>'}); "
                f"use a divisor of {k}, e.g. group:{divisor}, or skip this layer"
            )
        return rows, k // gs, gs

    def view(self, x: Tensor, name: str = "") -> Tensor:
        """``x`` as ``[rows, groups, group_size]``."""
        shape = self.grouped_shape(tuple(x.shape), name)
        if self.kind == "act":
            x = x.movedim(self.feature_axis, -1)
        elif self._channels_last(tuple(x.shape)):
            x = x.permute(0, 2, 3, 1)
        return x.reshape(shape)

    def unview(self, v: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`view` for a tensor of the original ``shape``."""
        if self._channels_last(shape):
            out, cin, kh, kw = shape
            return v.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
        if self.kind == "weight":
            return v.reshape(shape)
        axis = self.feature_axis % len(shape)
        moved = [*shape[:axis], *shape[axis + 1 :], shape[axis]]
        return v.reshape(moved).movedim(-1, axis)

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        """Axes of the grouped view that one scale covers."""
        if self.granularity.kind == "tensor":
            return (0, 1, 2)
        if self.granularity.kind == "channel" and self.kind == "act":
            return (0, 1)
        return (2,)

    def elements_per_scale(self, shape: tuple[int, ...]) -> int:
        """How many elements of a tensor of ``shape`` share one scale."""
        if self.group is not None:
            return self.group
        view = self.grouped_shape(tuple(shape))
        return math.prod(view[d] for d in self.reduce_dims)

    def flatten(self, v: Tensor) -> tuple[Tensor, list[int]]:
        """The grouped view as ``[kept, reduced]`` plus the keepdim shape of the kept axes."""
        dims = self.reduce_dims
        keep = [d for d in range(v.dim()) if d not in dims]
        kept_shape = [v.shape[d] if d in keep else 1 for d in range(v.dim())]
        return v.permute(*keep, *dims).reshape(math.prod(kept_shape), -1), kept_shape

