"""Block reconstruction: BRECQ / AdaRound (``layer``, ``block``) and EDA-DM's fine-grained ``fbr``.

Starting from the RTN-calibrated model, each unit (see :mod:`diffq.methods.blocks`: whole UNet
blocks or BRECQ's ResNet + Transformer pairs, ``recon.unit``) is reconstructed in execution
order, one at a time, so peak memory is one unit's inputs and outputs over the calibration set:

- targets: the unit's output with everything in floating point (and, for ``fbr``, the output of
  every quantized layer inside it);
- inputs: the unit's input in the model whose earlier units are already quantized and
  reconstructed (asymmetric reconstruction); with ``qdrop`` each input element is the FP one
  with that probability (QDrop);
- loss: the papers' ``(out - target)^2`` summed over the feature axis and averaged over the rest
  (BRECQ / Q-Diffusion / EDA-DM's ``lp_loss``), so ``reg_weight`` means what it does there;
- ``layer`` / ``block`` (BRECQ): AdaRound on the unit's weights, ``iters`` Adam steps on
  ``loss + reg_weight * sum(1 - |2h-1|^beta)`` (beta decayed ``beta_start`` -> ``beta_end`` after
  ``warmup``), hard rounding, then ``act_iters`` steps of LSQ on the static activation step sizes;
- ``fbr`` (EDA-DM): one joint loop of ``iters`` steps over rounding and activation step sizes
  (cosine-annealed lrs) on ``block loss + fine_grained_weight * sum of the inner layers' losses``,
  the rounding regulariser only with ``fbr_regularizer``; hard rounding after.

A training batch is ``recon.batch_size`` rows drawn at random from all calibration calls, so it
mixes timesteps as EDA-DM's and BRECQ's batches do (``null``: the rows of one sampler call). A
unit whose learned state reproduces its FP output worse than its RTN start goes back to RTN, so
reconstruction never ships a unit that it made worse. Runs in the model's dtype (float16 and
bfloat16 included); rounding variables, step sizes and losses are float32.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from omegaconf import SI
from torch import nn
from tqdm.auto import tqdm

from diffq.calib import CalibSample
from diffq.errors import CalibrationError, ConfigError
from diffq.methods import RECON_MODES, get_recon_mode
from diffq.methods.adaround import AdaRound, beta_schedule
from diffq.methods.blocks import Unit, find_units, quant_layers
from diffq.methods.recon_bank import Bank, capture_unit, mix_inputs, run_unit, tensors_of
from diffq.model_quant import act_parts, float_mode
from diffq.settings import typed
from diffq.weight_sources import WeightSource

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconMode:
    """How a reconstruction mode cuts the model and trains each unit."""

    layerwise: bool  # every quantized layer is a unit (else recon.unit: block or pair)
    joint: bool  # one loop over rounding and step sizes (EDA-DM) instead of rounding, then step sizes (BRECQ)


@dataclass
class ReconConfig:
    """Reconstruction settings (the ``recon`` group); the defaults are BRECQ's paper values."""

    name: str = "paper"
    iters: int = 20000  # rounding steps per unit (fbr: the joint loop)
    lr: float = 1e-3  # Adam lr of the rounding variables
    reg_weight: float = 0.01  # lambda of the rounding regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iters with the regulariser off
    act_iters: int = 5000  # LSQ steps on activation step sizes after rounding (layer/block)
    act_lr: float = 4e-4
    fine_grained_weight: float = 1.0  # fbr: weight of the inner layers' output MSE (EDA-DM add_loss)
    fbr_regularizer: bool = False  # fbr: keep the rounding regulariser in the joint loop
    qdrop: float = 0.0  # probability of an FP input element (QDrop); EDA-DM uses 0.5
    scale_aware: bool = False  # FP4DiT: rounding variable V' = s*V with s each weight's FP step
    unit: str = "block"  # block (whole UNet blocks) | pair (BRECQ's ResNet + Transformer pairs); block/fbr modes
    batch_size: Optional[int] = None  # rows per step drawn across calibration calls (null: one call's rows)
    seed: int = SI("${seed}")


RECON_MODES.register("layer")(ReconMode(layerwise=True, joint=False))
RECON_MODES.register("block")(ReconMode(layerwise=False, joint=False))
RECON_MODES.register("fbr")(ReconMode(layerwise=False, joint=True))


