"""One diffq job, a chain of stages: check the config -> load the pipeline -> FP samples -> quantize
(or load an export) -> finetune -> quantized samples -> cost -> evaluate -> write the artifacts.

The quantize and finetune stages are :mod:`diffq.quantize_stage`'s, as the Python API runs them;
this module adapts the composed config to them. Every check that needs no model runs before the
pipeline loads, and the ones that need the denoiser (rules, vocabulary) run before the first image
is generated.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffq import calib as calibration
from diffq import quantize_stage as stage
from diffq.cache import cache_key, cache_lock
from diffq.deployment import DeployReport, deploy
from diffq.deployment.lowering import check_backend
from diffq.deployment.memory import resident_bytes
from diffq.distributed import Shard, current_shard, process_state, wait_for_everyone
from diffq.errors import ConfigError
from diffq.eval.cost import LayerCounter, model_cost
from diffq.eval.samples import SampleFolder, generate_samples
from diffq.eval.suite import check_eval, evaluate, split_per_image
from diffq.export import load_denoiser, packable_layers, read_metadata
from diffq.finetune.lora import describe_side_branches
from diffq.finetune.stage import enabled as finetune_enabled
from diffq.job_artifacts import Plan, loss_plot, run_label, spec_text, write_artifacts, write_failure, write_metrics
from diffq.job_evalset import EvalSet, Samples, eval_set, geneval_entries, sample_entries
from diffq.models import Sampling, denoiser_of, generate_images, load_pipeline, model_key, sampling_of, unknown_words
from diffq.spec import LayerSpec

log = logging.getLogger(__name__)

__all__ = ["EvalSet", "Plan", "Samples", "check_config", "geneval_entries", "layer_specs", "load_model", "loss_plot",
           "plan_of", "run", "sample_entries", "spec_text", "write_failure", "write_metrics"]


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one job and write its artifacts into ``out_dir``; returns the metrics dict."""
    timings: dict[str, float] = {}
    check_config(cfg)
    plan, evalset, calib_prompts, shard = plan_of(cfg), eval_set(cfg), calibration_prompts_of(cfg), current_shard()
    out_dir = prepare_out_dir(cfg, out_dir, shard)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    with timed(timings, "load_s"):
        pipe = load_model(cfg, device)
    denoiser_name, denoiser = denoiser_of(pipe)
    target = stage_target(cfg, pipe, device, out_dir)
    specs = layer_specs(cfg, denoiser, plan)
    if cfg.model.vocabulary_check:
        check_vocabulary(pipe, [*evalset.prompts, *calib_prompts])
    setting = sample_setting(cfg, evalset, target.sampling)
    with timed(timings, "sampling_fp_s"):
        fp = fp_samples(pipe, cfg, evalset, setting, target.sampling, shard)
    calib_info, finetuned = quantize(cfg, target, specs, calib_prompts, timings)
    deployment = deploy_stage(cfg, pipe, denoiser, specs, evalset, target.sampling) if cfg.deploy else None
    if shard.is_main:
        (out_dir / "spec.txt").write_text(spec_text(specs, plan.attn, finetuned) + describe_side_branches(denoiser)
                                          + (deployment.report.table() if deployment else ""))
        if finetuned is not None:
            loss_plot(finetuned, out_dir / "finetune_loss.png")
    with timed(timings, "sampling_quant_s"):
        quant, counter = quantized_samples(pipe, denoiser, specs, cfg, plan.name, evalset, setting, target.sampling,
                                           shard, out_dir)
    if not shard.is_main:
        return {"status": "worker", "shard": shard.rank}
    fp_images, q_images = fp.folder.load(), quant.folder.load()
    suite = evaluate(cfg.eval, fp_images, q_images, evalset.prompts, evalset.geneval, cfg.paths.cache_dir, device,
                     fp_key=cache_key(setting))
    metrics: dict[str, Any] = {
        "status": "ok", "model": cfg.model.name, "quant": plan.name, "label": run_label(cfg, plan),
        "method": plan.method, "attn": plan.attn,
        "denoiser": f"{denoiser_name}:{type(denoiser).__name__.removeprefix('Quant')}",
        "metrics": suite, "fidelity": split_per_image(suite),
        "cost": deployment.cost if deployment else model_cost(denoiser, specs, counter.counts, counter.macs),
        **({"deployment": deployment.summary(denoiser)} if deployment else {}),
        "time": {k: round(v, 3) for k, v in timings.items()},
        "calib": {**calib_info, "fp_images_cache_hit": fp.generated == 0}, "finetune": finetuned,
        "samples": {"fp": str(fp.folder.root), "quant": str(quant.folder.root), "generated_fp": fp.generated,
                    "generated_quant": quant.generated, "processes": shard.world},
        "prompts": evalset.prompts, "seeds": evalset.seeds,
    }
    write_artifacts(cfg, out_dir, plan, denoiser, specs, evalset, fp_images, q_images, metrics)
    return metrics


