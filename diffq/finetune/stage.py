"""Finetuning as a stage of a job: check the settings early, build the data, run the recipe's stages
(each: select what trains, train resuming from the cache, undo the training set-up) so the model
evaluates and exports like any quantized model."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from diffq import calib as calibration
from diffq.attention import attention_modules
from diffq.cache import cache_key
from diffq.calib import CalibSample
from diffq.errors import ConfigError
from diffq.finetune.data import DATA_SOURCES, Pool, image_data_inputs, world_examples
from diffq.finetune.engine import check_optim, train
from diffq.finetune.losses import EXTRA_LOSSES, build_extra_losses
from diffq.finetune.recipes import RECIPES, RecipeContext, Stage
from diffq.finetune.select import WEIGHT_SCALE_MODES, select_trainable
from diffq.finetune.sensitivity import activation_sensitivity
from diffq.model_quant import float_mode, partial_quant
from diffq.models import Sampling, denoiser_of
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import LayerSpec
from diffq.tensor_quant import TensorQuant

log = logging.getLogger(__name__)

PROMPT_SOURCES = ("calib", "world", "file", "auto")


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
    if ft["weight_scale"] not in WEIGHT_SCALE_MODES:
        raise ConfigError(f"unknown finetune.weight_scale {ft['weight_scale']!r}: use one of "
                          f"{', '.join(WEIGHT_SCALE_MODES)}")
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
    RECIPES.get(ft["recipe"])().check(ft)


def plan_stages(denoiser: nn.Module, family: str, specs: Sequence[LayerSpec], ft: Mapping[str, Any],
                attn: Mapping[str, Any], measure: Callable[..., Any] | None = None
                ) -> tuple[list[Stage], dict[str, Any]]:
    """The recipe's stages (what trains in each, per layer; ConfigError when a stage selects
    nothing) and what the recipe reports; before calibration (``measure`` None) from the specs alone."""
    attn_on = bool(attn.get("enabled"))
    static = attn_on and not TensorQuant.from_mapping(attn["qkv"], "quant.attn.qkv").dynamic
    names = list(attention_modules(denoiser)) if attn_on else []
    ctx = RecipeContext(quantizable_layers(denoiser, family), specs, ft, names, static, measure, model=denoiser)
    return RECIPES.get(ft["recipe"])().stages(ctx), ctx.info


def prompt_source(d: Mapping[str, Any], world: str | None) -> str:
    """Where the training prompts come from: ``finetune.data.prompts``, with ``auto`` resolved (the
    world's captions on a model with a world, else the prompt file when set, else the calibration prompts)."""
    if d["prompts"] != "auto":
        return str(d["prompts"])
    return "world" if world == "shapes" else "file" if d["prompts_file"] else "calib"


def training_prompts(ft: Mapping[str, Any], calib_prompts: Sequence[str], world: str | None = None
                     ) -> tuple[list[str], Any]:
    """The prompts whose teacher trajectories make the training data (and the world's images for
    them with ``prompts=world``)."""
    d = ft["data"]
    n = int(d["num_prompts"])
    source = prompt_source(d, world)
    if source == "world" or d["source"] == "images":
        return world_examples(n, int(d["seed"]))
    given = list(calib_prompts) if source == "calib" else None
    return calibration.calibration_prompts(given or [], d["prompts_file"] if given is None else None, n), None


def finetune_denoiser(pipe: Any, family: str, specs: Sequence[LayerSpec], ft: Mapping[str, Any],
                      attn: Mapping[str, Any], *, calib: Sequence[CalibSample], calib_prompts: Sequence[str],
                      smp: Sampling, model_key: dict[str, Any], cache_dir: str, state_key: Mapping[str, Any],
                      device: torch.device, world: str | None = None) -> dict[str, Any]:
    """Train the quantized denoiser of ``pipe`` against its FP self as ``ft`` says, stage by stage
    (``calib`` feeds recipes that measure the quantized model); returns the facts for metrics.json
    (what trained, the loss curve, time, memory), the stages' summed and each one's."""
    _, denoiser = denoiser_of(pipe)
    dtype = next(denoiser.parameters()).dtype
    d = ft["data"]
    prompts, images = training_prompts(ft, calib_prompts, world)
    with torch.no_grad(), float_mode(denoiser):  # the teacher's data: the FP model's own trajectories
        folder = calibration.training_pool(
            pipe, family, model_key=model_key, prompts=prompts, seed=int(d["seed"]),
            steps=int(d["steps"] or smp.steps), guidance=smp.guidance, resolution=smp.resolution,
            batch_size=int(d["batch_size"]), call_kwargs=smp.call_kwargs, cache_dir=cache_dir)
    extra_inputs = image_data_inputs(pipe, family, images) if d["source"] == "images" else {}
    data = DATA_SOURCES.get(d["source"])(Pool(folder), **extra_inputs)

    def measure(names: Sequence[str], bits: Sequence[int], calls: int) -> dict[str, dict[int, float]]:
        return activation_sensitivity(denoiser, specs, names, bits, calib[:calls], device, dtype)

    stages, info = plan_stages(denoiser, family, specs, ft, attn, measure)
    root = Path(cache_dir).expanduser() / "finetune" / cache_key(dict(state_key))
    teacher: dict = {}
    results, trained = [], {}
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        sel = select_trainable(denoiser, stage.plan, int(ft["lora"]["rank"]), float(ft["lora"]["alpha"]),
                               int(ft["seed"]), teacher=teacher, weight_scale=stage.settings["weight_scale"])
        total = sum(p.numel() for p in denoiser.parameters())  # learned step sizes are parameters now
        summary = sel.summary(total)
        kind_of = {id(p): kind for kind, ps in sel.groups.items() for p in ps}
        trained.update({n: (kind_of[id(p)], p.numel()) for n, p in sel.named_trainable().items()})
        log.info("finetuning stage %s: %d parameters (%.2f%% of the denoiser) in %d layers: %s", stage.name,
                 summary["params"], 100 * summary["fraction"], summary["layers_trained"],
                 ", ".join(f"{k} {v}" for k, v in summary["params_by_kind"].items()))
        extra = build_extra_losses(stage.settings["extra_losses"], quantizable_layers(denoiser, family), ROLES,
                                   denoiser)
        state_dir = root / stage.name if len(stages) > 1 else root
        try:
            with partial_quant(denoiser, stage.quantized, stage.acts):
                stats = train(denoiser, sel, data, stage.settings, extra=extra, device=device, dtype=dtype,
                              state_dir=state_dir)
        finally:
            for e in extra:
                e.remove()
            sel.finish(release_teacher=last)
        results.append({"name": stage.name, **summary, **stats, "lr": stage.settings["optim"]["lr"],
                        "act_scale_lr": stage.settings["optim"]["act_scale_lr"],
                        "extra_losses": stage.settings["extra_losses"]})
    layers: dict[str, list[str]] = {}
    for r in results:
        for n, kinds in r["layers"].items():
            layers.setdefault(n, [])
            layers[n] += [k for k in kinds if k not in layers[n]]
    params = sum(n for _, n in trained.values())
    merged = {
        "recipe": ft["recipe"], "layers": layers, "layers_trained": len(layers), "params": params,
        "params_by_kind": {k: sum(n for kind, n in trained.values() if kind == k)
                           for k in dict.fromkeys(kind for kind, _ in trained.values())},
        "fraction": params / max(1, total), "teacher_copy_mb": max(r["teacher_copy_mb"] for r in results),
        "steps": sum(r["steps"] for r in results), "resumed_from": sum(r["resumed_from"] for r in results),
        "wall_s": round(sum(r["wall_s"] for r in results), 2), "processes": results[0]["processes"],
        "peak_memory_mb": max(r["peak_memory_mb"] for r in results), "peak_memory_kind": results[0]["peak_memory_kind"],
        "train_state_mb": max(r["train_state_mb"] for r in results),
        "loss_start": results[0]["loss_start"], "loss_end": results[-1]["loss_end"],
        "loss_curve": [x for r in results for x in r["loss_curve"]],
    }
    return {**merged, **info, "stages": results if len(stages) > 1 else None,
            "data": {"source": d["source"], "prompts": len(prompts), "pool": str(folder)}, "checkpoint": str(root)}