def feature_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(out - target)^2`` summed over the feature axis (dim 1 of NCHW maps, the last one of token
    sequences), averaged over the rest: the papers' reconstruction loss, in float32."""
    d = (out.float() - target.float()).square()
    return d.sum(1 if d.dim() == 4 else -1).mean()


def _recon_loss(out: Any, targets: Sequence[torch.Tensor]) -> torch.Tensor:
    pairs = list(zip(tensors_of(out), targets))
    return sum(feature_loss(o, t) for o, t in pairs) / len(pairs)


class _Trainee:
    """One unit under reconstruction: its rounding modules and learnable activation step sizes."""

    def __init__(self, unit: Unit, learn_acts: bool, scale_aware: bool = False):
        self.unit, self.name = unit, unit.name
        self.layers = _inner_layers(unit)
        self.roundings: dict[str, AdaRound] = {}
        self._saved_sources: dict[str, WeightSource] = {}  # the RTN weights, put back by revert()
        for n, layer in self.layers.items():
            if layer.weight_quantizer is not None:
                self.roundings[n] = AdaRound(layer.weight_quantizer, layer.weight, scale_aware)
                self._saved_sources[n] = layer.train_rounding(self.roundings[n])
        self.acts = []
        if learn_acts:
            parts = [p for layer in self.layers.values() for p in act_parts(layer.input_quantizer)]
            self.acts = [q for q in parts if not q.dynamic and q.scale.numel()]
        self._saved_scales = [q.scale.detach().clone() for q in self.acts]

    def rounding_params(self) -> list[nn.Parameter]:
        return [r.V for r in self.roundings.values()]

    def act_params(self) -> list[nn.Parameter]:
        for q in self.acts:
            if not q.learnable:
                q.make_learnable()
        return [q.scale for q in self.acts]

    def regularizer(self, beta: float) -> torch.Tensor:
        return sum(r.regularizer(beta) for r in self.roundings.values())

    def harden(self) -> None:
        """Hard rounding into the layers' frozen weights."""
        for n, r in self.roundings.items():
            layer = self.layers[n]
            layer.cache_weight(r.hard().to(layer.weight.dtype).contiguous(), learned=True)  # same kernels as a reload

    def fix_step_sizes(self) -> None:
        """Stop training the activation step sizes."""
        for q in self.acts:
            q.scale.requires_grad_(False)

    def revert(self) -> None:
        """Back to the RTN weights and the observed step sizes (after a failure, or when the learned
        unit reproduces its FP output worse than RTN did)."""
        for n, source in self._saved_sources.items():
            self.layers[n].use_source(source)
        with torch.no_grad():
            for q, s in zip(self.acts, self._saved_scales):
                q.scale.copy_(s)
                q.scale.requires_grad_(False)


def _check(loss: torch.Tensor, trainee: _Trainee, step: int) -> None:
    if not torch.isfinite(loss):
        trainee.revert()
        raise CalibrationError(
            f"reconstruction of {trainee.name} hit a NaN/Inf loss at step {step}: the units before it stay "
            "reconstructed and this one keeps its RTN weights; fix: lower recon.lr / recon.act_lr, or check the "
            "calibration data"
        )


def _batch_index(bank: Bank, batch_size: int | None, rng: np.random.Generator) -> slice | torch.Tensor:
    """Rows of one training step: ``batch_size`` random rows of the whole set, or one call's rows."""
    total = bank.calls[-1].stop
    if batch_size:
        return torch.from_numpy(np.sort(rng.choice(total, min(batch_size, total), replace=False)))
    return bank.calls[int(rng.integers(len(bank.calls)))]


