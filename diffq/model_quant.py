"""A model's quantizers as a whole: attach them as the layer specs say (weight and input
quantizers, attention-matmul quantizers, split input quantizers, the timestep router of grouped
ones) and switch them all off (:func:`float_mode`). Methods and checkpoint loading both build models through here."""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from diffq.attention import attach_attention_quantizers
from diffq.layers import attach_quantizers, is_quant_layer, iter_quantizers
from diffq.quantizer import Quantizer
from diffq.spec import LayerSpec
from diffq.tensor_quant import TensorQuant
from diffq.timestep_groups import install_router

log = logging.getLogger(__name__)


class SplitQuantizer(nn.Module):
    """Two input quantizers over the feature axis: ``first`` on features ``[:k]``, ``second`` on the
    rest (Q-Diffusion's shortcut splitting of the UNet up path's concatenations)."""

    kind = "act"

    def __init__(self, first: Quantizer, second: Quantizer, k: int, axis: int = 1):
        super().__init__()
        self.parts = nn.ModuleList([first, second])
        self.k, self.axis = k, axis

    @property
    def dynamic(self) -> bool:
        """Whether the halves compute their ranges at run time."""
        return self.parts[0].dynamic

    @property
    def needs_calibration(self) -> bool:
        """Whether the halves have static ranges to calibrate."""
        return self.parts[0].needs_calibration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize each half with its own quantizer."""
        a, b = x.split([self.k, x.shape[self.axis] - self.k], dim=self.axis)
        return torch.cat([self.parts[0](a), self.parts[1](b)], dim=self.axis)

    def extra_repr(self) -> str:
        return f"split at {self.k}: {self.parts[0].extra_repr()}"


def act_parts(q: nn.Module | None) -> list[Quantizer]:
    """The plain quantizers an input quantizer is made of (itself, its split halves, its timestep
    groups): each holds its own step size."""
    if q is None:
        return []
    return [m for m in q.modules() if isinstance(m, Quantizer)]


def apply_splits(model: nn.Module, splits: Mapping[str, int]) -> None:
    """Give each named layer's input quantizer a second copy for its features ``[k:]``."""
    modules = dict(model.named_modules())
    for name, k in splits.items():
        layer = modules[name]
        first = layer.input_quantizer
        second = copy.deepcopy(first)
        second.name = f"{first.name}[{k}:]"
        layer.input_quantizer = SplitQuantizer(first, second, k)


def input_splits(model: nn.Module) -> dict[str, int]:
    """``{layer name: k}`` of the layers whose input quantizer is split."""
    return {n: m.input_quantizer.k for n, m in model.named_modules()
            if is_quant_layer(m) and isinstance(m.input_quantizer, SplitQuantizer)}


def prepare(model: nn.Module, specs: Sequence[LayerSpec], attn: Mapping[str, Any] | None,
            splits: Mapping[str, int] | None = None) -> dict[str, nn.Module]:
    """Attach weight/input quantizers (attention-matmul ones when enabled, split inputs when given)."""
    layers = attach_quantizers(model, specs)
    if attn and attn.get("enabled"):
        qkv = TensorQuant.from_mapping(attn["qkv"], "quant.attn.qkv")
        softmax = TensorQuant.from_mapping(attn["softmax"], "quant.attn.softmax")
        names = attach_attention_quantizers(model, qkv, softmax if softmax.build_format() else None)
        log.info("attention matmul quantizers on %d attention modules", len(names))
    apply_splits(model, splits or {})
    install_router(model)
    return layers


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[None]:
    """Everything unquantized: quantized layers use their original weights and inputs, and every
    quantizer (attention matmuls included) passes through."""
    layers = [m for m in model.modules() if is_quant_layer(m)]
    quantizers = [q for _, q in iter_quantizers(model)]
    saved = [q.enabled for q in quantizers]
    for layer in layers:
        layer.quant_enabled = False
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.quant_enabled = True
        for q, e in zip(quantizers, saved):
            q.enabled = e


@contextlib.contextmanager
def partial_quant(model: nn.Module, weights: Sequence[str] | None, acts: bool) -> Iterator[None]:
    """Only the layers named in ``weights`` (None: every layer) quantized, the others computing in
    floating point (their FP weight, whatever is cached), and the activation quantizers (layer
    inputs, attention matmuls) on only when ``acts``."""
    saved = [(q, q.enabled) for _, q in iter_quantizers(model)]
    keep = None if weights is None else set(weights)
    off = [m for n, m in model.named_modules() if is_quant_layer(m) and keep is not None and n not in keep]
    try:
        for m in off:
            m.quant_enabled = False
        for q, _ in saved:
            if q.kind == "act" and not acts:
                q.enabled = False
        yield
    finally:
        for m in off:
            m.quant_enabled = True
        for q, e in saved:
            q.enabled = e
