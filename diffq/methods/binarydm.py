"""BinaryDM (Zheng et al., 2024): 1-bit weights by quantization-aware training. The method sets the
model up; training is the ``binarydm`` finetuning recipe (diffq/finetune/recipes/binarydm.py).

- **LMB** (learnable multi-basis binariser): weights are ``sum_i sigma_i sign(r_i)`` with learnable
  per-output-channel ``sigma`` (:class:`~diffq.formats.binary.BinaryFormat`, ``sigma`` initialised
  to the mean |residual| of each basis); the high-resolution layers (:func:`diffq.levels.
  high_resolution_layers`: UNet levels at ``quant.binarydm.min_resolution`` of the input or more,
  never the lowest; the first / last ``edge_blocks`` blocks of a transformer) get
  ``high_res_bases`` bases, every other binarised layer the preset's. These come as rules
  *before* the preset's, so a preset or user rule on the same layers wins.
- Activations: static per-tensor quantizers calibrated here by min-max, trained by LSQ in the
  finetuning (``act_scale``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from diffq.calib import CalibSample
from diffq.levels import high_resolution_layers
from diffq.methods import METHODS, SETTINGS, rtn
from diffq.settings import typed
from diffq.spec import LayerSpec


@SETTINGS.register("binarydm")
@dataclass
class BinaryDMConfig:
    """BinaryDM's learnable multi-basis layout (``quant.binarydm``, method ``binarydm``)."""

    high_res_bases: int = 2  # sign bases of the high-resolution layers (the rest: quant.weight.bits)
    min_resolution: float = 0.5  # UNet: levels at this fraction of the input resolution or more (never the lowest)
    edge_blocks: int = 1  # transformers: the first and last blocks count as high-resolution


@METHODS.register("binarydm")
def apply(model: nn.Module, specs: Sequence[LayerSpec], calib: Sequence[CalibSample], cfg: Any, *,
          device: torch.device, dtype: torch.dtype, context: Any = None) -> dict[str, Any]:
    """Binarise the weights (sigma from each weight) and calibrate the activation ranges."""
    stats = rtn.apply(model, specs, calib, cfg, device=device, dtype=dtype, context=context)
    binary = [s for s in specs if s.quantized and s.weight is not None and s.weight.format == "binary"]
    params = sum(s.params for s in binary)
    multi = sum(s.params for s in binary if s.weight.bits > 1)
    return {**stats, "binary_layers": len(binary), "multi_basis_layers": sum(s.weight.bits > 1 for s in binary),
            "multi_basis_param_fraction": multi / max(1, params)}


def model_rules(model: nn.Module, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """LMB's rule: ``high_res_bases`` sign bases on the high-resolution layers."""
    b = typed(BinaryDMConfig, cfg.get("binarydm"), "quant.binarydm")
    names = high_resolution_layers(model, float(b.min_resolution), int(b.edge_blocks))
    return [{"names": names, "weight": {"bits": int(b.high_res_bases)}}] if names else []


apply.model_rules = model_rules
