"""The Python API: quantize a diffusers pipeline (or its denoiser) in one call, save and load it as a
pipeline folder, list the presets, evaluate two pipelines. The CLI job runs on the same functions
(:func:`resolve_layer_specs`, :func:`apply_quantization`).

Example::

    import diffq
    pipe = diffq.quantize(pipe, "w4a8", calib=["a photo of a red circle"])  # in place; pipe.diffq_report
    diffq.save_quantized(pipe, "out/w4a8")
    pipe = diffq.load_pipeline("out/w4a8")
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import inspect
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from diffq import calib as calibration
from diffq.calib.capture import CalibSample, CallRecorder
from diffq.config import QuantConfig, register_configs
from diffq.errors import ConfigError
from diffq.eval.cost import LayerCounter, activation_bits, operations, weight_bits
from diffq.export import export_quantized, load_quantized, read_metadata
from diffq.files import use_umask
from diffq.layers import is_quant_layer
from diffq.methods import MethodContext, get_method
from diffq.methods.reconstruct import reconstruct
from diffq.models import Sampling, denoiser_of, dit_resolution, generate_images, sample_seeds
from diffq.roles import CAUSAL_TEXT_FAMILIES, ROLES, detect_family, quantizable_layers
from diffq.rollback import rollback_on_error
from diffq.spec import LayerSpec, format_spec_table, resolve_spec

log = logging.getLogger(__name__)

__all__ = ["Report", "apply_quantization", "compose_config", "evaluate", "load_pipeline", "presets", "quantize",
           "resolve_layer_specs", "save_quantized"]

PIPELINE_FILE = "diffq_pipeline.json"


@dataclass
class Report:
    """What :func:`quantize` did: the per-layer spec table, the cost (effective bits, sizes) and the
    method's statistics."""

    preset: str
    specs: list[LayerSpec]
    cost: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> str:
        """The spec.txt table."""
        return format_spec_table(self.specs)

    def __str__(self) -> str:
        c = self.cost
        return (f"{self.table}\n{self.preset}: weights {c['effective_weight_bits']:.2f} bits, activations "
                f"{c['effective_act_bits']:.2f} bits, {c['size_fp_mb']:.2f} MB -> {c['size_quant_mb']:.2f} MB")


def presets() -> dict[str, str]:
    """``{name: one line}`` of the quantization presets (``conf/quant/*.yaml``).

    >>> "w4a8" in diffq.presets()
    True
    """
    folder = importlib.resources.files("diffq.conf") / "quant"
    out = {}
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        if f.name.endswith(".yaml"):
            text = " ".join(line.lstrip("# ").strip() for line in f.read_text().splitlines() if line.startswith("#"))
            out[f.name.removesuffix(".yaml")] = text.split(". ")[0].rstrip(".")
    return out


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside the Hydra app (or a caller's own initialisation)
        yield
        return
    with initialize_config_module("diffq.conf", version_base="1.3"):
        yield


def compose_config(preset: str | Mapping[str, Any] | QuantConfig = "w8a8",
                   overrides: Mapping[str, Any] | None = None) -> DictConfig:
    """The job config of a preset (name, or a quant mapping / :class:`QuantConfig`) with dotted
    ``overrides`` (``{"quant.weight.bits": 4}``), as ``python -m diffq quant=<preset> ...`` composes it."""
    from hydra import compose

    names = presets()
    if isinstance(preset, str) and preset not in names:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(names)}")
    with _hydra():
        cfg = compose("config", overrides=[f"quant={preset if isinstance(preset, str) else 'w8a8'}"])
    if not isinstance(preset, str):
        custom = OmegaConf.structured(preset) if isinstance(preset, QuantConfig) else preset
        try:
            cfg.quant = OmegaConf.merge(OmegaConf.structured(QuantConfig(name="custom")), custom)
        except OmegaConfBaseException as e:
            raise ConfigError(f"quantization config: {str(e).splitlines()[0]}") from None
    for key, value in (overrides or {}).items():
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {key}={value!r}: {str(e).splitlines()[0]}") from None
    return cfg


