"""Activation-bit sensitivity of layers: the damage to the denoiser's output when only one layer's
input is quantized, at each of several bit widths (QuEST's manual sweep, automated).

For each width, a fresh static quantizer per layer (the layer's own activation settings at that
width, one range for all timesteps) is calibrated on the FP model's inputs in one pass; then each
layer in turn has only its input quantized, everything else in floating point, and the SQNR of the
denoiser output against FP over the calibration calls is its score (lower: more sensitive).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calib import CalibSample
from diffq.eval.fidelity import sqnr
from diffq.model_quant import float_mode
from diffq.spec import LayerSpec


@torch.no_grad()
def activation_sensitivity(model: nn.Module, specs: Sequence[LayerSpec], names: Sequence[str], bits: Sequence[int],
                           calib: Sequence[CalibSample], device: torch.device,
                           dtype: torch.dtype) -> dict[str, dict[int, float]]:
    """``{layer: {bits: SQNR dB of the denoiser output}}`` with only that layer's input quantized."""
    by_name = {s.name: s for s in specs}
    modules = dict(model.named_modules())

    def run() -> list[torch.Tensor]:
        return [model(**s.to(device, dtype), return_dict=False)[0].float().cpu() for s in calib]

    with float_mode(model):
        ref = run()
        scores: dict[str, dict[int, float]] = {n: {} for n in names}
        for b in bits:
            quantizers = {}
            for n in names:
                module = modules[n]
                tq = replace(by_name[n].act, bits=int(b), timestep_groups=1)
                quantizers[n] = tq.build_quantizer("act", -1 if isinstance(module, nn.Linear) else 1,
                                                   name=f"{n}.input@{b}").to(device)
            hooks = [modules[n].register_forward_pre_hook(lambda m, a, q=q: (q(a[0]), *a[1:]))
                     for n, q in quantizers.items()]
            try:
                for q in quantizers.values():
                    q.begin_calibration()
                run()
                for q in quantizers.values():
                    q.end_calibration()
                    q.enabled = False
                for n, q in tqdm(quantizers.items(), desc=f"activation sensitivity ({b} bit)", unit="layer"):
                    q.enabled = True
                    scores[n][int(b)] = sqnr(ref, run())
                    q.enabled = False
            finally:
                for h in hooks:
                    h.remove()
    return scores


def most_sensitive(scores: Mapping[str, Mapping[int, float]], fraction: float) -> list[str]:
    """The ``fraction`` of layers (at least one) with the lowest SQNR at the lowest width swept, ties
    broken by the next widths."""
    if not scores:
        return []
    keep = max(1, int(np.ceil(fraction * len(scores))))
    order = sorted(scores, key=lambda n: tuple(scores[n][b] for b in sorted(scores[n])))
    return order[:keep]
