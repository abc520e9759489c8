"""Finetuning as a stage of a job: check the settings early, build the data (training trajectories
and held-out validation ones), run the recipe's stages (each: select what trains, train resuming from
the cache and keep its best or last state, undo the training set-up) so the model evaluates and
exports like any quantized model."""
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
from diffq.finetune.data import DATA_SOURCES, Pool, TrainingData, image_data_inputs
from diffq.finetune.engine import KEEP, check_optim, eval_interval, train
from diffq.finetune.lora import check_lora
from diffq.finetune.losses import EXTRA_LOSSES, build_extra_losses
from diffq.finetune.recipes import RECIPES, RecipeContext, Stage
from diffq.finetune.select import WEIGHT_SCALE_MODES, select_trainable
from diffq.finetune.sensitivity import activation_sensitivity
from diffq.model_quant import float_mode, partial_quant
from diffq.models import Sampling, denoiser_of
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import LayerSpec
from diffq.tensor_quant import TensorQuant
from diffq.worlds import get_world, is_world, world_names

log = logging.getLogger(__name__)

PROMPT_SOURCES = ("calib", "world", "file", "auto")


def enabled(ft: Mapping[str, Any]) -> bool:
    """Whether the job finetunes (``finetune.steps > 0``)."""
    return int(ft["steps"]) > 0


def check_finetune(ft: Mapping[str, Any], *, load: bool, keep_fp_weights: bool, world: str | None) -> None:
    """ConfigError for finetuning settings that cannot work, before any model loads."""
    steps = int(ft["steps"])
    if steps < 0:
        raise ConfigError(f"finetune.steps must be >= 0 (got {steps}): 0 skips finetuning (or finetune=none), a "
                          "positive count trains that many steps")
    if steps == 0:
        if ft.get("name", "none") != "none":
            log.info("finetune=%s with finetune.steps=0: finetuning is skipped (the PTQ model is evaluated)",
                     ft["name"])
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
    if (d["source"] == "images" or d["prompts"] == "world") and not is_world(world):
        raise ConfigError("finetune.data: the world's captions and images exist for the testbed models only "
                          f"(model.world set to a registered world: {', '.join(world_names())}); "
                          "use finetune.data.prompts=calib or file and a data-free source")
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
    check_lora(ft["lora"])
    check_validation(ft)
    RECIPES.get(ft["recipe"])().check(ft)


def check_validation(ft: Mapping[str, Any]) -> None:
    """ConfigError for validation settings that cannot work (``eval_every``, ``keep``, ``data.val_prompts``)."""
    every, steps = ft["eval_every"], int(ft["steps"])
    if ft["keep"] not in KEEP:
        raise ConfigError(f"unknown finetune.keep {ft['keep']!r}: use best (the lowest validation loss) or last")
    if every is not None and every < 0:
        raise ConfigError(f"finetune.eval_every must be >= 0 (got {every}): 0 turns validation off, null validates "
                          "every steps/10 steps")
    if every is not None and every > steps:
        raise ConfigError(f"finetune.eval_every={every} is more than finetune.steps={steps}: lower it (or null: "
                          "every steps/10 steps)")
    if ft["keep"] == "best" and every == 0:
        raise ConfigError("finetune.keep=best picks the state with the lowest validation loss, but eval_every=0 "
                          "turns validation off: set keep=last or eval_every>0")
    if every != 0 and ft["data"]["val_prompts"] < 1:
        raise ConfigError(f"finetune.data.val_prompts must be at least 1 while validating (got "
                          f"{ft['data']['val_prompts']}): raise it, or set eval_every=0 and keep=last")


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
    return "world" if is_world(world) else "file" if d["prompts_file"] else "calib"


def training_prompts(ft: Mapping[str, Any], calib_prompts: Sequence[str], world: str | None = None
                     ) -> tuple[list[str], Any]:
    """The prompts whose teacher trajectories make the training data (and the world's images for
    them with ``prompts=world``)."""
    d = ft["data"]
    n = int(d["num_prompts"])
    source = prompt_source(d, world)
    if source == "world" or d["source"] == "images":
        return get_world(str(world)).training_examples(n, int(d["seed"]))
    given = list(calib_prompts) if source == "calib" else None
    return calibration.calibration_prompts(given or [], d["prompts_file"] if given is None else None, n), None


