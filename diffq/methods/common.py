"""Steps every method shares: attach quantizers, calibrate weights, observe activations."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calib import CalibSample
from diffq.layers import attach_attention_quantizers, attach_quantizers, is_quant_layer, iter_quantizers
from diffq.methods.shortcut import apply_splits, concat_splits
from diffq.spec import LayerSpec, TensorQuant

log = logging.getLogger(__name__)


def prepare(model: nn.Module, specs: Sequence[LayerSpec], attn: Mapping[str, Any] | None) -> dict[str, nn.Module]:
    """Attach weight/input quantizers (and attention-matmul ones when enabled)."""
    layers = attach_quantizers(model, specs)
    if attn and attn.get("enabled"):
        qkv = TensorQuant.from_mapping(attn["qkv"], "quant.attn.qkv")
        softmax = TensorQuant.from_mapping(attn["softmax"], "quant.attn.softmax")
        names = attach_attention_quantizers(model, qkv, softmax if softmax.build_format() else None)
        log.info("attention matmul quantizers on %d attention modules", len(names))
    return layers


@torch.no_grad()
def calibrate_weights(layers: Mapping[str, nn.Module], freeze: bool = True, keep_original: bool = True) -> None:
    """Set every weight quantizer's scale from its weight, then cache the fake-quant weight."""
    for layer in layers.values():
        if layer.weight_quantizer is not None:
            layer.weight_quantizer.calibrate_weight(layer.weight)
            if freeze:
                layer.freeze(keep_original=keep_original)


def static_act_quantizers(model: nn.Module) -> list:
    """Activation quantizers that need calibration data (static ranges)."""
    return [q for name, q in iter_quantizers(model) if q.kind == "act" and q.needs_calibration]


@torch.no_grad()
def calibrate_activations(model: nn.Module, calib: Sequence[CalibSample], device: torch.device, dtype: torch.dtype,
                          skip: Sequence[nn.Module] = ()) -> int:
    """Run the denoiser over the calibration set while static activation observers (all but
    ``skip``) record. Returns the number of quantizers calibrated.
    """
    skipped = {id(q) for q in skip}
    quantizers = [q for q in static_act_quantizers(model) if id(q) not in skipped]
    if not quantizers:
        return 0
    for q in quantizers:
        q.begin_calibration()
    for sample in tqdm(calib, desc="calibrating activations", leave=False, disable=len(calib) < 4):
        model(**sample.to(device, dtype), return_dict=False)
    for q in quantizers:
        q.end_calibration()
    return len(quantizers)


def split_shortcuts(model: nn.Module, calib: Sequence[CalibSample], device: torch.device, dtype: torch.dtype) -> int:
    """Q-Diffusion shortcut splitting: one activation range per half of each up-path concatenation."""
    with fp_mode(model):
        splits = concat_splits(model, lambda: model(**calib[0].to(device, dtype), return_dict=False))
    apply_splits(model, splits)
    return len(splits)


@contextlib.contextmanager
def fp_mode(model: nn.Module) -> Iterator[None]:
    """Everything in floating point: quantized layers use their FP weights and inputs, and every
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