# ----------------------------------------------------------------------------- checks, before any model loads


def stage_settings(cfg: DictConfig) -> stage.StageSettings:
    """The quantize stage's settings of the job config."""
    return stage.StageSettings.from_config(cfg)


def check_config(cfg: DictConfig) -> None:
    """ConfigError for every setting that is wrong on its own (the quantize stage's, the sampler's
    timestep coverage, metrics, the export codec, ``packed``), before anything loads or runs."""
    s = stage_settings(cfg)
    stage.check_settings(s, load=bool(cfg.load), world=cfg.model.world)
    stage.check_coverage(s, sampling_of(cfg).steps)
    check_eval(cfg.eval)
    stage.check_codec(cfg.export_codec)
    if cfg.packed and not cfg.load:
        raise ConfigError("packed=true keeps a loaded export's weights packed: add load=<exported model folder>")
    if cfg.deploy:
        check_backend(cfg.deploy)
        if cfg.packed:
            raise ConfigError("packed=true and deploy= both choose how the weights are held: drop packed=true "
                              "(deploy packs ternary weights itself)")
    if cfg.packed and not packable_layers(read_metadata(cfg.load)):
        raise ConfigError(f"packed=true keeps sub-byte weights packed (formats under 8 bits: INT2-INT4, FP4, ternary, "
                          f"binary), but {cfg.load} stores every layer at 8 bits or more, so nothing would pack: drop "
                          "packed=true")


def plan_of(cfg: DictConfig) -> Plan:
    """The config's preset, or with ``load=`` the checkpoint's (CheckpointError when it is missing or
    not a diffq export)."""
    if not cfg.load:
        return Plan(cfg.quant.name, cfg.quant.method, OmegaConf.to_container(cfg.quant.attn, resolve=True))
    meta = read_metadata(cfg.load)
    extra = meta["extra"]
    return Plan(extra.get("quant", "unknown"), extra.get("method", "unknown"), meta["attn"] or {"enabled": False},
                meta)


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


def stage_target(cfg: DictConfig, pipe: Any, device: torch.device, out_dir: Path) -> stage.Target:
    """What the quantize stage works on: the loaded pipeline's denoiser, keyed and sampled as the config says."""
    _, denoiser = denoiser_of(pipe)
    return stage.Target(pipe, denoiser, cfg.model.family, model_key(cfg), sampling_of(cfg), device, cfg.model.world,
                        out_dir)


def layer_specs(cfg: DictConfig, denoiser: nn.Module, plan: Plan) -> list[LayerSpec]:
    """Each layer's quantization: the checkpoint's with ``load=``, else the config's rules resolved on
    the denoiser (ConfigError for an impossible rule or a finetuning stage that selects nothing)."""
    if plan.checkpoint is not None:
        return [LayerSpec.from_dict(d) for d in plan.checkpoint["specs"]]
    return stage.layer_specs(denoiser, cfg.model.family, stage_settings(cfg))


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
        made = generate_samples(pipe, cfg.model.family, folder, seeds, shard=shard, desc=desc, **smp.sampler_kwargs())
    wait_for_everyone()
    return Samples(folder, made)


def fp_samples(pipe: Any, cfg: DictConfig, evalset: EvalSet, setting: dict[str, Any], smp: Sampling,
               shard: Shard) -> Samples:
    """The FP model's evaluation images, in the shared cache (``<cache_dir>/fp_samples/<key>``)."""
    root = Path(cfg.paths.cache_dir).expanduser() / "fp_samples" / cache_key(setting)
    folder = SampleFolder(root, evalset.entries, evalset.images_per_prompt, setting)
    return make_samples(pipe, cfg, folder, evalset.seeds, smp, shard, "FP samples", shared=True)


