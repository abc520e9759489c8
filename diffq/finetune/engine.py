"""The training loop every finetuning method shares: the quantized student matches its FP self.

Per step: draw a batch (:mod:`diffq.finetune.data`); run the teacher (the same model in float
mode, :meth:`Selection.teacher_mode`) without gradients, then the student; loss =
``distill_weight * MSE(student, teacher) + data_weight * MSE(student, target)`` plus each extra
loss's weighted term; Adam/AdamW on parameter groups (one lr per kind; float32 master copies of
half-precision parameters), warm-up then cosine or constant learning rate, gradient clipping.
Under ``accelerate launch`` / ``torchrun`` the student trains data-parallel (DDP through
accelerate), every process on its own batches.

Validation (``eval_every`` > 0; null: every ``max(1, steps // 10)`` steps): a fixed set of items
from a held-out pool of teacher trajectories (other prompts and seeds than training's; every item,
at most 64 spread evenly over the sampler's steps), the teacher's outputs on them computed once.
At step 0 (the PTQ start), every ``eval_every`` steps and at the last step the engine records the
validation loss (mean squared error of the student to the teacher over the set: the distillation
term alone, without the extra losses or the data loss), the teacher's drift (its output on the first
validation batch again, which must equal the stored one exactly) and two weight statistics of the
trained quantized layers (:func:`weight_stats`). With ``keep: best`` the trainable state (float32
master copies and the extra losses' state) at the lowest validation loss (ties: the earlier step)
is restored at the end; ``keep: last`` keeps the final state.

The trainable state, optimiser, schedule, RNG states, validation record and best state are
checkpointed every ``checkpoint_every`` steps and at the end; rerunning resumes from the last
checkpoint and ends bit-identical to an uninterrupted run (on CPU). A non-finite loss stops with
:class:`~diffq.errors.TrainingError`, the last good checkpoint kept.
"""
from __future__ import annotations

import logging
import math
import resource
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffq.distributed import process_state
from diffq.errors import ConfigError, TrainingError
from diffq.finetune.checkpoint import load_checkpoint, save_checkpoint
from diffq.finetune.data import Pool, TrainBatch, TrainingData
from diffq.finetune.losses import ExtraLoss
from diffq.finetune.select import Selection
from diffq.finetune.validation import (
    Validator,
    build_validation,
    eval_interval,
    load_extra,
    student_output,
    to_device,
    validation_items,
    weight_stats,
)

log = logging.getLogger(__name__)

__all__ = ["KEEP", "MasterWeights", "check_optim", "eval_interval", "make_optimizer", "train", "train_step",
           "weight_stats"]

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("cosine", "constant")
KEEP = ("best", "last")
DECAYED = ("weight", "bias", "lora", "other")  # kinds weight decay applies to


def check_optim(optim: Mapping[str, Any]) -> None:
    """ConfigError for an unknown optimiser or schedule, or a non-positive learning rate."""
    if optim["name"] not in OPTIMIZERS:
        raise ConfigError(f"unknown finetune.optim.name {optim['name']!r}: use one of {', '.join(OPTIMIZERS)}")
    if optim["schedule"] not in SCHEDULES:
        raise ConfigError(f"unknown finetune.optim.schedule {optim['schedule']!r}: use one of {', '.join(SCHEDULES)}")
    for key in ("lr", "act_scale_lr", "weight_scale_lr", "lora_lr"):
        if not optim[key] > 0:
            raise ConfigError(f"finetune.optim.{key} must be positive (got {optim[key]})")
    if not 0 <= optim["warmup"] < 1:
        raise ConfigError(f"finetune.optim.warmup is a fraction of the steps in [0, 1) (got {optim['warmup']})")