def resolve_layer_specs(denoiser: nn.Module, family: str | None, quant: Mapping[str, Any]) -> list[LayerSpec]:
    """Each layer's quantization from a quant config: the method's model rules, the preset's rules,
    a written MixDQ plan; ConfigError for an impossible rule or a method check that fails."""
    method = get_method(quant["method"])
    model_rules = getattr(method, "model_rules", None)  # a method's rules from the model (before the preset's)
    rules = ((model_rules(denoiser, quant) if model_rules else []) + list(quant["rules"])
             + plan_rules(quant))
    if any(r.get("bos") for r in rules) and family not in CAUSAL_TEXT_FAMILIES:
        log.info("quant.rules bos: %s does not cross-attend to a causal CLIP sequence (its text tokens are T5's or a "
                 "class label): BOS-aware K/V quantization does not apply and is off", family)
        rules = [{**r, "bos": None} for r in rules]
    specs = resolve_spec(quantizable_layers(denoiser, family), quant["weight"], quant["act"], rules, ROLES,
                         strict=quant["strict"])
    check = getattr(method, "check_specs", None)
    if check is not None:
        check(specs, quant)
    return specs


def plan_rules(quant: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rules of a written bit plan (``quant.mixdq.plan``), appended to the preset's; ConfigError
    for a missing, unparsable or rule-less file."""
    path = quant["mixdq"]["plan"]
    if not path:
        return []
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"quant.mixdq.plan {file} does not exist: point it at a run's mixdq_plan.yaml")
    fix = "point quant.mixdq.plan at a run's mixdq_plan.yaml (a mapping with a list under 'rules')"
    try:
        plan = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except Exception as e:  # noqa: BLE001 - yaml's and OmegaConf's parse errors alike
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"quant.mixdq.plan {file} is not valid YAML ({first}): {fix}") from None
    rules = plan.get("rules") if isinstance(plan, dict) else None
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError(f"quant.mixdq.plan {file} has no list of rules: {fix}")
    return rules


def apply_quantization(denoiser: nn.Module, specs: Sequence[LayerSpec], samples: Sequence[CalibSample],
                       quant: Mapping[str, Any], recon: Mapping[str, Any], context: MethodContext, *,
                       device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Quantize ``denoiser`` in place with the method and any reconstruction of ``quant``."""
    stats = get_method(quant["method"])(denoiser, specs, samples, quant, device=device, dtype=dtype, context=context)
    if quant["recon"] != "none":
        stats.update(reconstruct(denoiser, samples, recon, quant["recon"], device=device, dtype=dtype))
    return stats


def _split(target: Any) -> tuple[Any, nn.Module]:
    """(pipeline or None, denoiser) of what :func:`quantize` was given; ConfigError naming what it accepts."""
    accepted = ("diffq.quantize takes a diffusers pipeline (StableDiffusionPipeline, PixArtSigmaPipeline, "
                "FluxPipeline...) or its denoiser (pipe.unet / pipe.transformer)")
    if isinstance(target, nn.Module):
        if detect_family(target) in (None, "text_encoder") or not hasattr(target, "config"):
            raise ConfigError(f"{accepted}, got {type(target).__name__}")
        return None, target
    if not hasattr(target, "components"):
        raise ConfigError(f"{accepted}, got {type(target).__name__}")
    return target, denoiser_of(target)[1]


CalibInput = Sequence[str] | Sequence[Mapping[str, Any]] | Callable[[nn.Module], Any] | str | None


def _calib_kind(calib: CalibInput) -> str:
    """What ``calib`` is: ``default`` (None), ``loop``, ``prompts`` or ``kwargs``; ConfigError for an empty
    list, mixed kinds or anything else. A single string is one prompt."""
    if calib is None:
        return "default"
    if isinstance(calib, str):
        return "prompts"
    if callable(calib):
        return "loop"
    if isinstance(calib, Mapping) or not isinstance(calib, Sequence):
        raise ConfigError(f"calib must be a list of prompts, a list of denoiser keyword dicts or a forward_loop "
                          f"callable (or None for the preset's prompts), got {type(calib).__name__}")
    if not calib:
        raise ConfigError("calib is empty: pass prompts, denoiser keyword dicts or a forward_loop, or leave it out "
                          "(None) for the preset's calibration prompts")
    strings = sum(isinstance(c, str) for c in calib)
    if strings == len(calib):
        return "prompts"
    if strings == 0:
        return "kwargs"  # each item checked against the denoiser's signature (_check_samples)
    raise ConfigError(f"calib mixes {strings} prompts (str) with {len(calib) - strings} other items: pass only prompts "
                      "or only denoiser keyword dicts")


def _check_sampling(pipe: Any, family: str | None, steps: int, resolution: int | None) -> None:
    """ConfigError for sampler arguments of :func:`quantize` / :func:`evaluate` that cannot work."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r}: the sampler needs at least 1 step (an int)")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ConfigError(f"resolution={resolution!r} must be a positive int (pixels), or None for the model's own")
    native = dit_resolution(pipe) if pipe is not None and family == "dit" else None
    if native is not None and resolution is not None and resolution != native:
        raise ConfigError(f"resolution={resolution}: DiT generates only at its native resolution {native}: pass "
                          f"resolution={native} or leave it out")


def _resolution(pipe: Any) -> int:
    if detect_family(denoiser_of(pipe)[1]) == "dit":
        return dit_resolution(pipe)
    size = getattr(pipe, "default_sample_size", None) or denoiser_of(pipe)[1].config.get("sample_size", 64)
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))


def _check_samples(denoiser: nn.Module, samples: Sequence[Any]) -> list[CalibSample]:
    """Denoiser kwargs checked against its signature and input channels, before any work."""
    params = list(inspect.signature(denoiser.forward).parameters)
    latent = params[0]
    channels = denoiser.config.get("in_channels")
    out = []
    for i, kw in enumerate(samples):
        if not isinstance(kw, Mapping) or latent not in kw or not torch.is_tensor(kw[latent]):
            raise ConfigError(f"calibration item {i}: expected a dict of {type(denoiser).__name__} keyword arguments "
                              f"with a tensor {latent!r} (and timestep, conditioning...), got {type(kw).__name__}"
                              f"{'' if not isinstance(kw, Mapping) else ' with keys ' + str(sorted(kw))}")
        unknown = sorted(set(kw) - set(params))
        x = kw[latent]
        axis = 1 if x.dim() == 4 else -1
        if unknown or not x.is_floating_point() or (channels and x.shape[axis] != channels):
            raise ConfigError(f"calibration item {i}: {latent} must be a floating tensor with {channels} channels on "
                              f"axis {axis} (got {tuple(x.shape)} {x.dtype})"
                              + (f"; unknown arguments {unknown}" if unknown else ""))
        out.append(CalibSample(dict(kw), i))
    return out


def _capture_loop(denoiser: nn.Module, forward_loop: Callable[[nn.Module], Any]) -> list[CalibSample]:
    recorder = CallRecorder(denoiser)
    handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        with torch.no_grad():
            forward_loop(denoiser)
    finally:
        handle.remove()
    if not recorder.calls:
        raise ConfigError("the calibration forward_loop never called the denoiser")
    return [CalibSample(kw, i) for i, kw in enumerate(recorder.calls)]


def quantize(target: Any, preset: str | Mapping[str, Any] | QuantConfig = "w8a8", calib: CalibInput = None, *,
             overrides: Mapping[str, Any] | None = None, steps: int = 20, guidance: float = 5.0,
             resolution: int | None = None, device: str | torch.device | None = None,
             cache_dir: str | None = None, seed: int = 0, **keyword_overrides: Any) -> Any:
    """Quantize a diffusers pipeline (or a bare denoiser) in place as the preset says and return it,
    with ``.diffq_report`` (:class:`Report`).

    ``calib``: prompts (one string is one prompt; a pipeline's sampler runs them; default: the preset's
    calibration prompts), a list of denoiser keyword-argument dicts, or ``forward_loop(denoiser)`` that
    calls the denoiser. ``overrides``: dotted keys as on the command line (``{"quant.weight.bits": 4}``);
    keyword form: ``quant__weight__bits=4``. Calibration, the method, reconstruction and finetuning run
    where the preset asks for them (finetuning and MixDQ's search need a pipeline).

    Every setting is checked before the model is touched; if a later stage fails, the denoiser is put
    back as it was (the error says when weights changed in place and the model must be reloaded).

    >>> pipe = diffq.quantize(pipe, "w4a8", calib=["a photo of a red circle"])
    >>> print(pipe.diffq_report)
    """
    pipe, denoiser = _split(target)
    family = detect_family(denoiser)
    kind = _calib_kind(calib)
    calib = [calib] if isinstance(calib, str) else calib
    _check_sampling(pipe, family, steps, resolution)
    overrides = {**(overrides or {}), **{k.replace("__", "."): v for k, v in keyword_overrides.items()}}
    cfg = compose_config(preset, overrides)
    if any(is_quant_layer(m) for m in denoiser.modules()):
        raise ConfigError(f"this {type(denoiser).__name__} is already quantized by diffq: quantize a freshly loaded "
                          "pipeline (or load a saved one with diffq.load_pipeline)")
    if cache_dir:
        cfg.paths.cache_dir = cache_dir
    q = OmegaConf.to_container(cfg.quant, resolve=True)
    ft = OmegaConf.to_container(cfg.finetune, resolve=True)
    from diffq.finetune.stage import check_finetune, enabled, finetune_denoiser, plan_stages

    check_finetune(ft, load=False, keep_fp_weights=q["keep_fp_weights"], world=None)
    if pipe is None:
        if enabled(ft):
            raise ConfigError(f"preset {cfg.quant.name} finetunes from the sampler's trajectories: pass the pipeline, "
                              "not the denoiser, or override finetune.steps=0")
        reason = getattr(get_method(q["method"]), "needs_pipeline", lambda _: None)(q)
        if reason:
            raise ConfigError(f"preset {cfg.quant.name}: {reason}")
        if kind in ("default", "prompts"):
            raise ConfigError("calibrating a bare denoiser needs calib= denoiser kwargs or a forward_loop; pass the "
                              "pipeline to calibrate from prompts")
    if kind in ("default", "prompts"):
        calibration.check_timestep_coverage(q["act"], OmegaConf.to_container(cfg.calib, resolve=True),
                                            int(cfg.calib.steps or steps))
    device = torch.device(device) if device else next(denoiser.parameters()).device
    dtype = next(denoiser.parameters()).dtype
    specs = resolve_layer_specs(denoiser, family, q)
    if enabled(ft):
        plan_stages(denoiser, family, specs, ft, q["attn"])
        fp_key = {"api": type(denoiser).__name__, "weights": _fingerprint(denoiser)}  # before anything changes it
    samples = _check_samples(denoiser, calib) if kind == "kwargs" else []
    smp = Sampling(steps, guidance, resolution or (_resolution(pipe) if pipe is not None else 0), 4, {})
    prompts: list[str] = []
    with rollback_on_error(denoiser, f"the {type(denoiser).__name__}"):
        if kind == "loop":
            samples = _capture_loop(denoiser, calib)
        elif kind in ("default", "prompts"):
            calib_steps = int(cfg.calib.steps or steps)
            prompts = calibration.calibration_prompts(list(calib or cfg.calib.prompts), None,
                                                      len(calib) if calib else cfg.calib.num_prompts)
            samples, _ = calibration.load_or_capture(
                pipe, family, model_key={"api": type(denoiser).__name__}, prompts=prompts, seed=cfg.calib.seed,
                steps=calib_steps, guidance=guidance, resolution=smp.resolution,
                keep_steps=min(int(cfg.calib.num_steps), calib_steps), batch_size=cfg.calib.batch_size,
                call_kwargs={}, cache_dir=None, selection=cfg.calib.selection, num_samples=cfg.calib.num_samples,
                edadm=OmegaConf.to_container(cfg.calib.edadm, resolve=True))
        context = MethodContext(pipe, family or "", smp, prompts, {"api": type(denoiser).__name__},
                                str(cfg.paths.cache_dir), seed, None)
        torch.manual_seed(seed)
        stats = apply_quantization(denoiser, specs, samples, q, OmegaConf.to_container(cfg.recon, resolve=True),
                                   context, device=device, dtype=dtype)
        if enabled(ft):
            state_key = {**fp_key, "quant": q, "finetune": ft, "seed": seed}
            stats["finetune"] = finetune_denoiser(
                pipe, family, specs, ft, q["attn"], calib=samples, calib_prompts=prompts or list(cfg.calib.prompts),
                smp=smp, model_key=fp_key, cache_dir=str(cfg.paths.cache_dir), state_key=state_key, device=device)
        report = Report(str(cfg.quant.name), specs, _cost(denoiser, specs, samples[0], device, dtype), stats)
    denoiser.__dict__["_diffq"] = {"specs": specs, "attn": q["attn"], "quant": str(cfg.quant.name),
                                   "method": q["method"]}
    target.diffq_report = report
    return target


@torch.no_grad()
def _fingerprint(model: nn.Module) -> str:
    """A digest of every parameter's name, shape and value (what the FP model's cache entries are keyed by)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:20]