def _optimise(model: nn.Module, trainee: _Trainee, bank: Bank, fp_bank: Bank, rc: ReconConfig, joint: bool,
              stage: str, rng: np.random.Generator, gen: torch.Generator) -> float:
    """One optimisation loop; returns the final loss (mean of the last 10% of steps)."""
    if stage == "round":
        iters = rc.iters
        groups = [{"params": trainee.rounding_params(), "lr": rc.lr}]
        if joint and trainee.acts:
            groups.append({"params": trainee.act_params(), "lr": rc.act_lr})
    else:
        iters = rc.act_iters
        groups = [{"params": trainee.act_params(), "lr": rc.act_lr}]
    if iters <= 0 or not any(g["params"] for g in groups):
        return float("nan")
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters) if joint else None
    fine = rc.fine_grained_weight if joint else 0.0
    outputs: dict[str, torch.Tensor] = {}
    hooks = ([m.register_forward_hook(lambda mod, a, o, n=n: outputs.__setitem__(n, o)) for n, m in
              _inner_layers(trainee.unit).items()] if fine else [])
    losses = []
    try:
        for step in range(iters):
            index = _batch_index(bank, rc.batch_size, rng)
            inputs, _, _ = bank.rows(index)
            fp_inputs, targets, layer_targets = fp_bank.rows(index)
            bank.route(model, index)
            loss = _recon_loss(run_unit(trainee.unit, mix_inputs(inputs, fp_inputs, rc.qdrop, gen)), targets)
            if fine:  # EDA-DM sums the inner layers' losses
                loss = loss + fine * sum(feature_loss(outputs[n], t) for n, t in layer_targets.items() if n in outputs)
            if stage == "round" and (not joint or rc.fbr_regularizer):
                beta = beta_schedule(step, iters, rc.warmup, rc.beta_start, rc.beta_end)
                if beta is not None:
                    loss = loss + rc.reg_weight * trainee.regularizer(beta)
            _check(loss.detach(), trainee, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
    finally:
        for h in hooks:
            h.remove()
    return float(np.mean(losses[-max(1, iters // 10):]))


def _inner_layers(unit: Unit) -> dict[str, nn.Module]:
    return {f"{i}.{n}": layer for i, m in enumerate(unit.modules) for n, layer in quant_layers(m).items()}


@torch.no_grad()
def _unit_error(model: nn.Module, unit: Unit, bank: Bank, fp_bank: Bank) -> float:
    """Mean loss of the unit over the calibration calls."""
    losses = []
    for rows in bank.calls:
        inputs, _, _ = bank.rows(rows)
        bank.route(model, rows)
        losses.append(float(_recon_loss(run_unit(unit, inputs), fp_bank.rows(rows)[1])))
    return float(np.mean(losses))


def reconstruct(model: nn.Module, calib: Sequence[CalibSample], rc: Mapping[str, Any] | ReconConfig, mode: str, *,
                device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Reconstruct ``model`` (already RTN-calibrated, FP weights kept) unit by unit; returns stats."""
    rc = typed(ReconConfig, rc, "recon")
    recon_mode = get_recon_mode(mode)
    if not calib:
        raise CalibrationError("reconstruction needs calibration samples: raise calib.num_prompts / calib.num_steps")
    overwritten = [n for n, layer in quant_layers(model).items()
                   if layer.frozen and layer.weight_fq.data_ptr() == layer.weight.data_ptr()]
    if overwritten:
        raise ConfigError("reconstruction needs the FP weights: set quant.keep_fp_weights=true")
    granularity = "layer" if recon_mode.layerwise else rc.unit
    with float_mode(model):
        units = find_units(model, granularity, lambda: model(**calib[0].to(device, dtype), return_dict=False))
    rng = np.random.default_rng(rc.seed)
    gen = torch.Generator().manual_seed(int(rc.seed))
    stats: dict[str, Any] = {"recon": mode, "recon_unit": granularity, "recon_units": len(units), "recon_loss": {}}
    t0 = time.perf_counter()
    for unit in tqdm(units, desc=f"reconstruct ({mode}, {granularity})", unit="unit"):
        with float_mode(model):
            fp_bank = capture_unit(model, unit, calib, device, dtype, _inner_layers(unit) if recon_mode.joint else None)
        bank = capture_unit(model, unit, calib, device, dtype)
        before = _unit_error(model, unit, bank, fp_bank)
        trainee = _Trainee(unit, learn_acts=rc.act_iters > 0 or recon_mode.joint,
                           scale_aware=rc.scale_aware)
        for m in unit.modules:
            m.train(False)
        _optimise(model, trainee, bank, fp_bank, rc, recon_mode.joint, "round", rng, gen)
        trainee.harden()
        if not recon_mode.joint:  # BRECQ: step sizes after the rounding (fbr learnt them jointly)
            _optimise(model, trainee, bank, fp_bank, rc, recon_mode.joint, "act", rng, gen)
        trainee.fix_step_sizes()
        after = _unit_error(model, unit, bank, fp_bank)
        kept = "recon" if after <= before else "rtn"
        if kept == "rtn":  # never ship a unit that reproduces the FP output worse than its start
            trainee.revert()
        stats["recon_loss"][unit.name] = {"rtn": before, "recon": after, "kept": kept}
        log.info("%s: output loss %.4g (RTN) -> %.4g (%s kept)", unit.name, before, after, kept.upper())
    stats["recon_seconds"] = round(time.perf_counter() - t0, 2)
    return stats
