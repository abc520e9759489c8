"""Steps every method shares: calibrate weights, observe activations, split shortcut inputs."""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calib import CalibSample
from diffq.layers import iter_quantizers
from diffq.methods.shortcut import concat_splits
from diffq.model_quant import apply_splits, float_mode
from diffq.timestep_groups import set_boundaries

log = logging.getLogger(__name__)


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
    set_boundaries(model, [s.kwargs["timestep"] for s in calib if "timestep" in s.kwargs])
    for q in quantizers:
        q.begin_calibration()
    for sample in tqdm(calib, desc="calibrating activations", leave=False, disable=len(calib) < 4):
        model(**sample.to(device, dtype), return_dict=False)
    for q in quantizers:
        q.end_calibration()
    return len(quantizers)


def split_shortcuts(model: nn.Module, calib: Sequence[CalibSample], device: torch.device, dtype: torch.dtype) -> int:
    """Q-Diffusion shortcut splitting: one activation range per half of each up-path concatenation."""
    with float_mode(model):
        splits = concat_splits(model, lambda: model(**calib[0].to(device, dtype), return_dict=False))
    apply_splits(model, splits)
    return len(splits)
