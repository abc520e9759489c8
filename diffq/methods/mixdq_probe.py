"""MixDQ's sensitivity probes: every candidate width's quantizer parameters per layer
(:class:`Candidates`), one layer quantized at a time (:func:`only`), the two metrics of a configuration
on the search prompts (:class:`Probe`: SQNR of the denoiser output, SSIM of images), every layer's
sensitivity at every width (:func:`measure`) and their CSV and plot."""
from __future__ import annotations

import contextlib
import csv
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.calib import CalibSample
from diffq.calib.capture import capture_trajectories
from diffq.eval.fidelity import sqnr, ssim
from diffq.methods import MethodContext
from diffq.methods.common import calibrate_activations
from diffq.model_quant import act_parts, float_mode
from diffq.models import generate_images, sample_seeds
from diffq.spec import LayerSpec
from diffq.weight_sources import FloatWeight

log = logging.getLogger(__name__)

SEARCH_STREAM = "mixdq-search"  # the search prompts' seeds: never the evaluation's (sample_seeds' default stream)


class Candidates:
    """Every candidate width's quantizer parameters per layer, and installing one of them."""

    def __init__(self, layers: Mapping[str, nn.Module], specs: Mapping[str, LayerSpec], wbits: Mapping[str, list],
                 abits: Sequence[int], calib: Sequence[CalibSample], model: nn.Module, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.layers, self.specs = layers, specs
        self.weights: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name, layer in layers.items():
            wq = layer.weight_quantizer
            if wq is None:
                continue
            self.weights[name] = {}
            for b in wbits[name]:
                wq.set_format(replace(specs[name].weight, bits=b).build_format())
                wq.calibrate_weight(layer.weight)
                self.weights[name][b] = wq.params()
        self.acts: dict[str, dict[int, list[dict[str, torch.Tensor]]]] = {n: {} for n, m in layers.items()
                                                                          if m.input_quantizer is not None}
        for b in abits:
            for name in self.acts:
                for q in act_parts(layers[name].input_quantizer):
                    q.set_format(replace(specs[name].act, bits=b).build_format())
            calibrate_activations(model, calib, device, dtype)
            for name in self.acts:
                self.acts[name][b] = [q.params() for q in act_parts(layers[name].input_quantizer)]

    def set_weight(self, name: str, bits: int) -> None:
        """Quantize the layer's weight at ``bits`` (and cache it)."""
        layer, wq = self.layers[name], self.layers[name].weight_quantizer
        wq.set_format(replace(self.specs[name].weight, bits=bits).build_format())
        wq.set_params(**self.weights[name][bits])
        layer.freeze(keep_original=True)

    def set_act(self, name: str, bits: int | None) -> None:
        """Quantize the layer's input at ``bits`` (None: keep it floating point)."""
        stored = self.acts[name][bits or min(self.acts[name])]
        for q, params in zip(act_parts(self.layers[name].input_quantizer), stored):
            q.enabled = bits is not None
            if bits is not None:
                q.set_format(replace(self.specs[name].act, bits=bits).build_format())
                q.set_params(**params)


@contextlib.contextmanager
def only(layers: Mapping[str, nn.Module], name: str, what: str) -> Iterator[None]:
    """Only layer ``name``'s weight (``what="weight"``) or input (``"act"``) quantized."""
    saved = {n: m.quant_enabled for n, m in layers.items()}
    layer = layers[name]
    inputs = act_parts(layer.input_quantizer)
    enabled = [q.enabled for q in inputs]
    source = layer.weight_source
    try:
        for m in layers.values():
            m.quant_enabled = False
        layer.quant_enabled = True
        if what == "weight":
            for q in inputs:
                q.enabled = False
        else:
            layer.use_source(FloatWeight())
        yield
    finally:
        for n, m in layers.items():
            m.quant_enabled = saved[n]
        for q, e in zip(inputs, enabled):
            q.enabled = e
        layer.use_source(source)


class Probe:
    """The two metrics of one configuration of the model on the search prompts: SQNR of the denoiser
    output on calls of their FP trajectories, and their images (SSIM and MSE vs FP, in float)."""

    def __init__(self, model: nn.Module, context: MethodContext, prompts: list[str], sqnr_calls: int,
                 ssim_window: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.ctx, self.prompts, self.window = model, context, prompts, ssim_window
        self.device, self.dtype = device, dtype
        self.seeds = sample_seeds(context.seed, len(prompts), stream=SEARCH_STREAM)
        s = context.sampling
        batches = math.ceil(len(prompts) / s.batch_size)
        with float_mode(model):
            self.calls = capture_trajectories(context.pipe, context.family, prompts, self.seeds,
                                              keep_steps=math.ceil(sqnr_calls / batches),
                                              **s.sampler_kwargs())[:sqnr_calls]
            self.ref = self.outputs()
            self.fp_images = self.images()

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The denoiser's outputs on the recorded calls."""
        return [self.model(**c.to(self.device, self.dtype), return_dict=False)[0].float().cpu() for c in self.calls]

    def images(self, n: int | None = None) -> torch.Tensor:
        """Images of the (first ``n``) search prompts, float in [0, 1]."""
        n = n or len(self.prompts)
        return generate_images(self.ctx.pipe, self.ctx.family, self.prompts[:n], self.seeds[:n],
                               **self.ctx.sampling.sampler_kwargs(), progress=False)

    def sqnr(self) -> float:
        """SQNR (dB) of the current model against FP on the recorded calls."""
        return sqnr(self.ref, self.outputs())

    def ssim(self) -> float:
        """Mean SSIM of the current model's images against FP's."""
        return float(ssim(self.fp_images, self.images(), window=self.window).mean())

    def image_mse(self, n: int | None = None) -> float:
        """Mean squared error of the current model's images of the first ``n`` search prompts against
        FP's (float, not the code's wrapped uint8)."""
        n = n or len(self.prompts)
        return float((self.images(n) - self.fp_images[:n]).square().mean())


def measure(cands: Candidates, probe: Probe, ssim_layers: set[str], wbits: Mapping[str, list], abits: Sequence[int]
            ) -> dict[str, dict[str, dict[int, float]]]:
    """``{layer: {"weight": {bits: score}, "act": {bits: score}}}``, one layer quantized at a time:
    SSIM of images for ``ssim_layers``, SQNR of the denoiser output for the others."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    jobs = [(n, "weight", b) for n in cands.weights for b in wbits[n]] + [(n, "act", b) for n in cands.acts
                                                                           for b in abits]
    for name, what, b in tqdm(jobs, desc="mixdq sensitivity", unit="probe"):
        if what == "weight":
            cands.set_weight(name, b)
        else:
            cands.set_act(name, b)
        with only(cands.layers, name, what):
            score = probe.ssim() if name in ssim_layers else probe.sqnr()
        out.setdefault(name, {"weight": {}, "act": {}})[what][b] = score
    return out


def write_sensitivity(sens: Mapping[str, Any], content: set[str], ssim_layers: set[str], folder: Path) -> None:
    """mixdq_sensitivity.csv and .png (score per layer and width, the groups coloured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(folder / "mixdq_sensitivity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "group", "metric", "what", "bits", "score"])
        for name, kinds in sens.items():
            group = "content" if name in content else "quality"
            for what, scores in kinds.items():
                for b, v in scores.items():
                    w.writerow([name, group, "ssim" if name in ssim_layers else "sqnr_db", what, b, round(v, 6)])
    fig, axes = plt.subplots(2, 2, figsize=(12, 6))
    for row, group in enumerate(("content", "quality")):
        for col, what in enumerate(("weight", "act")):
            ax = axes[row, col]
            names = [n for n in sens if (n in content) == (group == "content") and sens[n][what]]
            for b in sorted({b for n in names for b in sens[n][what]}):
                ax.plot([sens[n][what].get(b, np.nan) for n in names], marker=".", lw=0.8, label=f"{b} bit")
            metric = "SSIM" if names and names[0] in ssim_layers else "SQNR dB"
            ax.set(title=f"{group} group, {what}s ({metric})", xlabel="layer")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "mixdq_sensitivity.png", dpi=90)
    plt.close(fig)