def quantized_samples(pipe: Any, denoiser: nn.Module, specs: list[LayerSpec], cfg: DictConfig, name: str,
                      evalset: EvalSet, setting: dict[str, Any], smp: Sampling, shard: Shard,
                      out_dir: Path) -> tuple[Samples, LayerCounter]:
    """The quantized model's evaluation images (``<out_dir>/samples``) and the input elements and
    multiply-accumulates of each layer in one denoiser call (for the activation-bits and OPs cost)."""
    counter = LayerCounter(denoiser, [s.name for s in specs])
    q_setting = {**setting, "quant": OmegaConf.to_container(cfg.quant, resolve=True), "load": cfg.load,
                 **({"deploy": cfg.deploy} if cfg.deploy else {}),
                 "calib": OmegaConf.to_container(cfg.calib, resolve=True),
                 **({"finetune": OmegaConf.to_container(cfg.finetune, resolve=True)}
                    if finetune_enabled(cfg.finetune) and not cfg.load else {})}
    folder = SampleFolder(out_dir / "samples", evalset.entries, evalset.images_per_prompt, q_setting)
    samples = make_samples(pipe, cfg, folder, evalset.seeds, smp, shard, f"{name} samples")
    if not counter.counts:  # every image was already on disk: count one denoiser call's inputs
        count_one_call(pipe, cfg, smp, evalset.prompts[0], evalset.seeds[0])
    counter.remove()
    return samples, counter


def count_one_call(pipe: Any, cfg: DictConfig, smp: Sampling, prompt: str, seed: int) -> None:
    """Run the sampler briefly on one prompt so input-element counters see a denoiser call."""
    generate_images(pipe, cfg.model.family, [prompt], [seed], **smp.sampler_kwargs(steps=2, batch_size=1),
                    progress=False)


# ----------------------------------------------------------------------------- quantize or load, deploy


def quantize(cfg: DictConfig, target: stage.Target, specs: list[LayerSpec], calib_prompts: list[str],
                    timings: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load the export (``load=``), or calibrate, quantize and finetune the denoiser in place;
    the calibration facts and the finetuning's for metrics.json."""
    if cfg.load:
        with timed(timings, "calibration_s"):
            return load_export(cfg.load, target.denoiser, cfg.packed), None
    s = stage_settings(cfg)
    with timed(timings, "calibration_s"):
        with timed(timings, "calib_capture_s"):
            samples, info = stage.calibrate(target, s, calib_prompts, cache=True)
        with timed(timings, "quantize_s"):
            info.update(stage.apply_quantization(target, s, specs, samples, calib_prompts))
    if not s.finetunes:
        return info, None
    with timed(timings, "finetune_s"):
        return info, stage.finetune(target, s, specs, samples, calib_prompts)


@dataclass
class Deployment:
    """The deploy stage's outcome: its coverage report and the model's cost taken before lowering."""

    report: DeployReport
    cost: dict[str, Any]

    def summary(self, denoiser: nn.Module) -> dict[str, Any]:
        """metrics.json's ``deployment``: layer counts and the deployed denoiser's resident memory."""
        return {k: v for k, v in self.report.to_dict().items() if k != "layers"} | {
            "resident_mb": round(resident_bytes(denoiser) / 2**20, 3)}


def deploy_stage(cfg: DictConfig, pipe: Any, denoiser: nn.Module, specs: list[LayerSpec], evalset: EvalSet,
                 smp: Sampling) -> Deployment:
    """Lower the quantized denoiser onto ``cfg.deploy``'s kernels. One short sampler call first counts
    each layer's inputs (the cost, taken on the quantized layers) and shows static kernels their inputs' rank."""
    counter = LayerCounter(denoiser, [s.name for s in specs])
    count_one_call(pipe, cfg, smp, evalset.prompts[0], evalset.seeds[0])
    counter.remove()
    cost = model_cost(denoiser, specs, counter.counts, counter.macs)
    return Deployment(deploy(denoiser, cfg.deploy), cost)


def load_export(path: str, denoiser: nn.Module, packed: bool = False) -> dict[str, Any]:
    """Load an exported quantized checkpoint into the denoiser (``packed``: sub-byte weights stay
    packed in memory); returns where it came from and how many layers stay packed."""
    load_denoiser(path, denoiser, packed=packed)
    layers = len(packable_layers(read_metadata(path))) if packed else 0
    if packed:
        log.info("packed=true: %d layers stay packed in memory, the others are stored at 8 bits", layers)
    return {"loaded_from": str(path), "packed": layers > 0, "packed_layers": layers}