class MasterWeights:
    """float32 copies of the half-precision trainable parameters: the optimiser updates the copies
    (Adam's second moments underflow in float16, small updates vanish in bfloat16) and the model
    computes with their cast."""

    def __init__(self, params: Sequence[nn.Parameter], positive: Sequence[nn.Parameter] = ()) -> None:
        half = (torch.float16, torch.bfloat16)
        self.masters = {p: nn.Parameter(p.detach().float()) for p in params if p.dtype in half}
        # step sizes and sigmas stay above 1% of their start: a sign flip or zero would divide by zero
        self.floors = {self.of(p): 0.01 * p.detach().float().abs() for p in positive}

    def of(self, p: nn.Parameter) -> nn.Parameter:
        """What the optimiser updates for ``p``."""
        return self.masters.get(p, p)

    def take_grads(self) -> None:
        """Move the model's gradients onto the float32 copies."""
        for p, m in self.masters.items():
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def project(self) -> None:
        """Keep every scale above its floor (projected gradient descent on positive parameters)."""
        for m, floor in self.floors.items():
            m.copy_(torch.maximum(m, floor.to(m.dtype)))

    @torch.no_grad()
    def write_back(self) -> None:
        """Cast the float32 copies into the model's parameters."""
        for p, m in self.masters.items():
            p.copy_(m)


def make_optimizer(sel: Selection, optim: Mapping[str, Any], masters: MasterWeights) -> torch.optim.Optimizer:
    """Adam/AdamW with one parameter group per kind (weights, biases and other modules' parameters
    share ``lr``; step sizes, weight scales and adapters have their own); weight decay on the model's
    own parameters (weights, biases, adapters, other modules' parameters), never on quantizer scales."""
    lrs = {"weight": optim["lr"], "bias": optim["lr"], "other": optim["lr"], "act_scale": optim["act_scale_lr"],
           "weight_scale": optim["weight_scale_lr"], "lora": optim["lora_lr"]}
    groups = [{"params": [masters.of(p) for p in ps], "lr": lrs[kind], "kind": kind,
               "weight_decay": optim["weight_decay"] if kind in DECAYED else 0.0}
              for kind, ps in sel.groups.items()]
    return OPTIMIZERS[optim["name"]](groups, betas=tuple(optim["betas"]))


def lr_factor(step: int, steps: int, warmup: float, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup * steps``, then cosine to 0
    or constant."""
    w = int(round(warmup * steps))
    if step < w:
        return (step + 1) / w
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def _state_mb(optimizer: torch.optim.Optimizer, masters: MasterWeights) -> float:
    """Memory of the training state: trained tensors, their gradients and optimiser moments (the
    half-precision model copies of master weights included)."""
    n = sum(p.numel() * p.element_size() for p in masters.masters)
    for group in optimizer.param_groups:
        for p in group["params"]:
            n += 2 * p.numel() * p.element_size()
            n += sum(t.numel() * t.element_size() for t in optimizer.state[p].values() if torch.is_tensor(t))
    return n / 2**20


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The model wrapped for data-parallel training when several processes run (else itself)."""
    if process_state().num_processes <= 1:
        return model
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    acc = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[ddp])
    return acc.prepare_model(model, device_placement=False)


def _check_in_sync(params: Sequence[torch.Tensor] | Any) -> None:
    """RuntimeError when data-parallel processes ended with different trained parameters."""
    from accelerate.utils import gather_object

    digest = [float(sum(p.detach().double().sum() for p in params))]
    digests = gather_object(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"data-parallel finetuning diverged across processes: parameter sums {digests}")


