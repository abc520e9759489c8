"""One diffq job: load -> calibrate -> quantize -> evaluate -> save artifacts."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffq import calib as calibration
from diffq.calib.cache import cache_key
from diffq.calib.select import step_histogram
from diffq.errors import ConfigError
from diffq.eval.cost import activation_bits, weight_bits
from diffq.eval.geneval import load_metadata
from diffq.eval.grids import image_grid
from diffq.eval.samples import (SampleFolder, Shard, current_shard, generate_samples, process_state,
                                wait_for_everyone)
from diffq.eval.suite import check_eval, check_geneval_classes, evaluate, split_per_image
from diffq.export import export_quantized, load_quantized, read_metadata
from diffq.methods import get_method, get_recon_mode
from diffq.methods.reconstruct import reconstruct
from diffq.models import denoiser_of, generate_images, load_pipeline, sample_seeds, unknown_words
from diffq.roles import ROLES, assign_roles
from diffq.spec import LayerSpec, TensorQuant, format_spec_table, resolve_spec, validate_quant_args
from diffq.testbed.prompts import evaluation_metadata

log = logging.getLogger(__name__)


@dataclass
class Sampling:
    """Sampler settings after applying sampler overrides to the model defaults."""

    steps: int
    guidance: float
    resolution: int
    batch_size: int
    call_kwargs: dict[str, Any]


def check_recon(cfg: DictConfig) -> None:
    """ConfigError, before anything runs, for a reconstruction that cannot run as configured."""
    q = cfg.quant
    if q.recon == "none":
        return
    get_recon_mode(q.recon)
    if cfg.load:
        raise ConfigError("quant.recon applies when quantizing, not to a loaded export: drop load= or quant.recon")
    if not q.keep_fp_weights:
        raise ConfigError("reconstruction needs the FP weights next to the quantized ones: set quant.keep_fp_weights=true")


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


def sampling_of(cfg: DictConfig) -> Sampling:
    """Steps/guidance/batch from ``sampler`` overrides or the model defaults."""
    s, m = cfg.sampler, cfg.model
    return Sampling(
        steps=int(s.steps if s.steps is not None else m.steps),
        guidance=float(s.guidance if s.guidance is not None else m.guidance),
        resolution=int(m.resolution),
        batch_size=int(s.batch_size),
        call_kwargs=OmegaConf.to_container(m.call_kwargs, resolve=True),
    )


def weights_fingerprint(path: str | None) -> str | None:
    """Hash of the file names, sizes and modification times under a local model folder (None for
    hub ids), so caches notice retrained or replaced weights."""
    if not path or not Path(path).expanduser().is_dir():
        return None
    root = Path(path).expanduser()
    files = sorted(f for f in root.rglob("*") if f.is_file())
    return cache_key({"files": [(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]})


def model_key(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the FP model's outputs (for cache keys)."""
    m = cfg.model
    return {
        "name": m.name, "family": m.family, "source": m.source, "pretrained": m.pretrained,
        "weights": weights_fingerprint(m.pretrained) if m.source == "pretrained" else None,
        "dtype": m.dtype, "seed": m.seed, "tiny": OmegaConf.to_container(m.tiny, resolve=True),
        "scheduler": cfg.sampler.scheduler,
    }


def geneval_entries(cfg: DictConfig) -> list[dict[str, Any]] | None:
    """The GenEval metadata entries the evaluation uses, if any."""
    source = cfg.eval.geneval.metadata
    if not source:
        return None
    entries = list(evaluation_metadata()) if source == "shapes" else load_metadata(source)
    return entries[:: max(1, cfg.eval.geneval.stride)]


