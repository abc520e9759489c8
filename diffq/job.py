"""One diffq job, a chain of stages: check the config -> load the pipeline -> FP samples -> quantize
(or load an export) -> finetune -> quantized samples -> cost -> evaluate -> write the artifacts.

Every check that needs no model runs before the pipeline loads, and the ones that need the
denoiser (rules, vocabulary) run before the first image is generated.
"""
from __future__ import annotations

import contextlib
import json
import logging
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffq import calib as calibration
from diffq.api import apply_quantization, plan_rules, resolve_layer_specs
from diffq.cache import cache_key, cache_lock
from diffq.calib.select import step_histogram
from diffq.distributed import Shard, current_shard, process_state, wait_for_everyone
from diffq.errors import ConfigError
from diffq.eval.cost import LayerCounter, activation_bits, operations, resident_mb, weight_bits
from diffq.eval.geneval import balanced_entries, load_metadata
from diffq.eval.grids import image_grid, spread_indices
from diffq.eval.samples import SampleFolder, generate_samples
from diffq.eval.suite import check_eval, check_geneval_classes, evaluate, split_per_image
from diffq.export import CODECS, export_quantized, load_quantized, packable_layers, read_metadata
from diffq.finetune.lora import describe_side_branches
from diffq.finetune.stage import check_finetune, finetune_denoiser, plan_stages
from diffq.finetune.stage import enabled as finetune_enabled
from diffq.methods import MethodContext, get_method, get_recon_mode
from diffq.models import (
    Sampling,
    denoiser_of,
    generate_images,
    load_pipeline,
    model_key,
    sample_seeds,
    sampling_of,
    unknown_words,
)
from diffq.spec import LayerSpec, TensorQuant, format_spec_table, validate_quant_args
from diffq.sweep.rows import bits_label, method_label
from diffq.worlds import get_world, is_world

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the quantized model is: its preset name and attention-matmul settings (the config's, or
    the checkpoint's with ``load=``) and, with ``load=``, the checkpoint's metadata."""

    name: str
    method: str
    attn: dict[str, Any]
    checkpoint: dict[str, Any] | None = None


@dataclass
class EvalSet:
    """The evaluation images to generate: metadata entries (a prompt repeated to balance GenEval
    tasks is an entry per repeat), ``images_per_prompt`` each, and the flat (entry-major) prompt
    and seed lists."""

    entries: list[dict[str, Any]]
    geneval: list[dict[str, Any]] | None
    images_per_prompt: int
    prompts: list[str]
    seeds: list[int]


@dataclass
class Samples:
    """One side's evaluation images on disk and how many of them this run generated."""

    folder: SampleFolder
    generated: int


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one job and write its artifacts into ``out_dir``; returns the metrics dict."""
    timings: dict[str, float] = {}
    check_config(cfg)
    plan = plan_of(cfg)
    evalset = eval_set(cfg)
    calib_prompts = calibration_prompts_of(cfg)
    shard = current_shard()
    out_dir = prepare_out_dir(cfg, out_dir, shard)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    with timed(timings, "load_s"):
        pipe = load_model(cfg, device)
    denoiser_name, denoiser = denoiser_of(pipe)
    specs = layer_specs(cfg, denoiser, plan)
    if finetunes(cfg):  # every stage must select something: fail before calibration
        plan_stages(denoiser, cfg.model.family, specs, ft_settings(cfg), plan.attn)
    if cfg.model.vocabulary_check:
        check_vocabulary(pipe, [*evalset.prompts, *calib_prompts])
    smp = sampling_of(cfg)
    setting = sample_setting(cfg, evalset, smp)
    with timed(timings, "sampling_fp_s"):
        fp = fp_samples(pipe, cfg, evalset, setting, smp, shard)
    with timed(timings, "calibration_s"):
        if cfg.load:
            calib_info, calib = load_export(cfg.load, denoiser, cfg.packed), []
        else:
            calib_info, calib = quantize(pipe, denoiser, specs, cfg, calib_prompts, smp, device, timings, out_dir)
    finetuned = None
    if finetunes(cfg):
        with timed(timings, "finetune_s"):
            finetuned = finetune(pipe, specs, plan, cfg, calib, calib_prompts, smp, device)
    if shard.is_main:
        (out_dir / "spec.txt").write_text(spec_text(specs, plan.attn, finetuned) + describe_side_branches(denoiser))
        if finetuned is not None:
            loss_plot(finetuned, out_dir / "finetune_loss.png")
    quant, counter = quantized_samples(pipe, denoiser, specs, cfg, plan, evalset, setting, smp, shard, out_dir,
                                            timings)
    if not shard.is_main:
        return {"status": "worker", "shard": shard.rank}
    fp_images, q_images = fp.folder.load(), quant.folder.load()
    cost = cost_of(denoiser, specs, counter.counts, counter.macs)
    suite = evaluate(cfg.eval, fp_images, q_images, evalset.prompts, evalset.geneval, cfg.paths.cache_dir, device,
                     fp_key=cache_key(setting))
    metrics: dict[str, Any] = {
        "status": "ok",
        "model": cfg.model.name,
        "quant": plan.name,
        "label": run_label(cfg, plan),
        "method": plan.method,
        "attn": plan.attn,
        "denoiser": f"{denoiser_name}:{type(denoiser).__name__.removeprefix('Quant')}",
        "metrics": suite,
        "fidelity": split_per_image(suite),
        "cost": cost,
        "time": {k: round(v, 3) for k, v in timings.items()},
        "calib": {**calib_info, "fp_images_cache_hit": fp.generated == 0},
        "finetune": finetuned,
        "samples": {"fp": str(fp.folder.root), "quant": str(quant.folder.root), "generated_fp": fp.generated,
                    "generated_quant": quant.generated, "processes": shard.world},
        "prompts": evalset.prompts,
        "seeds": evalset.seeds,
    }
    write_artifacts(cfg, out_dir, plan, denoiser, specs, evalset, fp_images, q_images, metrics)
    return metrics


# ----------------------------------------------------------------------------- checks, before any model loads


def check_config(cfg: DictConfig) -> None:
    """ConfigError for every setting that is wrong on its own (formats, method, reconstruction,
    calibration selection, attention formats, metrics), before anything loads or runs."""
    q = cfg.quant
    validate_quant_args(q.weight, q.act)
    get_method(q.method)
    check_recon(cfg)
    calibration.check_selection(cfg.calib.selection)
    check_timestep_coverage(cfg)
    check_attn(q.attn)
    check_eval(cfg.eval)
    check_finetune(ft_settings(cfg), load=bool(cfg.load), keep_fp_weights=q.keep_fp_weights, world=cfg.model.world)
    plan_rules(OmegaConf.to_container(q, resolve=True))
    if cfg.export_codec:
        CODECS.get(cfg.export_codec)
    if cfg.packed and not cfg.load:
        raise ConfigError("packed=true keeps a loaded export's weights packed: add load=<exported model folder>")
    if cfg.packed and not packable_layers(read_metadata(cfg.load)):
        raise ConfigError(f"packed=true keeps sub-byte weights packed (formats under 8 bits: INT2-INT4, FP4, ternary, "
                          f"binary), but {cfg.load} stores every layer at 8 bits or more, so nothing would pack: drop "
                          "packed=true")


def calib_sampler_steps(cfg: DictConfig) -> int:
    """Sampler steps of the calibration trajectories: ``calib.steps``, else the sampler's."""
    return int(cfg.calib.steps or sampling_of(cfg).steps)


def check_timestep_coverage(cfg: DictConfig) -> None:
    """ConfigError when calibration keeps too few sampler steps for ``quant.act``'s timestep groups."""
    calibration.check_timestep_coverage(cfg.quant.act, cfg.calib, calib_sampler_steps(cfg))


def check_recon(cfg: DictConfig) -> None:
    """ConfigError, before anything runs, for a reconstruction that cannot run as configured."""
    q = cfg.quant
    if q.recon == "none":
        return
    get_recon_mode(q.recon)
    if cfg.load:
        raise ConfigError("quant.recon applies when quantizing, not to a loaded export: drop load= or quant.recon")
    if not q.keep_fp_weights:
        raise ConfigError("reconstruction needs the FP weights next to the quantized ones: "
                          "set quant.keep_fp_weights=true")


def check_attn(attn: Mapping[str, Any]) -> None:
    """ConfigError naming ``quant.attn.qkv`` / ``quant.attn.softmax`` when attention quantization
    is on and one of its formats cannot be built."""
    if not attn.get("enabled"):
        return
    for key in ("qkv", "softmax"):
        where = f"quant.attn.{key}"
        tq = TensorQuant.from_mapping(attn[key], where)
        try:
            tq.build_format()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e


def plan_of(cfg: DictConfig) -> Plan:
    """The config's preset, or with ``load=`` the checkpoint's (CheckpointError when it is missing or
    not a diffq export)."""
    if not cfg.load:
        return Plan(cfg.quant.name, cfg.quant.method, OmegaConf.to_container(cfg.quant.attn, resolve=True))
    meta = read_metadata(cfg.load)
    extra = meta["extra"]
    return Plan(extra.get("quant", "unknown"), extra.get("method", "unknown"), meta["attn"] or {"enabled": False},
                meta)


def geneval_entries(cfg: DictConfig) -> list[dict[str, Any]] | None:
    """The GenEval metadata entries the evaluation uses, if any: every ``stride``-th entry, then
    with ``images_per_task`` the same number of images for every task."""
    g = cfg.eval.geneval
    if not g.metadata:
        return None
    entries = get_world(g.metadata).evaluation_metadata() if is_world(g.metadata) else load_metadata(g.metadata)
    entries = entries[:: max(1, g.stride)]
    if g.images_per_task is None:
        return entries
    return balanced_entries(entries, g.images_per_task, cfg.eval.images_per_prompt)


def sample_entries(cfg: DictConfig, entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One metadata entry per evaluation prompt: the GenEval entries, else ``{"prompt": p}`` for the
    model's own prompts (e.g. class labels), else for ``eval.prompts``."""
    if entries:
        return entries
    return [{"prompt": p} for p in (list(cfg.model.prompts) or list(cfg.eval.prompts))]


def eval_set(cfg: DictConfig) -> EvalSet:
    """The evaluation prompts and seeds (ConfigError when the GenEval detector lacks a class)."""
    geneval = geneval_entries(cfg)
    check_geneval_classes(cfg.eval, geneval)
    entries = sample_entries(cfg, geneval)
    k = cfg.eval.images_per_prompt
    prompts = [e["prompt"] for e in entries for _ in range(k)]
    return EvalSet(entries, geneval, k, prompts, sample_seeds(cfg.eval.seed, len(prompts)))


def calibration_prompts_of(cfg: DictConfig) -> list[str]:
    """The calibration prompts: the model's own prompts, else ``calib.prompts`` / ``calib.prompts_file``."""
    return calibration.calibration_prompts(
        list(cfg.model.prompts) or list(cfg.calib.prompts), cfg.calib.prompts_file, cfg.calib.num_prompts
    )


# ----------------------------------------------------------------------------- set-up


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Record the block's wall time in seconds as ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


def resolve_device(name: str) -> torch.device:
    """``auto`` picks this process's accelerator under ``accelerate launch``, else CUDA when
    available, else CPU."""
    if name == "auto":
        state = process_state()
        if state.num_processes > 1:
            return state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shared_out_dir(out_dir: Path) -> Path:
    """The main process's output folder, for every process of an ``accelerate launch`` (each one's
    Hydra may have stamped its own)."""
    from accelerate.utils import broadcast_object_list

    return Path(broadcast_object_list([str(out_dir)])[0])


def prepare_out_dir(cfg: DictConfig, out_dir: Path, shard: Shard) -> Path:
    """The job's output folder (the main process's one for every process), with ``config.yaml``."""
    if shard.world > 1:
        out_dir = shared_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard.is_main:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return out_dir


def swap_scheduler(pipe: Any, name: str | None) -> None:
    """Replace the pipeline's scheduler by the diffusers class ``name`` (same config)."""
    if not name:
        return
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ConfigError(f"unknown scheduler {name!r}: use a diffusers scheduler class name, e.g. DDIMScheduler")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def load_model(cfg: DictConfig, device: torch.device) -> Any:
    """The FP pipeline on ``device``, with the configured sampler scheduler."""
    pipe = load_pipeline(cfg.model, device=device)
    swap_scheduler(pipe, cfg.sampler.scheduler)
    return pipe


def layer_specs(cfg: DictConfig, denoiser: nn.Module, plan: Plan) -> list[LayerSpec]:
    """Each layer's quantization: the checkpoint's with ``load=``, else the config's rules resolved on
    the denoiser (ConfigError for an impossible rule)."""
    if plan.checkpoint is not None:
        return [LayerSpec.from_dict(d) for d in plan.checkpoint["specs"]]
    return resolve_layer_specs(denoiser, cfg.model.family, OmegaConf.to_container(cfg.quant, resolve=True))


def check_vocabulary(pipe: Any, prompts: list[str]) -> None:
    """ConfigError when a prompt has words the pipeline's word-level tokenizers do not know."""
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        bad = unknown_words(tok, prompts) if tok is not None and tok.unk_token_id is not None else {}
        if bad:
            prompt, words = next(iter(bad.items()))
            vocab = sorted(w for w in tok.get_vocab() if w.isalpha())
            raise ConfigError(
                f"prompt {prompt!r} uses words outside the model's vocabulary {words} ({len(bad)} prompts do); "
                f"rephrase it with the words this model knows: {' '.join(vocab)}"
            )


# ----------------------------------------------------------------------------- sampling


def sample_setting(cfg: DictConfig, evalset: EvalSet, smp: Sampling) -> dict[str, Any]:
    """What determines the FP model's evaluation images (the key of their cached folder)."""
    return {"model": model_key(cfg), "entries": cache_key({"entries": evalset.entries}),
            "images_per_prompt": evalset.images_per_prompt, "seeds": cache_key({"seeds": evalset.seeds}),
            "steps": smp.steps, "guidance": smp.guidance, "res": smp.resolution, "kw": smp.call_kwargs}


def make_samples(pipe: Any, cfg: DictConfig, folder: SampleFolder, seeds: list[int], smp: Sampling, shard: Shard,
                 desc: str, shared: bool = False) -> Samples:
    """Generate what is missing of ``folder`` (this process's shard); a ``shared`` folder (the FP cache)
    is generated by one job at a time: a parallel job of the sweep waits, then finds it done."""
    lock = cache_lock(folder.root.with_name(f"{folder.root.name}.shard{shard.rank}"), f"{desc} (shard {shard.rank})") \
        if shared else contextlib.nullcontext()
    with lock:  # released before the barrier: another job's other ranks may hold the other shards' locks
        made = generate_samples(pipe, cfg.model.family, folder, seeds, shard=shard, batch_size=smp.batch_size,
                                desc=desc, steps=smp.steps, guidance=smp.guidance, resolution=smp.resolution,
                                call_kwargs=smp.call_kwargs)
    wait_for_everyone()
    return Samples(folder, made)


def fp_samples(pipe: Any, cfg: DictConfig, evalset: EvalSet, setting: dict[str, Any], smp: Sampling,
               shard: Shard) -> Samples:
    """The FP model's evaluation images, in the shared cache (``<cache_dir>/fp_samples/<key>``)."""
    root = Path(cfg.paths.cache_dir).expanduser() / "fp_samples" / cache_key(setting)
    folder = SampleFolder(root, evalset.entries, evalset.images_per_prompt, setting)
    return make_samples(pipe, cfg, folder, evalset.seeds, smp, shard, "FP samples", shared=True)


def quantized_samples(pipe: Any, denoiser: nn.Module, specs: list[LayerSpec], cfg: DictConfig, plan: Plan,
                      evalset: EvalSet, setting: dict[str, Any], smp: Sampling, shard: Shard, out_dir: Path,
                      timings: dict[str, float]) -> tuple[Samples, LayerCounter]:
    """The quantized model's evaluation images (``<out_dir>/samples``) and the input elements and
    multiply-accumulates of each layer in one denoiser call (for the activation-bits and OPs cost)."""
    counter = LayerCounter(denoiser, [s.name for s in specs])
    q_setting = {**setting, "quant": OmegaConf.to_container(cfg.quant, resolve=True), "load": cfg.load,
                 "calib": OmegaConf.to_container(cfg.calib, resolve=True),
                 **({"finetune": ft_settings(cfg)} if finetunes(cfg) else {})}
    folder = SampleFolder(out_dir / "samples", evalset.entries, evalset.images_per_prompt, q_setting)
    with timed(timings, "sampling_quant_s"):
        samples = make_samples(pipe, cfg, folder, evalset.seeds, smp, shard, f"{plan.name} samples")
    if not counter.counts:  # every image was already on disk: count one denoiser call's inputs
        count_one_call(pipe, cfg, smp, evalset.prompts[0], evalset.seeds[0])
    counter.remove()
    return samples, counter


def count_one_call(pipe: Any, cfg: DictConfig, smp: Sampling, prompt: str, seed: int) -> None:
    """Run the sampler briefly on one prompt so input-element counters see a denoiser call."""
    generate_images(pipe, cfg.model.family, [prompt], [seed], steps=2, guidance=smp.guidance,
                    resolution=smp.resolution, batch_size=1, call_kwargs=smp.call_kwargs, progress=False)


# ----------------------------------------------------------------------------- quantize or load


def quantize(pipe: Any, denoiser: nn.Module, specs: list[LayerSpec], cfg: DictConfig, calib_prompts: list[str],
             smp: Sampling, device: torch.device, timings: dict[str, float],
             out_dir: Path) -> tuple[dict[str, Any], list[calibration.CalibSample]]:
    """Capture (or load from the cache) the calibration set, then quantize the denoiser in place with
    ``quant.method`` and any reconstruction; returns the calibration facts for metrics.json and the
    calibration set."""
    q = cfg.quant
    dtype = next(denoiser.parameters()).dtype
    with timed(timings, "calib_capture_s"):
        samples, calib_hit = calibration.load_or_capture(
            pipe, cfg.model.family, model_key=model_key(cfg), prompts=calib_prompts, seed=cfg.calib.seed,
            steps=calib_sampler_steps(cfg), guidance=smp.guidance, resolution=smp.resolution,
            keep_steps=min(int(cfg.calib.num_steps), calib_sampler_steps(cfg)), batch_size=cfg.calib.batch_size,
            call_kwargs=smp.call_kwargs,
            cache_dir=cfg.paths.cache_dir if cfg.calib.cache else None, selection=cfg.calib.selection,
            num_samples=cfg.calib.num_samples, edadm=OmegaConf.to_container(cfg.calib.edadm, resolve=True),
        )
    with timed(timings, "quantize_s"):
        context = MethodContext(pipe, cfg.model.family, smp, calib_prompts, model_key(cfg), cfg.paths.cache_dir,
                                cfg.seed, out_dir)
        stats = apply_quantization(denoiser, specs, samples, OmegaConf.to_container(q, resolve=True),
                                   OmegaConf.to_container(cfg.recon, resolve=True), context, device=device,
                                   dtype=dtype)
    hist = step_histogram(samples, max(s.step for s in samples) + 1)
    log.info("calibration set (%s): denoiser input rows per sampler call: %s", cfg.calib.selection,
             " ".join(map(str, hist)))
    return {"samples": len(samples), "selection": cfg.calib.selection, "cache_hit": calib_hit, "steps": hist,
            **stats}, samples


def ft_settings(cfg: DictConfig) -> dict[str, Any]:
    """The finetuning settings as a plain dict."""
    return OmegaConf.to_container(cfg.finetune, resolve=True)


def finetunes(cfg: DictConfig) -> bool:
    """Whether this job finetunes the quantized model (never with ``load=``)."""
    return finetune_enabled(cfg.finetune) and not cfg.load


def finetune(pipe: Any, specs: list[LayerSpec], plan: Plan, cfg: DictConfig, calib: list[calibration.CalibSample],
             calib_prompts: list[str], smp: Sampling, device: torch.device) -> dict[str, Any]:
    """Finetune the quantized denoiser against its FP self; its state is cached under a key of
    everything that determines it, so rerunning the command resumes (or reuses) the training."""
    state_key = {"model": model_key(cfg), "quant": OmegaConf.to_container(cfg.quant, resolve=True),
                 "recon": OmegaConf.to_container(cfg.recon, resolve=True) if cfg.quant.recon != "none" else None,
                 "calib": OmegaConf.to_container(cfg.calib, resolve=True), "seed": cfg.seed,
                 "finetune": {k: v for k, v in ft_settings(cfg).items() if k not in ("checkpoint_every", "resume")}}
    stats = finetune_denoiser(pipe, cfg.model.family, specs, ft_settings(cfg), plan.attn, calib=calib,
                              calib_prompts=calib_prompts, smp=smp, model_key=model_key(cfg),
                              cache_dir=cfg.paths.cache_dir, state_key=state_key, device=device,
                              world=cfg.model.world)
    return {"name": cfg.finetune.name, **stats}


def load_export(path: str, denoiser: nn.Module, packed: bool = False) -> dict[str, Any]:
    """Load an exported quantized checkpoint into the denoiser (``packed``: sub-byte weights stay
    packed in memory); returns where it came from and how many layers stay packed."""
    load_quantized(path, denoiser, packed=packed)
    layers = len(packable_layers(read_metadata(path))) if packed else 0
    if packed:
        log.info("packed=true: %d layers stay packed in memory, the others are stored at 8 bits", layers)
    return {"loaded_from": str(path), "packed": layers > 0, "packed_layers": layers}


# ----------------------------------------------------------------------------- results


def spec_text(specs: list[LayerSpec], attn: Mapping[str, Any], finetuned: Mapping[str, Any] | None = None) -> str:
    """spec.txt: the per-layer table, then the attention-matmul formats when they are quantized,
    then what finetuning trained."""
    text = format_spec_table(specs)
    if attn.get("enabled"):
        text += (f"attention matmuls: q/k/v {_describe(attn['qkv'])}, "
                 f"softmax output {_describe(attn['softmax'])}\n")
    if finetuned:
        text += (f"\nfinetuned: {finetuned['params']} parameters ({100 * finetuned['fraction']:.2f}% of the denoiser) "
                 f"in {finetuned['layers_trained']} layers/modules, {finetuned['steps']} steps\n")
        for stage in finetuned["stages"] or [finetuned]:
            if finetuned["stages"]:
                text += (f" stage {stage['name']}: {stage['steps']} steps, lr {stage['lr']:g}, step-size lr "
                         f"{stage['act_scale_lr']:g}, {stage['params']} parameters\n")
            text += f"  {_validation_note(stage)}\n"
            width = max(len(n) for n in stage["layers"])
            text += "".join(f"  {n.ljust(width)}  {' '.join(k)}\n" for n, k in stage["layers"].items())
    return text


def _validation_note(stage: Mapping[str, Any]) -> str:
    """A stage's validation in one line: the best step and loss and which state was kept."""
    if not stage["val_curve"]:
        return "validation: off (the last state kept)"
    steps = {s for s, _ in stage["val_curve"]}
    kept = "kept" if stage["keep"] == "best" else f"the last state kept, val loss {stage['val_curve'][-1][1]:.4g}"
    return (f"validation: best val loss {stage['best_val_loss']:.4g} at step {stage['best_step']} of {stage['steps']} "
            f"({kept}; {len(steps)} validations on {stage['val_items']} held-out items)")


def _describe(args: Mapping[str, Any]) -> str:
    return TensorQuant.from_mapping(args, "quant.attn").describe()


def cost_of(denoiser: nn.Module, specs: list[LayerSpec], input_counts: dict[str, int],
            macs: dict[str, int]) -> dict[str, Any]:
    """Effective weight/activation bits, model sizes, operations and how many layers are quantized."""
    cost = weight_bits(denoiser)
    cost["effective_act_bits"] = activation_bits(denoiser, input_counts, specs)
    cost.update(operations(denoiser, macs, specs))
    cost["resident_mb"] = resident_mb(denoiser)
    cost["layers_quantized"] = sum(s.quantized for s in specs)
    cost["layers_total"] = len(specs)
    return cost


def run_label(cfg: DictConfig, plan: Plan) -> str:
    """What the job ran, as sweep reports label it: ``rtn+block W4A8`` (a loaded export: its preset)."""
    if cfg.load:
        return f"{plan.name} (loaded)"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        return f"{method_label(resolved)} {bits_label(resolved['quant'])}"
    except ConfigError:
        return plan.name


def write_artifacts(cfg: DictConfig, out_dir: Path, plan: Plan, denoiser: nn.Module, specs: list[LayerSpec],
                    evalset: EvalSet, fp_images: torch.Tensor, q_images: torch.Tensor, metrics: dict[str, Any]) -> None:
    """grid.png, the exported model (``export=true``, recorded in ``metrics``) and metrics.json."""
    if cfg.eval.grid:
        tags = [e.get("tag") for e in evalset.entries for _ in range(evalset.images_per_prompt)]
        ids = spread_indices(evalset.prompts, tags, cfg.eval.grid_max)
        label = "\n".join(textwrap.wrap(metrics["label"], 14)[:4])  # the label column is 14 characters wide
        image_grid([fp_images[ids], q_images[ids]], ["FP", label], [evalset.prompts[i] for i in ids]).save(
            out_dir / "grid.png")
    if cfg.export:
        path = export_quantized(denoiser, specs, out_dir / "model", plan.attn,
                                extra={"model": cfg.model.name, "quant": plan.name, "method": plan.method},
                                codec=cfg.export_codec)
        metrics["export"] = {"path": str(path), "size_mb": round(path.stat().st_size / 2**20, 4)}
    write_metrics(out_dir, metrics)


def loss_plot(finetuned: Mapping[str, Any], path: Path) -> Any:
    """finetune_loss.png: the training loss per step (log scale; step i's loss is the model's after
    i updates), the validation loss at its steps, each stage's kept best state (a vertical line), the
    stage boundaries and the weights' learning rate (right axis); returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = finetuned["stages"] or [finetuned]
    offsets = [sum(s["steps"] for s in stages[:i]) for i in range(len(stages))]
    fig, ax = plt.subplots(figsize=(7, 4))
    losses = finetuned["loss_curve"]
    ax.plot(range(len(losses)), losses, lw=0.8, color="C0", alpha=0.8, label="training loss")
    if finetuned["val_curve"]:
        steps, values = zip(*finetuned["val_curve"])
        ax.plot(steps, values, "o-", ms=3.5, lw=1.2, color="C1", label="validation loss")
    for stage, offset in zip(stages, offsets):
        if offset:
            ax.axvline(offset, color="0.6", lw=0.8, ls=":")
        if stage["keep"] == "best":
            step = offset + stage["best_step"]
            ax.axvline(step, color="C2", lw=1.2, ls="--", label=f"kept: step {step}")
            ax.annotate(f"best {stage['best_val_loss']:.3g}", (step, stage["best_val_loss"]), xytext=(4, 6),
                        textcoords="offset points", fontsize=8, color="C2")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="finetuning loss")
    lr = ax.twinx()
    lr.plot(range(len(finetuned["lr_curve"])), finetuned["lr_curve"], lw=0.8, color="C3", alpha=0.6,
            label="learning rate")
    lr.set_ylabel("learning rate", color="C3")
    handles = [h for a in (ax, lr) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def write_failure(out_dir: Path, error: BaseException, overrides: list[str]) -> None:
    """metrics.json of a failed run: ``status: failed``, the error and the overrides. An earlier
    successful run's metrics.json in the same folder is kept as metrics.previous.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = out_dir / "metrics.json"
    if old.exists():
        try:
            ok = json.loads(old.read_text()).get("status") == "ok"
        except (OSError, ValueError):
            ok = False
        if ok:
            old.replace(out_dir / "metrics.previous.json")
            log.info("the earlier run's metrics.json in %s is kept as metrics.previous.json", out_dir)
    write_metrics(out_dir, {"status": "failed", "error": f"{type(error).__name__}: {error}", "overrides": overrides})


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json (atomically)."""
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(out_dir / "metrics.json")