def train_step(student: nn.Module, model: nn.Module, sel: Selection, masters: MasterWeights, batch: TrainBatch,
               extra: Sequence[ExtraLoss], cfg: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
               device: torch.device, dtype: torch.dtype, step: int) -> float:
    """One optimisation step; returns the loss (TrainingError when it is not finite)."""
    kwargs = to_device(batch.kwargs, device, dtype)
    teacher = None
    if cfg["distill_weight"] or extra:  # the extra losses compare with the teacher's features
        with torch.no_grad(), sel.teacher_mode():
            for e in extra:
                e.begin("teacher")
            teacher = model(**kwargs, return_dict=False)[0]
    for e in extra:
        e.begin("student")
    out = student_output(student, kwargs, cfg, device)
    loss = out.new_zeros(())
    if cfg["distill_weight"]:
        loss = loss + cfg["distill_weight"] * F.mse_loss(out, teacher.float())
    if batch.target is not None and cfg["data_weight"]:
        loss = loss + cfg["data_weight"] * F.mse_loss(out, batch.target.to(device).float())
    for e in extra:
        loss = loss + e.weight * e.term()
    if not torch.isfinite(loss):
        raise TrainingError(f"finetuning loss is {float(loss.detach())} at step {step + 1}; fix: lower "
                            "finetune.optim.lr (and the step-size lrs), or train in float32")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    masters.take_grads()
    if cfg["optim"]["clip_grad"]:
        torch.nn.utils.clip_grad_norm_([masters.of(p) for p in sel.parameters], cfg["optim"]["clip_grad"])
    optimizer.step()
    masters.project()
    masters.write_back()
    scheduler.step()
    return float(loss.detach())


def _resume(state_dir: Path | None, cfg: Mapping[str, Any], steps: int, params: dict[str, torch.Tensor],
            optimizer: torch.optim.Optimizer, scheduler: Any, gen: torch.Generator, masters: MasterWeights,
            extra: Sequence[ExtraLoss]) -> tuple[int, list[float], dict[str, Any], dict[str, Any]]:
    """(start step, losses, record, best state): a checkpoint's in ``state_dir`` when resuming, else fresh."""
    record: dict[str, Any] = {"val_curve": [], "probes": [], "lr_curve": [], "best_step": None, "best_val_loss": None}
    fresh: tuple[int, list[float], dict[str, Any], dict[str, Any]] = (0, [], record, {"params": {}, "extra": {}})
    if state_dir is None or not cfg["resume"]:
        return fresh
    meta = load_checkpoint(state_dir, params=params, optimizer=optimizer, scheduler=scheduler, generator=gen)
    if meta is None:
        return fresh
    start = int(meta["step"])
    masters.write_back()
    load_extra(extra, meta["extra"])
    if start > steps:
        raise ConfigError(f"finetuning checkpoint in {state_dir} is at step {start}, past finetune.steps="
                          f"{steps}: delete it or raise finetune.steps")
    log.info("finetuning resumes at step %d of %d from %s", start, steps, state_dir)
    return start, list(meta["losses"]), meta["record"], meta["best"]


def _optimisation(sel: Selection, optim: Mapping[str, Any], steps: int
                  ) -> tuple[MasterWeights, torch.optim.Optimizer, Any, int]:
    """The float32 masters, the optimiser, its schedule and the index of the weights' parameter group."""
    masters = MasterWeights(sel.parameters, [p for k in ("act_scale", "weight_scale") for p in sel.groups.get(k, [])])
    optimizer = make_optimizer(sel, optim, masters)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, optim["warmup"], optim["schedule"]))
    lr_group = next((i for i, g in enumerate(optimizer.param_groups) if g["kind"] == "weight"), 0)
    return masters, optimizer, scheduler, lr_group


def _gradient_checkpointing(model: nn.Module, on: bool) -> bool:
    """Turn on diffusers' gradient checkpointing when asked and the model has it; whether it is on."""
    on = on and hasattr(model, "enable_gradient_checkpointing")
    if on:
        model.enable_gradient_checkpointing()
    return on


def _restore_best(params: Mapping[str, torch.Tensor], best: Mapping[str, Any], masters: MasterWeights,
                  extra: Sequence[ExtraLoss]) -> None:
    """Put the best validated state back (the checkpoint keeps the last: a rerun restores the same)."""
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best["params"][n])
    masters.write_back()
    load_extra(extra, best["extra"])