def validation_prompts(ft: Mapping[str, Any], calib_prompts: Sequence[str], train: Sequence[str],
                       world: str | None = None) -> list[str]:
    """The held-out prompts of the validation trajectories (``finetune.data.val_prompts`` of them):
    the world's captions drawn with ``val_seed``, those that are training captions dropped (unless
    none would be left); else the prompt list cycled on past the training prompts (a short list
    repeats them: then only the seeds are held out)."""
    d = ft["data"]
    n = int(d["val_prompts"])
    if prompt_source(d, world) == "world" or d["source"] == "images":
        captions = get_world(str(world)).training_examples(n, int(d["val_seed"])).captions
        seen = set(train)
        return [c for c in captions if c not in seen] or captions
    given = list(calib_prompts) if prompt_source(d, world) == "calib" else None
    cycled = calibration.calibration_prompts(given or [], d["prompts_file"] if given is None else None,
                                             int(d["num_prompts"]) + n)
    return cycled[-n:]


def teacher_data(pipe: Any, family: str, ft: Mapping[str, Any], calib_prompts: Sequence[str], smp: Sampling,
                 model_key: dict[str, Any], cache_dir: str, world: str | None = None
                 ) -> tuple[TrainingData, Pool | None, dict[str, Any]]:
    """The training data (the FP teacher's trajectories over the training prompts, as the data source
    serves them), the held-out validation pool (None when not validating) and what they are."""
    _, denoiser = denoiser_of(pipe)
    d = ft["data"]
    prompts, images = training_prompts(ft, calib_prompts, world)
    validating = eval_interval(ft["eval_every"], int(ft["steps"])) > 0
    val_prompts = validation_prompts(ft, calib_prompts, prompts, world) if validating else []

    def pool(texts: Sequence[str], seed: int) -> Path:
        with torch.no_grad(), float_mode(denoiser):  # the teacher's data: the FP model's own trajectories
            return calibration.training_pool(
                pipe, family, model_key=model_key, prompts=texts, seed=seed, cache_dir=cache_dir,
                **smp.sampler_kwargs(steps=int(d["steps"] or smp.steps), batch_size=int(d["batch_size"])))

    folder = pool(prompts, int(d["seed"]))
    val_folder = pool(val_prompts, int(d["val_seed"])) if validating else None
    val = Pool(val_folder) if val_folder is not None else None
    if val is not None:
        log.info("finetuning validation: %d held-out prompts (seed %d), %d teacher calls in %s", len(val_prompts),
                 int(d["val_seed"]), len(val.items), val_folder)
    extra_inputs = image_data_inputs(pipe, family, images) if d["source"] == "images" else {}
    data = DATA_SOURCES.get(d["source"])(Pool(folder), **extra_inputs)
    return data, val, {"source": d["source"], "prompts": len(prompts), "pool": str(folder),
                       "val_prompts": len(val_prompts), "val_pool": None if val_folder is None else str(val_folder)}


def run_stage(denoiser: nn.Module, family: str, stage: Stage, ft: Mapping[str, Any], data: TrainingData,
              val: Pool | None, teacher: dict, *, last: bool, state_dir: Path,
              device: torch.device) -> tuple[dict[str, Any], dict[str, tuple[str, int]], int]:
    """Train one recipe stage (select, train resuming from ``state_dir``, undo the set-up); its result
    for metrics.json, ``{trained parameter: (kind, size)}`` and the denoiser's parameter count while it trained."""
    sel = select_trainable(denoiser, stage.plan, int(ft["lora"]["rank"]), float(ft["lora"]["alpha"]),
                           int(ft["seed"]), teacher=teacher, weight_scale=stage.settings["weight_scale"],
                           lora_mode=ft["lora"]["mode"])
    total = sum(p.numel() for p in denoiser.parameters())  # learned step sizes are parameters now
    summary = sel.summary(total)
    kind_of = {id(p): kind for kind, ps in sel.groups.items() for p in ps}
    trained = {n: (kind_of[id(p)], p.numel()) for n, p in sel.named_trainable().items()}
    log.info("finetuning stage %s: %d parameters (%.2f%% of the denoiser) in %d layers: %s", stage.name,
             summary["params"], 100 * summary["fraction"], summary["layers_trained"],
             ", ".join(f"{k} {v}" for k, v in summary["params_by_kind"].items()))
    extra = build_extra_losses(stage.settings["extra_losses"], quantizable_layers(denoiser, family), ROLES, denoiser)
    try:
        with partial_quant(denoiser, stage.quantized, stage.acts):
            stats = train(denoiser, sel, data, stage.settings, extra=extra, device=device,
                          dtype=next(denoiser.parameters()).dtype, state_dir=state_dir, val=val)
    finally:
        for e in extra:
            e.remove()
        sel.finish(release_teacher=last)
    moved, held = sel.codes_moved
    if held:
        stats["codes_moved"] = moved / held
        log.info("finetuning stage %s: %d of %d weights under a held learned rounding changed their code (%.3f%%)",
                 stage.name, moved, held, 100 * moved / held)
    if stats["best_step"] is not None:
        kept = "kept" if stats["keep"] == "best" else f"the last state kept: {stats['val_curve'][-1][1]:.6g}"
        log.info("finetuning stage %s: best validation loss %.6g at step %d of %d (%s)", stage.name,
                 stats["best_val_loss"], stats["best_step"], stats["steps"], kept)
    return {"name": stage.name, **summary, **stats, "lr": stage.settings["optim"]["lr"],
            "act_scale_lr": stage.settings["optim"]["act_scale_lr"],
            "extra_losses": stage.settings["extra_losses"]}, trained, total


