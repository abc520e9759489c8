"""Block reconstruction: BRECQ / AdaRound (``layer``, ``block``) and EDA-DM's fine-grained ``fbr``.

Starting from the RTN-calibrated model, each unit (see :mod:`diffq.methods.blocks`) is
reconstructed in execution order, one at a time, so peak memory is one unit's inputs and outputs
over the calibration set:

- targets: the unit's output with everything in floating point (and, for ``fbr``, the output of
  every quantized layer inside it);
- inputs: the unit's input in the model whose earlier units are already quantized and
  reconstructed (asymmetric reconstruction); with ``qdrop`` each input element is the FP one
  with that probability (QDrop);
- ``layer`` / ``block`` (BRECQ): AdaRound on the unit's weights, ``iters`` Adam steps on
  ``MSE + reg_weight * sum(1 - |2h-1|^beta)`` (beta decayed ``beta_start`` -> ``beta_end`` after
  ``warmup``), hard rounding, then ``act_iters`` steps of LSQ on the static activation step sizes;
- ``fbr`` (EDA-DM): one joint loop of ``iters`` steps over rounding and activation step sizes
  (cosine-annealed lrs) on ``block MSE + fine_grained_weight * sum of the inner layers' MSE``,
  the rounding regulariser only with ``fbr_regularizer``; hard rounding after.

Each calibration call (a sampler step's batch, CFG branches included) is one training item. A
unit whose learned state reproduces its FP output worse than its RTN start (on the calibration
items) goes back to RTN, so reconstruction never ships a unit that it made worse.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffq.calib import CalibSample
from diffq.calib.capture import map_tensors
from diffq.errors import CalibrationError, ConfigError
from diffq.methods.adaround import AdaRound, beta_schedule
from diffq.methods.blocks import find_blocks, quant_layers
from diffq.methods import RECON_MODES, get_recon_mode
from diffq.model_quant import SplitQuantizer, float_mode

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ReconMode:
    """How a reconstruction mode cuts the model and trains each unit."""

    granularity: str  # unit kind for diffq.methods.blocks.find_blocks
    joint: bool  # one loop over rounding and step sizes (EDA-DM) instead of rounding, then step sizes (BRECQ)


RECON_MODES.register("layer")(ReconMode("layer", joint=False))
RECON_MODES.register("block")(ReconMode("block", joint=False))
RECON_MODES.register("fbr")(ReconMode("block", joint=True))


class _Stop(Exception):
    """Raised by a hook once the unit under reconstruction has run (skips the rest of the model)."""


@dataclass
class _Item:
    args: tuple
    kwargs: dict[str, Any]
    output: Any = None
    layer_outputs: dict[str, torch.Tensor] | None = None


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if hasattr(obj, "to_tuple"):  # diffusers/transformers output objects
        return _tensors(obj.to_tuple())
    return []


def _detach(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach())


def _capture(model: nn.Module, unit: nn.Module, calib: Sequence[CalibSample], device: torch.device,
             dtype: torch.dtype, layers: Mapping[str, nn.Module] | None = None) -> list[_Item]:
    """The unit's inputs and output (and the outputs of ``layers``) for every calibration call;
    the model stops as soon as the unit has run."""
    items: list[_Item] = []
    outputs: dict[str, torch.Tensor] = {}

    def on_input(module, args, kwargs):
        items.append(_Item(_detach(args), _detach(kwargs)))

    def on_output(module, args, kwargs, output):
        items[-1].output = _detach(output)
        items[-1].layer_outputs = dict(outputs) if layers else None
        raise _Stop

    def keep(name):
        return lambda module, args, output: outputs.__setitem__(name, output.detach())

    hooks = [unit.register_forward_pre_hook(on_input, with_kwargs=True),
             unit.register_forward_hook(on_output, with_kwargs=True)]
    hooks += [m.register_forward_hook(keep(n)) for n, m in (layers or {}).items()]
    try:
        with torch.no_grad():
            for sample in calib:
                outputs.clear()
                try:
                    model(**sample.to(device, dtype), return_dict=False)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return items


def _mix(q: Any, fp: Any, p: float, gen: torch.Generator) -> Any:
    """QDrop: each floating element of the quantized-path input replaced by the FP one with probability p."""
    if p <= 0:
        return q
    if torch.is_tensor(q) and q.is_floating_point():
        keep_fp = torch.rand(q.shape, generator=gen, device="cpu").to(q.device) < p
        return torch.where(keep_fp, fp, q)
    if isinstance(q, Mapping):
        return {k: _mix(v, fp[k], p, gen) for k, v in q.items()}
    if isinstance(q, (list, tuple)):
        return type(q)(_mix(a, b, p, gen) for a, b in zip(q, fp))
    return q


def _mse(out: Any, target: Any) -> torch.Tensor:
    pairs = list(zip(_tensors(out), _tensors(target)))
    return sum(F.mse_loss(o.float(), t.float()) for o, t in pairs) / len(pairs)


class _Unit:
    """One unit under reconstruction: its rounding modules and learnable activation step sizes."""

    def __init__(self, name: str, module: nn.Module, learn_acts: bool, scale_aware: bool = False):
        self.name, self.module = name, module
        self.layers = quant_layers(module)
        self.roundings: dict[str, AdaRound] = {}
        for n, layer in self.layers.items():
            if layer.weight_quantizer is not None:
                layer.rounding = self.roundings[n] = AdaRound(layer.weight_quantizer, layer.weight, scale_aware)
        self.acts = []
        if learn_acts:
            inputs = [layer.input_quantizer for layer in self.layers.values() if layer.input_quantizer is not None]
            parts = [p for q in inputs for p in (q.parts if isinstance(q, SplitQuantizer) else [q])]
            self.acts = [q for q in parts if not q.dynamic and q.scale.numel()]
        self._saved_scales = [q.scale.detach().clone() for q in self.acts]
        self._saved_weights = {n: self.layers[n].weight_fq for n in self.roundings}

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
            layer.weight_fq = r.hard().to(layer.weight.dtype).contiguous()  # same conv kernels as a reload
            layer.learned_rounding = True
            layer.rounding = None

    def fix_step_sizes(self) -> None:
        """Stop training the activation step sizes."""
        for q in self.acts:
            q.scale.requires_grad_(False)

    def revert(self) -> None:
        """Back to the RTN weights and the observed step sizes (after a failure, or when the learned
        unit reproduces its FP output worse than RTN did)."""
        for n in self.roundings:
            layer = self.layers[n]
            layer.rounding = None
            layer.weight_fq, layer.learned_rounding = self._saved_weights[n], False
        with torch.no_grad():
            for q, s in zip(self.acts, self._saved_scales):
                q.scale.copy_(s)
                q.scale.requires_grad_(False)


def _check(loss: torch.Tensor, unit: _Unit, step: int) -> None:
    if not torch.isfinite(loss):
        unit.revert()
        raise CalibrationError(
            f"reconstruction of {unit.name} hit a NaN/Inf loss at step {step}: the units before it stay "
            "reconstructed and this one keeps its RTN weights; fix: lower recon.lr / recon.act_lr, or check the "
            "calibration data"
        )


def _optimise(unit: _Unit, items: Sequence[_Item], fp_items: Sequence[_Item], rc: Mapping[str, Any], joint: bool,
              stage: str, rng: np.random.Generator, gen: torch.Generator) -> float:
    """One optimisation loop over ``items``; returns the final loss (mean of the last 10% of steps)."""
    if stage == "round":
        iters = rc["iters"]
        groups = [{"params": unit.rounding_params(), "lr": rc["lr"]}]
        if joint and unit.acts:
            groups.append({"params": unit.act_params(), "lr": rc["act_lr"]})
    else:
        iters = rc["act_iters"]
        groups = [{"params": unit.act_params(), "lr": rc["act_lr"]}]
    if iters <= 0 or not any(g["params"] for g in groups):
        return float("nan")
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters) if joint else None
    fine = rc["fine_grained_weight"] if joint else 0.0
    outputs: dict[str, torch.Tensor] = {}
    hooks = ([m.register_forward_hook(lambda mod, a, o, n=n: outputs.__setitem__(n, o)) for n, m in unit.layers.items()]
             if fine else [])
    losses = []
    try:
        for step in range(iters):
            i = int(rng.integers(len(items)))
            q, fp = items[i], fp_items[i]
            args = _mix(q.args, fp.args, rc["qdrop"], gen)
            kwargs = _mix(q.kwargs, fp.kwargs, rc["qdrop"], gen)
            loss = _mse(unit.module(*args, **kwargs), fp.output)
            if fine:
                loss = loss + fine * sum(F.mse_loss(outputs[n].float(), t.float()) for n, t in fp.layer_outputs.items()
                                         if n in outputs) / max(1, len(fp.layer_outputs))
            if stage == "round" and (not joint or rc["fbr_regularizer"]):
                beta = beta_schedule(step, iters, rc["warmup"], rc["beta_start"], rc["beta_end"])
                if beta is not None:
                    loss = loss + rc["reg_weight"] * unit.regularizer(beta)
            _check(loss.detach(), unit, step)
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


def reconstruct(model: nn.Module, calib: Sequence[CalibSample], rc: Mapping[str, Any], mode: str, *,
                device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Reconstruct ``model`` (already RTN-calibrated, FP weights kept) unit by unit; returns stats."""
    recon_mode = get_recon_mode(mode)
    if not calib:
        raise CalibrationError("reconstruction needs calibration samples: raise calib.num_prompts / calib.num_steps")
    overwritten = [n for n, layer in quant_layers(model).items()
                   if layer.frozen and layer.weight_fq.data_ptr() == layer.weight.data_ptr()]
    if overwritten:
        raise ConfigError("reconstruction needs the FP weights: set quant.keep_fp_weights=true")
    with float_mode(model):
        units = find_blocks(model, recon_mode.granularity, lambda: model(**calib[0].to(device, dtype), return_dict=False))
    rng = np.random.default_rng(rc["seed"])
    gen = torch.Generator().manual_seed(int(rc["seed"]))
    stats: dict[str, Any] = {"recon": mode, "recon_units": len(units), "recon_loss": {}}
    t0 = time.perf_counter()
    for name, module in tqdm(units, desc=f"reconstruct ({mode})", unit="unit"):
        inner = quant_layers(module) if recon_mode.joint else None
        with float_mode(model):
            fp_items = _capture(model, module, calib, device, dtype, inner)
        q_items = _capture(model, module, calib, device, dtype)
        before = float(np.mean([_mse(_run(module, q), fp.output) for q, fp in zip(q_items, fp_items)]))
        unit = _Unit(name, module, learn_acts=rc["act_iters"] > 0 or recon_mode.joint, scale_aware=rc.get("scale_aware", False))
        module.train(False)
        _optimise(unit, q_items, fp_items, rc, recon_mode.joint, "round", rng, gen)
        unit.harden()
        if not recon_mode.joint:  # BRECQ: step sizes after the rounding (fbr learnt them jointly)
            _optimise(unit, q_items, fp_items, rc, recon_mode.joint, "act", rng, gen)
        unit.fix_step_sizes()
        after = float(np.mean([_mse(_run(module, q), fp.output) for q, fp in zip(q_items, fp_items)]))
        kept = "recon" if after <= before else "rtn"
        if kept == "rtn":  # never ship a unit that reproduces the FP output worse than its start
            unit.revert()
        stats["recon_loss"][name] = {"rtn": before, "recon": after, "kept": kept}
        log.info("%s: output MSE %.4g (RTN) -> %.4g (%s kept)", name, before, after, kept.upper())
    stats["recon_seconds"] = round(time.perf_counter() - t0, 2)
    return stats


@torch.no_grad()
def _run(module: nn.Module, item: _Item) -> Any:
    return module(*item.args, **item.kwargs)