@torch.no_grad()
def _cost(denoiser: nn.Module, specs: Sequence[LayerSpec], sample: CalibSample, device: torch.device,
          dtype: torch.dtype) -> dict[str, Any]:
    counter = LayerCounter(denoiser, [s.name for s in specs])
    try:
        denoiser(**sample.to(device, dtype), return_dict=False)
    finally:
        counter.remove()
    return {**weight_bits(denoiser), "effective_act_bits": activation_bits(denoiser, counter.counts, specs),
            **operations(denoiser, counter.macs, specs)}


def save_quantized(pipe: Any, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized pipeline to ``folder``: the denoiser as diffq's packed export, every other
    component as diffusers saves it; :func:`load_pipeline` turns it back into a runnable pipeline.

    A non-empty ``folder`` is refused unless ``overwrite=True``, which replaces it whole, and only
    once the new save is complete (a failed save leaves the old folder as it was).

    >>> diffq.save_quantized(pipe, "out/w4a8")
    """
    name, denoiser = denoiser_of(pipe)
    meta = denoiser.__dict__.get("_diffq")
    if meta is None:
        raise ConfigError(f"the pipeline's {name} is not quantized by diffq: run diffq.quantize(pipe, ...) first")
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file: save_quantized writes a folder; pick another path")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(f"{folder} is not empty: pass overwrite=True to replace it, or pick an empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        export_quantized(denoiser, meta["specs"], staging / name, meta["attn"],
                         extra={"quant": meta["quant"], "method": meta["method"]})
        for key, component in pipe.components.items():
            if key != name and hasattr(component, "save_pretrained"):
                component.save_pretrained(staging / key)
        pipe.save_config(staging)
        (staging / PIPELINE_FILE).write_text(json.dumps({"class_name": type(pipe).__name__, "denoiser": name},
                                                        indent=2))
        use_umask(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.replace(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return folder


def load_pipeline(folder: str | Path, device: str | torch.device | None = None) -> Any:
    """The pipeline :func:`save_quantized` wrote, its denoiser rebuilt bit-exactly from the export.

    >>> pipe = diffq.load_pipeline("out/w4a8"); images = pipe("a photo of a red circle").images
    """
    import diffusers

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{folder} does not exist: pass the folder diffq.save_quantized wrote")
    info_file = folder / PIPELINE_FILE
    if not info_file.is_file():
        raise ConfigError(f"{folder} is not a pipeline saved by diffq.save_quantized (no {PIPELINE_FILE})")
    info = json.loads(info_file.read_text())
    meta = read_metadata(folder / info["denoiser"])
    denoiser = load_quantized(folder / info["denoiser"])
    denoiser.__dict__["_diffq"] = {"specs": [LayerSpec.from_dict(d) for d in meta["specs"]], "attn": meta["attn"],
                                   "quant": meta["extra"].get("quant"), "method": meta["extra"].get("method")}
    cls = getattr(diffusers, info["class_name"])
    pipe = cls.from_pretrained(str(folder), **{info["denoiser"]: denoiser})
    return pipe.to(device) if device else pipe


def evaluate(pipe: Any, fp_pipe: Any, prompts: Sequence[str], metrics: Sequence[str] = ("psnr", "ssim"), *,
             seeds: Sequence[int] | None = None, steps: int = 20, guidance: float = 5.0, resolution: int | None = None,
             batch_size: int = 4, cache_dir: str | None = None) -> dict[str, Any]:
    """The evaluation suite (``psnr``, ``ssim``, ``lpips``, ``fid_fp``, ``clip_score``...) on the
    images of ``pipe`` against those of ``fp_pipe``, same prompts and seeds.

    >>> diffq.evaluate(qpipe, fp_pipe, ["a photo of a red circle"], metrics=["psnr"])["psnr"]["quant"]
    """
    from diffq.eval.suite import check_eval
    from diffq.eval.suite import evaluate as run_suite

    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ConfigError("evaluate needs a non-empty list of prompts (str), e.g. [\"a photo of a red circle\"]")
    if seeds is not None and len(seeds) != len(prompts):
        raise ConfigError(f"got {len(seeds)} seeds for {len(prompts)} prompts: pass one seed per prompt, or none")
    family = detect_family(denoiser_of(pipe)[1])
    _check_sampling(pipe, family, steps, resolution)

    cfg = compose_config("fp16", {"eval.metrics": list(metrics), "eval.geneval.metadata": None})
    if cache_dir:
        cfg.paths.cache_dir = cache_dir
    check_eval(cfg.eval)
    seeds = list(seeds) if seeds is not None else sample_seeds(0, len(prompts))
    res = resolution or _resolution(pipe)

    def images(p: Any) -> torch.Tensor:
        return generate_images(p, family, list(prompts), seeds, steps=steps, guidance=guidance, resolution=res,
                               batch_size=batch_size, progress=False)

    return run_suite(cfg.eval, images(fp_pipe), images(pipe), list(prompts), None, str(cfg.paths.cache_dir),
                     next(denoiser_of(pipe)[1].parameters()).device)