def merge_stages(results: Sequence[Mapping[str, Any]], trained: Mapping[str, tuple[str, int]], total: int,
                 recipe: str) -> dict[str, Any]:
    """The stages' results summed: what trained in any stage, the curves end to end (step numbers from
    the first stage's start), times and memory, the last stage's validation outcome."""
    layers: dict[str, list[str]] = {}
    for r in results:
        for n, kinds in r["layers"].items():
            layers.setdefault(n, [])
            layers[n] += [k for k in kinds if k not in layers[n]]
    params = sum(n for _, n in trained.values())
    offsets = [sum(r["steps"] for r in results[:i]) for i in range(len(results))]
    final = results[-1]
    return {
        "recipe": recipe, "layers": layers, "layers_trained": len(layers), "params": params,
        "params_by_kind": {k: sum(n for kind, n in trained.values() if kind == k)
                           for k in dict.fromkeys(kind for kind, _ in trained.values())},
        "fraction": params / max(1, total), "teacher_copy_mb": max(r["teacher_copy_mb"] for r in results),
        "steps": sum(r["steps"] for r in results), "resumed_from": sum(r["resumed_from"] for r in results),
        "wall_s": round(sum(r["wall_s"] for r in results), 2), "processes": results[0]["processes"],
        "peak_memory_mb": max(r["peak_memory_mb"] for r in results), "peak_memory_kind": results[0]["peak_memory_kind"],
        "train_state_mb": max(r["train_state_mb"] for r in results),
        "loss_start": results[0]["loss_start"], "loss_end": results[-1]["loss_end"],
        "loss_curve": [x for r in results for x in r["loss_curve"]],
        "lr_curve": [x for r in results for x in r["lr_curve"]],
        "val_curve": [[o + s, v] for r, o in zip(results, offsets) for s, v in r["val_curve"]],
        "probes": [{**p, "step": o + p["step"]} for r, o in zip(results, offsets) for p in r["probes"]],
        "best_step": None if final["best_step"] is None else offsets[-1] + final["best_step"],
        "best_val_loss": final["best_val_loss"], "keep": final["keep"], "eval_every": final["eval_every"],
        "val_items": final["val_items"], "val_s": round(sum(r["val_s"] for r in results), 2),
    }


def finetune_denoiser(pipe: Any, family: str, specs: Sequence[LayerSpec], ft: Mapping[str, Any],
                      attn: Mapping[str, Any], *, calib: Sequence[CalibSample], calib_prompts: Sequence[str],
                      smp: Sampling, model_key: dict[str, Any], cache_dir: str, state_key: Mapping[str, Any],
                      device: torch.device, world: str | None = None) -> dict[str, Any]:
    """Train the quantized denoiser of ``pipe`` against its FP self as ``ft`` says, stage by stage
    (``calib`` feeds recipes that measure the quantized model); returns the facts for metrics.json
    (what trained, the loss and validation curves, the best states, time, memory), the stages' summed
    and each one's; step numbers at the top level count from the first stage's start."""
    _, denoiser = denoiser_of(pipe)
    dtype = next(denoiser.parameters()).dtype
    data, val, data_info = teacher_data(pipe, family, ft, calib_prompts, smp, model_key, cache_dir, world)

    def measure(names: Sequence[str], bits: Sequence[int], calls: int) -> dict[str, dict[int, float]]:
        return activation_sensitivity(denoiser, specs, names, bits, calib[:calls], device, dtype)

    stages, info = plan_stages(denoiser, family, specs, ft, attn, measure)
    root = Path(cache_dir).expanduser() / "finetune" / cache_key(dict(state_key))
    teacher: dict = {}
    results, trained = [], {}
    for i, stage in enumerate(stages):
        result, params, total = run_stage(denoiser, family, stage, ft, data, val, teacher, last=i == len(stages) - 1,
                                   state_dir=root / stage.name if len(stages) > 1 else root, device=device)
        results.append(result)
        trained.update(params)
    merged = merge_stages(results, trained, total, ft["recipe"])
    return {**merged, **info, "stages": results if len(stages) > 1 else None, "data": data_info,
            "checkpoint": str(root)}