def sample_entries(cfg: DictConfig, entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One metadata entry per evaluation prompt: the GenEval entries, else ``{"prompt": p}`` for the
    model's own prompts (e.g. class labels), else for ``eval.prompts``."""
    if entries:
        return entries
    return [{"prompt": p} for p in (list(cfg.model.prompts) or list(cfg.eval.prompts))]


def swap_scheduler(pipe: Any, name: str | None) -> None:
    """Replace the pipeline's scheduler by the diffusers class ``name`` (same config)."""
    if not name:
        return
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ConfigError(f"unknown scheduler {name!r}: use a diffusers scheduler class name, e.g. DDIMScheduler")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def sample_setting(cfg: DictConfig, entries: list[dict[str, Any]], seeds: list[int], smp: Sampling) -> dict[str, Any]:
    """What determines the FP model's evaluation images (the key of their cached folder)."""
    return {"model": model_key(cfg), "entries": cache_key({"entries": entries}), "images_per_prompt":
            cfg.eval.images_per_prompt, "seeds": cache_key({"seeds": seeds}), "steps": smp.steps,
            "guidance": smp.guidance, "res": smp.resolution, "kw": smp.call_kwargs}


def make_samples(pipe: Any, cfg: DictConfig, folder: SampleFolder, seeds: list[int], smp: Sampling, shard: Shard,
                 desc: str) -> tuple[float, int]:
    """Generate what is missing of ``folder`` (this process's shard); (seconds, images generated)."""
    t0 = time.perf_counter()
    made = generate_samples(pipe, cfg.model.family, folder, seeds, shard=shard, batch_size=smp.batch_size, desc=desc,
                            steps=smp.steps, guidance=smp.guidance, resolution=smp.resolution,
                            call_kwargs=smp.call_kwargs)
    wait_for_everyone()
    return time.perf_counter() - t0, made


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


def quantizable_layers(model: nn.Module, family: str) -> dict[str, tuple[str, nn.Module]]:
    """Every nn.Linear / nn.Conv2d of the denoiser with its role."""
    roles = assign_roles(model, family)
    modules = dict(model.named_modules())
    return {name: (role, modules[name]) for name, role in roles.items()}


class InputElementCounter:
    """Counts the input elements each named layer receives in the denoiser's first call."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.counts: dict[str, int] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[n].register_forward_pre_hook(self._count(n)) for n in names]
        self._hooks.append(model.register_forward_hook(lambda *_: self.remove()))

    def _count(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.counts[name] = self.counts.get(name, 0) + args[0].numel()
        return hook

    def remove(self) -> None:
        """Detach all hooks (called after the first denoiser call)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def run(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run one job and write its artifacts into ``out_dir``; returns the metrics dict."""
    timings: dict[str, float] = {}
    validate_quant_args(cfg.quant.weight, cfg.quant.act)
    check_recon(cfg)
    shard = current_shard()
    if shard.world > 1:
        out_dir = shared_out_dir(out_dir)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shard.is_main:
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    t0 = time.perf_counter()
    pipe = load_pipeline(cfg.model, device=device)
    swap_scheduler(pipe, cfg.sampler.scheduler)
    timings["load_s"] = time.perf_counter() - t0
    denoiser_name, denoiser = denoiser_of(pipe)
    dtype = next(denoiser.parameters()).dtype
    smp = sampling_of(cfg)
    family = cfg.model.family

    q = cfg.quant
    attn_cfg = OmegaConf.to_container(q.attn, resolve=True)
    if not cfg.load:
        layers = quantizable_layers(denoiser, family)
        rules = OmegaConf.to_container(q.rules, resolve=True)
        specs = resolve_spec(layers, q.weight, q.act, rules, ROLES, strict=q.strict)

    check_eval(cfg.eval)
    geneval = geneval_entries(cfg)
    check_geneval_classes(cfg.eval, geneval)
    entries = sample_entries(cfg, geneval)
    k = cfg.eval.images_per_prompt
    prompts = [e["prompt"] for e in entries for _ in range(k)]
    calib_prompts = calibration.calibration_prompts(
        list(cfg.model.prompts) or list(cfg.calib.prompts), cfg.calib.prompts_file, cfg.calib.num_prompts
    )
    if cfg.model.vocabulary_check:
        check_vocabulary(pipe, [*prompts, *calib_prompts])
    seeds = sample_seeds(cfg.eval.seed, len(prompts))
    setting = sample_setting(cfg, entries, seeds, smp)
    fp_folder = SampleFolder(Path(cfg.paths.cache_dir).expanduser() / "fp_samples" / cache_key(setting), entries, k,
                             setting)
    timings["sampling_fp_s"], fp_made = make_samples(pipe, cfg, fp_folder, seeds, smp, shard, "FP samples")

    t0 = time.perf_counter()
    if cfg.load:
        specs = [LayerSpec.from_dict(d) for d in read_metadata(cfg.load)["specs"]]
        load_quantized(cfg.load, denoiser)
        calib_info: dict[str, Any] = {"loaded_from": str(cfg.load)}
    else:
        samples, calib_hit = calibration.load_or_capture(
            pipe, family, model_key=model_key(cfg), prompts=calib_prompts, seed=cfg.calib.seed,
            steps=int(cfg.calib.steps or smp.steps), guidance=smp.guidance, resolution=smp.resolution,
            keep_steps=cfg.calib.num_steps, batch_size=cfg.calib.batch_size, call_kwargs=smp.call_kwargs,
            cache_dir=cfg.paths.cache_dir if cfg.calib.cache else None, selection=cfg.calib.selection,
            num_samples=cfg.calib.num_samples, edadm=OmegaConf.to_container(cfg.calib.edadm, resolve=True),
        )
        timings["calib_capture_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        method = get_method(q.method)
        stats = method(denoiser, specs, samples, OmegaConf.to_container(q, resolve=True), device=device, dtype=dtype)
        if q.recon != "none":
            stats.update(reconstruct(denoiser, samples, OmegaConf.to_container(cfg.recon, resolve=True), q.recon,
                                     device=device, dtype=dtype))
        timings["quantize_s"] = time.perf_counter() - t1
        hist = step_histogram(samples, max(s.step for s in samples) + 1)
        log.info("calibration set (%s): denoiser input rows per sampler call: %s", cfg.calib.selection,
                 " ".join(map(str, hist)))
        calib_info = {"samples": len(samples), "selection": cfg.calib.selection, "cache_hit": calib_hit,
                      "steps": hist, **stats}
    timings["calibration_s"] = time.perf_counter() - t0
    spec_text = format_spec_table(specs)
    if attn_cfg.get("enabled"):
        spec_text += f"attention matmuls: q/k/v {_describe(attn_cfg['qkv'])}, softmax output {_describe(attn_cfg['softmax'])}\n"
    if shard.is_main:
        (out_dir / "spec.txt").write_text(spec_text)

    counter = InputElementCounter(denoiser, [s.name for s in specs])
    q_setting = {**setting, "quant": OmegaConf.to_container(q, resolve=True), "load": cfg.load,
                 "calib": OmegaConf.to_container(cfg.calib, resolve=True)}
    q_folder = SampleFolder(out_dir / "samples", entries, k, q_setting)
    timings["sampling_quant_s"], q_made = make_samples(pipe, cfg, q_folder, seeds, smp, shard, f"{q.name} samples")
    if not counter.counts:  # every image was already on disk: count one denoiser call's inputs
        _count_one_call(pipe, cfg, smp, prompts[0], seeds[0])
    counter.remove()
    if not shard.is_main:
        return {"status": "worker", "shard": shard.rank}
    fp_images, q_images = fp_folder.load(), q_folder.load()

    cost = weight_bits(denoiser)
    cost["effective_act_bits"] = activation_bits(denoiser, counter.counts, specs)
    cost["layers_quantized"] = sum(s.quantized for s in specs)
    cost["layers_total"] = len(specs)

    suite = evaluate(cfg.eval, fp_images, q_images, prompts, geneval, cfg.paths.cache_dir, device)
    metrics: dict[str, Any] = {
        "status": "ok",
        "model": cfg.model.name,
        "quant": q.name,
        "method": q.method,
        "denoiser": f"{denoiser_name}:{type(denoiser).__name__.removeprefix('Quant')}",
        "metrics": suite,
        "fidelity": split_per_image(suite),
        "cost": cost,
        "time": {k: round(v, 3) for k, v in timings.items()},
        "calib": {**calib_info, "fp_images_cache_hit": fp_made == 0},
        "samples": {"fp": str(fp_folder.root), "quant": str(q_folder.root), "generated_fp": fp_made,
                    "generated_quant": q_made, "processes": shard.world},
        "prompts": prompts,
        "seeds": seeds,
    }
    if cfg.eval.grid:
        n = min(len(prompts), cfg.eval.grid_max)
        image_grid([fp_images[:n], q_images[:n]], ["FP", q.name], prompts[:n]).save(out_dir / "grid.png")
    if cfg.export:
        path = export_quantized(denoiser, specs, out_dir / "model", attn_cfg,
                                extra={"model": cfg.model.name, "quant": q.name})
        metrics["export"] = {"path": str(path), "size_mb": round(path.stat().st_size / 2**20, 4)}
    write_metrics(out_dir, metrics)
    return metrics


def _count_one_call(pipe: Any, cfg: DictConfig, smp: Sampling, prompt: str, seed: int) -> None:
    """Run the sampler briefly on one prompt so input-element counters see a denoiser call."""
    generate_images(pipe, cfg.model.family, [prompt], [seed], steps=2, guidance=smp.guidance,
                    resolution=smp.resolution, batch_size=1, call_kwargs=smp.call_kwargs, progress=False)


def _describe(args: dict[str, Any]) -> str:
    return TensorQuant.from_mapping(args, "quant.attn").describe()


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json (atomically)."""
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(out_dir / "metrics.json")