def train(model: nn.Module, sel: Selection, data: TrainingData, cfg: Mapping[str, Any], *,
          extra: Sequence[ExtraLoss] = (), device: torch.device, dtype: torch.dtype,
          state_dir: Path | None = None, val: Pool | None = None) -> dict[str, Any]:
    """Finetune the selected parameters of ``model`` for ``cfg["steps"]`` steps (resuming from ``state_dir``'s
    checkpoint), validating on the held-out pool ``val`` every ``cfg["eval_every"]`` steps and keeping the
    ``cfg["keep"]`` state; returns the loss, validation and lr curves, probes, wall time and peak memory."""
    steps, every = int(cfg["steps"]), int(cfg["checkpoint_every"])
    interval = eval_interval(cfg["eval_every"], steps) if val is not None else 0
    keep_best = interval > 0 and cfg["keep"] == "best"
    state = process_state()
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + state.process_index)
    masters, optimizer, scheduler, lr_group = _optimisation(sel, cfg["optim"], steps)
    params = {n: masters.of(p) for n, p in sel.named_trainable().items()}
    start, losses, record, best = _resume(state_dir, cfg, steps, params, optimizer, scheduler, gen, masters, extra)
    model.train(False)
    items = validation_items(val) if interval else []
    validate = None
    if items and start < steps:
        log.info("finetuning validates every %d steps on %d held-out items", interval, len(items))
        vset = build_validation(model, sel, val, items, int(cfg["batch_size"]), device, dtype)
        validate = Validator(model, sel, vset, cfg, record, best, params, extra, keep_best, steps, device, dtype)
    student = _ddp(model, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="finetune", unit="step",
               disable=not state.is_main_process or start >= steps)
    checkpointing = _gradient_checkpointing(model, bool(cfg["grad_checkpointing"]))
    try:
        if validate is not None and start == 0:
            validate(0)  # the PTQ start may be the best state
        for step in bar:
            batch = data.draw(int(cfg["batch_size"]), gen)
            record["lr_curve"].append(optimizer.param_groups[lr_group]["lr"])
            losses.append(train_step(student, model, sel, masters, batch, extra, cfg, optimizer, scheduler, device,
                                     dtype, step))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            done = step + 1
            if validate is not None and (done % interval == 0 or done == steps):
                validate(done)
            if state_dir is not None and state.is_main_process and (done % every == 0 or done == steps):
                save_checkpoint(state_dir, step=done, params=params, optimizer=optimizer, scheduler=scheduler,
                                generator=gen, losses=losses, complete=done == steps, record=record, best=best,
                                extra={f"{i}/{k}": v for i, e in enumerate(extra) for k, v in e.state().items()})
    finally:
        bar.close()
        if checkpointing:
            model.disable_gradient_checkpointing()
    wall = time.perf_counter() - t0
    if state.num_processes > 1:
        _check_in_sync(params.values())
    if keep_best:
        _restore_best(params, best, masters, extra)
    peak, kind = _peak_memory_mb(device)
    return {"steps": steps, "resumed_from": start, "wall_s": round(wall, 2),
            "val_s": round(validate.seconds if validate is not None else 0.0, 2), "processes": state.num_processes,
            "peak_memory_mb": round(peak, 1), "peak_memory_kind": kind,
            "train_state_mb": round(_state_mb(optimizer, masters), 3), **_loss_ends(losses), "loss_curve": losses,
            "eval_every": interval, "keep": "best" if keep_best else "last", "val_items": len(items), **record}


def _loss_ends(losses: Sequence[float]) -> dict[str, float | None]:
    """The mean training loss over the first and the last tenth of the steps."""
    tail = max(1, len(losses) // 10)
    return {"loss_start": sum(losses[:tail]) / tail if losses else None,
            "loss_end": sum(losses[-tail:]) / tail if losses else None}
