"""Finetuning as a stage of a job: check the settings early, build the data, select what trains,
train (resuming from the cache), and undo the training set-up so the model evaluates and exports
like any quantized model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from diffq import calib as calibration
from diffq.attention import attention_modules
from diffq.cache import cache_key
from diffq.errors import ConfigError
from diffq.finetune.data import DATA_SOURCES, Pool, image_data_inputs, world_examples
from diffq.finetune.engine import check_optim, train
from diffq.finetune.losses import EXTRA_LOSSES, build_extra_losses
from diffq.finetune.select import plan_selection, select_trainable
from diffq.models import Sampling, denoiser_of
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import LayerSpec
from diffq.tensor_quant import TensorQuant

log = logging.getLogger(__name__)

PROMPT_SOURCES = ("calib", "world", "file")


def enabled(ft: Mapping[str, Any]) -> bool:
    """Whether the job finetunes (``finetune.steps > 0``)."""
    return int(ft["steps"]) > 0


def check_finetune(ft: Mapping[str, Any], *, load: bool, keep_fp_weights: bool, world: str | None) -> None:
    """ConfigError for finetuning settings that cannot work, before any model loads."""
    if not enabled(ft):
        return
    if load:
        raise ConfigError("finetune applies when quantizing, not to a loaded export: drop load= or use finetune=none")
    if not keep_fp_weights:
        raise ConfigError("finetuning distils from the FP weights kept next to the quantized ones: "
                          "set quant.keep_fp_weights=true")
    d = ft["data"]
    DATA_SOURCES.get(d["source"])
    if d["prompts"] not in PROMPT_SOURCES:
        raise ConfigError(f"unknown finetune.data.prompts {d['prompts']!r}: use one of {', '.join(PROMPT_SOURCES)}")
    if d["prompts"] == "file" and not d["prompts_file"]:
        raise ConfigError("finetune.data.prompts=file needs finetune.data.prompts_file")
    if (d["source"] == "images" or d["prompts"] == "world") and world != "shapes":
        raise ConfigError("finetune.data: the world's captions and images exist for the testbed models only "
                          "(model.world=shapes); use finetune.data.prompts=calib or file and a data-free source")
    if ft["batch_size"] < 1 or ft["checkpoint_every"] < 1:
        raise ConfigError("finetune.batch_size and finetune.checkpoint_every must be at least 1")
    if not ft["distill_weight"] and not (d["source"] == "images" and ft["data_weight"]):
        raise ConfigError("finetune has no loss: set finetune.distill_weight > 0, or data_weight > 0 with "
                          "finetune.data.source=images")
    for i, e in enumerate(ft["extra_losses"]):
        if e["name"] not in EXTRA_LOSSES:
            raise ConfigError(f"finetune.extra_losses[{i}]: unknown loss {e['name']!r}; "
                              f"registered: {', '.join(EXTRA_LOSSES.names())}")
    check_optim(ft["optim"])


def selection_plan(denoiser: nn.Module, family: str, specs: Sequence[LayerSpec], ft: Mapping[str, Any],
                   attn: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """What trains, per layer (ConfigError when nothing is selected), from the specs alone."""
    attn_on = bool(attn.get("enabled"))
    static = attn_on and not TensorQuant.from_mapping(attn["qkv"], "quant.attn.qkv").dynamic
    names = list(attention_modules(denoiser)) if attn_on else []
    return plan_selection(quantizable_layers(denoiser, family), specs, ft["train"], ROLES, names, static)


def training_prompts(ft: Mapping[str, Any], calib_prompts: Sequence[str]) -> tuple[list[str], Any]:
    """The prompts whose teacher trajectories make the training data (and the world's images for
    them with ``prompts=world``)."""
    d = ft["data"]
    n = int(d["num_prompts"])
    if d["prompts"] == "world" or d["source"] == "images":
        return world_examples(n, int(d["seed"]))
    source = list(calib_prompts) if d["prompts"] == "calib" else None
    return calibration.calibration_prompts(source or [], d["prompts_file"] if source is None else None, n), None


def finetune_denoiser(pipe: Any, family: str, specs: Sequence[LayerSpec], plan: Mapping[str, tuple[str, ...]],
                      ft: Mapping[str, Any], *, calib_prompts: Sequence[str], smp: Sampling, model_key: dict[str, Any],
                      cache_dir: str, state_key: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Train the quantized denoiser of ``pipe`` against its FP self as ``ft`` says; returns the
    facts for metrics.json (what trained, the loss curve, time, memory)."""
    _, denoiser = denoiser_of(pipe)
    dtype = next(denoiser.parameters()).dtype
    d = ft["data"]
    prompts, images = training_prompts(ft, calib_prompts)
    with torch.no_grad():
        folder = calibration.training_pool(
            pipe, family, model_key=model_key, prompts=prompts, seed=int(d["seed"]),
            steps=int(d["steps"] or smp.steps), guidance=smp.guidance, resolution=smp.resolution,
            batch_size=int(d["batch_size"]), call_kwargs=smp.call_kwargs, cache_dir=cache_dir)
    extra_inputs = image_data_inputs(pipe, family, images) if d["source"] == "images" else {}
    data = DATA_SOURCES.get(d["source"])(Pool(folder), **extra_inputs)
    sel = select_trainable(denoiser, plan, int(ft["lora"]["rank"]), float(ft["lora"]["alpha"]), int(ft["seed"]))
    summary = sel.summary(sum(p.numel() for p in denoiser.parameters()))
    log.info("finetuning %d parameters (%.2f%% of the denoiser) in %d layers: %s", summary["params"],
             100 * summary["fraction"], summary["layers_trained"],
             ", ".join(f"{k} {v}" for k, v in summary["params_by_kind"].items()))
    extra = build_extra_losses(ft["extra_losses"], quantizable_layers(denoiser, family), ROLES)
    state_dir = Path(cache_dir).expanduser() / "finetune" / cache_key(dict(state_key))
    try:
        stats = train(denoiser, sel, data, ft, extra=extra, device=device, dtype=dtype, state_dir=state_dir)
    finally:
        for e in extra:
            e.remove()
        sel.finish()
    return {**summary, **stats, "data": {"source": d["source"], "prompts": len(prompts), "pool": str(folder)},
            "checkpoint": str(state_dir)}
