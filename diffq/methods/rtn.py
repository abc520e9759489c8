"""Baseline PTQ: round-to-nearest weights with observer-chosen ranges, static activation ranges."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from diffq.calib import CalibSample
from diffq.methods import METHODS
from diffq.methods.common import calibrate_activations, calibrate_weights, split_shortcuts
from diffq.model_quant import prepare
from diffq.spec import LayerSpec


@METHODS.register("rtn")
def apply(
    model: nn.Module, specs: Sequence[LayerSpec], calib: Sequence[CalibSample], cfg: Any, *,
    device: torch.device, dtype: torch.dtype, context: Any = None,
) -> dict[str, Any]:
    """Quantize ``model`` in place: weights once (then frozen), activations from ``calib`` (with
    ``split_shortcut``, the UNet up path's concatenations get one activation range per half)."""
    layers = prepare(model, specs, cfg.get("attn"))
    n_splits = split_shortcuts(model, calib, device, dtype) if cfg.get("split_shortcut") else 0
    calibrate_weights(layers, keep_original=cfg.get("keep_fp_weights", True))
    n_act = calibrate_activations(model, calib, device, dtype)
    return {"layers_quantized": len(layers), "act_quantizers_calibrated": n_act, "shortcut_splits": n_splits}
