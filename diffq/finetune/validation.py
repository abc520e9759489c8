"""Validation of the finetuning loop: fixed held-out batches of teacher calls and the teacher's outputs
on them, the distillation loss of the student on them, the teacher's drift, weight statistics, and the
best state kept as a CPU snapshot."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from diffq.calib.capture import map_tensors
from diffq.errors import TrainingError
from diffq.finetune.data import Pool, collate
from diffq.finetune.losses import ExtraLoss
from diffq.finetune.select import Selection
from diffq.layers import is_quant_layer

log = logging.getLogger(__name__)

VAL_ITEMS = 64  # most validation items (denoiser calls of one trajectory each)


def to_device(kwargs: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return map_tensors(dict(kwargs), lambda t: t.to(device, dtype if t.is_floating_point() else None))


def student_output(student: nn.Module, kwargs: Mapping[str, Any], cfg: Mapping[str, Any],
                 device: torch.device) -> torch.Tensor:
    """The student's output (float32) as training computes it (bfloat16 autocast on CUDA when asked)."""
    autocast = bool(cfg["autocast"]) and device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return student(**kwargs, return_dict=False)[0].float()


def eval_interval(eval_every: int | None, steps: int) -> int:
    """Steps between validations: ``finetune.eval_every``, null meaning ``max(1, steps // 10)``; 0: none."""
    return max(1, steps // 10) if eval_every is None else int(eval_every)


def validation_items(pool: Pool, cap: int = VAL_ITEMS) -> list[tuple[int, int, int]]:
    """The validation items of ``pool``, ordered by sampler call, then trajectory: all of them, or
    ``cap`` evenly spaced ones (so every step of the sampler is represented alike)."""
    items = sorted(pool.items, key=lambda it: (it[2], pool.trajectory(it)))
    if len(items) <= cap:
        return items
    return [items[i] for i in torch.linspace(0, len(items) - 1, cap).round().long().tolist()]


@dataclass
class Validation:
    """Fixed validation batches (denoiser kwargs, on the CPU) and the teacher's outputs on them (float32)."""

    batches: list[dict[str, Any]]
    teacher: list[torch.Tensor]


@torch.no_grad()
def build_validation(model: nn.Module, sel: Selection, pool: Pool, items: Sequence[tuple[int, int, int]],
                     batch_size: int, device: torch.device, dtype: torch.dtype) -> Validation:
    """``items`` of ``pool`` in batches of ``batch_size`` and the teacher's outputs on them, computed once."""
    batches = [collate([pool.kwargs(it) for it in items[i : i + batch_size]]) for i in range(0, len(items), batch_size)]
    with sel.teacher_mode():
        teacher = [model(**to_device(b, device, dtype), return_dict=False)[0].float().cpu() for b in batches]
    return Validation(batches, teacher)


@torch.no_grad()
def validation_loss(model: nn.Module, val: Validation, cfg: Mapping[str, Any], device: torch.device,
                    dtype: torch.dtype) -> float:
    """Mean over the validation set of the squared error between the student's and the stored
    teacher's outputs (the distillation term; extra losses and the data loss are not in it)."""
    sse = torch.zeros((), dtype=torch.float64, device=device)
    for kwargs, teacher in zip(val.batches, val.teacher):
        out = student_output(model, to_device(kwargs, device, dtype), cfg, device)
        sse += (out - teacher.to(device)).pow(2).sum(dtype=torch.float64)
    return float(sse) / sum(t.numel() for t in val.teacher)


@torch.no_grad()
def teacher_drift(model: nn.Module, sel: Selection, val: Validation, device: torch.device,
                  dtype: torch.dtype) -> float:
    """Max abs difference of the teacher's output on the first validation batch now to the stored one
    (0 unless training changed the FP teacher)."""
    with sel.teacher_mode():
        out = model(**to_device(val.batches[0], device, dtype), return_dict=False)[0].float()
    return float((out - val.teacher[0].to(device)).abs().max())


@torch.no_grad()
def weight_stats(sel: Selection) -> dict[str, float | None]:
    """Over the selection's quantized layers with a weight quantizer: ``zero_fraction``, the fraction
    of quantized weight elements exactly 0, and ``latent_to_scale``, the layers' mean of
    mean|latent weight| / mean(scale) (formats with a per-tensor/channel scale only; None without).
    Ternary training saturating its codes to +-1 shows as both falling."""
    modules = dict(sel.model.named_modules())
    layers = [m for m in map(modules.get, sel.plan) if is_quant_layer(m) and m.weight_quantizer is not None]
    zeros, total, ratios = [], 0, []
    for layer in layers:
        w = layer.quantized_weight()
        zeros.append((w == 0).sum())
        total += w.numel()
        q = layer.weight_quantizer
        if "scale" in q.fmt.param_names(q.symmetric) and not q.fmt.block_size:
            latent = layer.latent_weight()
            scale = q.qparams(q.view(latent))["scale"]
            ratios.append(latent.float().abs().mean() / scale.float().mean())
    return {"zero_fraction": float(torch.stack(zeros).sum()) / total if total else None,
            "latent_to_scale": float(torch.stack(ratios).mean()) if ratios else None}


def snapshot(params: Mapping[str, torch.Tensor], extra: Sequence[ExtraLoss]) -> dict[str, dict[str, torch.Tensor]]:
    """A CPU copy of the trainable state: the (master) parameters and the extra losses' state."""
    return {"params": {n: p.detach().to("cpu", copy=True) for n, p in params.items()},
            "extra": {f"{i}/{k}": v.detach().to("cpu", copy=True) for i, e in enumerate(extra)
                      for k, v in e.state().items()}}


def load_extra(extra: Sequence[ExtraLoss], tensors: Mapping[str, torch.Tensor]) -> None:
    """Put a :func:`snapshot`'s extra-loss state back into the extra losses."""
    for i, e in enumerate(extra):
        e.load_state({k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == str(i)})


class Validator:
    """Validation during training: the loss on the held-out batches at a step, recorded with the
    teacher's drift and the weight statistics, and the best state kept (a snapshot) when ``keep_best``."""

    def __init__(self, model: nn.Module, sel: Selection, vset: Validation, cfg: Mapping[str, Any], record: dict,
                 best: dict, params: Mapping[str, torch.Tensor], extra: Sequence[ExtraLoss], keep_best: bool,
                 steps: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.sel, self.vset, self.cfg, self.record, self.best = model, sel, vset, cfg, record, best
        self.params, self.extra, self.keep_best, self.steps = params, extra, keep_best, steps
        self.device, self.dtype = device, dtype
        self.seconds = 0.0

    def __call__(self, done: int) -> None:
        """Validate the model after ``done`` steps (TrainingError for a non-finite loss)."""
        t = time.perf_counter()
        loss = validation_loss(self.model, self.vset, self.cfg, self.device, self.dtype)
        if not math.isfinite(loss):
            raise TrainingError(f"finetuning validation loss is {loss} at step {done}; fix: lower finetune.optim.lr "
                                "(and the step-size lrs), or train in float32")
        drift = teacher_drift(self.model, self.sel, self.vset, self.device, self.dtype)
        if drift != 0:
            log.warning("the FP teacher drifted at step %d: its output differs by up to %g from the start", done, drift)
        record = self.record
        record["val_curve"].append([done, loss])
        record["probes"].append({"step": done, "teacher_drift": drift, **weight_stats(self.sel)})
        if record["best_val_loss"] is None or loss < record["best_val_loss"]:
            record["best_step"], record["best_val_loss"] = done, loss
            if self.keep_best:
                self.best.update(snapshot(self.params, self.extra))
        self.seconds += time.perf_counter() - t
        log.info("finetuning validation loss %.6g at step %d of %d (best %.6g at step %d)", loss, done, self.steps,
                 record["best_val_loss"], record["best_step"])
