"""The Python API: quantize a diffusers pipeline (or its denoiser) in one call, save and load it as a
pipeline folder (:mod:`diffq.saving`), list the presets, evaluate two pipelines. Quantizing runs the
stage of :mod:`diffq.quantize_stage`, as the CLI job does; presets resolve without Hydra
(:mod:`diffq.preset_config`).

Example::

    import diffq
    pipe = diffq.quantize(pipe, "w4a8", calib=["a photo of a red circle"])  # in place; pipe.diffq_report
    diffq.save_pipeline(pipe, "out/w4a8")
    pipe = diffq.load_pipeline("out/w4a8")
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from diffq import calib as calibration
from diffq.calib.capture import CalibSample, CallRecorder
from diffq.config import QuantConfig, register_configs
from diffq.errors import ConfigError
from diffq.eval.cost import count_layer_inputs, model_cost
from diffq.layers import is_quant_layer
from diffq.methods import get_method
from diffq.models import Sampling, denoiser_of, dit_resolution, generate_images, sample_seeds
from diffq.preset_config import apply_overrides, check_preset, compose_stage, custom_quant, presets
from diffq.quantize_stage import (
    QuantizedInfo,
    StageSettings,
    Target,
    apply_quantization,
    calibrate,
    check_coverage,
    check_settings,
    finetune,
    layer_specs,
    mark_quantized,
)
from diffq.roles import detect_family
from diffq.rollback import rollback_on_error
from diffq.saving import load_pipeline, save_pipeline, save_quantized
from diffq.spec import LayerSpec, format_spec_table

log = logging.getLogger(__name__)

__all__ = ["Report", "compose_config", "evaluate", "load_pipeline", "presets", "quantize", "save_pipeline",
           "save_quantized"]


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

    check_preset(preset)
    with _hydra():
        cfg = compose("config", overrides=[f"quant={preset if isinstance(preset, str) else 'w8a8'}"])
    if not isinstance(preset, str):
        cfg.quant = custom_quant(preset)
    return apply_overrides(cfg, overrides)


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


def _check_stage(pipe: Any, denoiser: nn.Module, s: StageSettings, kind: str, steps: int) -> None:
    """ConfigError, before the model is touched, for a stage that cannot run on what was given."""
    if any(is_quant_layer(m) for m in denoiser.modules()):
        raise ConfigError(f"this {type(denoiser).__name__} is already quantized by diffq: quantize a freshly loaded "
                          "pipeline (or load a saved one with diffq.load_pipeline)")
    check_settings(s)
    name = s.quant["name"]
    if pipe is None:
        if s.finetunes:
            raise ConfigError(f"preset {name} finetunes from the sampler's trajectories: pass the pipeline, "
                              "not the denoiser, or override finetune.steps=0")
        reason = getattr(get_method(s.quant["method"]), "needs_pipeline", lambda _: None)(s.quant)
        if reason:
            raise ConfigError(f"preset {name}: {reason}")
        if kind in ("default", "prompts"):
            raise ConfigError("calibrating a bare denoiser needs calib= denoiser kwargs or a forward_loop; pass the "
                              "pipeline to calibrate from prompts")
    if kind in ("default", "prompts"):
        check_coverage(s, steps)


def quantize(target: Any, preset: str | Mapping[str, Any] | QuantConfig = "w8a8", calib: CalibInput = None, *,
             overrides: Mapping[str, Any] | None = None, steps: int = 20, guidance: float = 5.0,
             resolution: int | None = None, device: str | torch.device | None = None,
             cache_dir: str | None = None, seed: int = 0, **keyword_overrides: Any) -> Any:
    """Quantize a diffusers pipeline (or a bare denoiser) in place as the preset says and return it,
    with ``.diffq_report`` (:class:`Report`). Presets resolve by name without Hydra.

    ``calib``: prompts (one string is one prompt; a pipeline's sampler runs them; default: the preset's
    calibration prompts), a list of denoiser keyword-argument dicts, or ``forward_loop(denoiser)`` that
    calls the denoiser. ``overrides``: dotted keys as on the command line (``{"quant.weight.bits": 4}``);
    keyword form: ``quant__weight__bits=4``. Every setting is checked before the model is touched; if a
    later stage fails, the denoiser is put back as it was (the error says when weights changed in place).

    >>> pipe = diffq.quantize(pipe, "w4a8", calib=["a photo of a red circle"])
    >>> print(pipe.diffq_report)
    """
    pipe, denoiser = _split(target)
    kind = _calib_kind(calib)
    calib = [calib] if isinstance(calib, str) else calib
    family = detect_family(denoiser)
    _check_sampling(pipe, family, steps, resolution)
    dotted = {k.replace("__", "."): v for k, v in keyword_overrides.items()}
    cfg = compose_stage(preset, {**(overrides or {}), **dotted})
    if cache_dir:
        cfg.paths.cache_dir = cache_dir
    s = StageSettings.from_config(cfg)
    s.seed = seed
    _check_stage(pipe, denoiser, s, kind, steps)
    smp = Sampling(steps, guidance, resolution or (_resolution(pipe) if pipe is not None else 0), 4, {})
    key = {"api": type(denoiser).__name__, **({"weights": _fingerprint(denoiser)} if s.finetunes else {})}
    where = torch.device(device) if device else next(denoiser.parameters()).device
    tgt = Target(pipe, denoiser, family, key, smp, where)
    specs = layer_specs(denoiser, family, s)
    samples = _check_samples(denoiser, calib) if kind == "kwargs" else []
    prompts: list[str] = []
    with rollback_on_error(denoiser, f"the {type(denoiser).__name__}"):
        if kind == "loop":
            samples = _capture_loop(denoiser, calib)
        elif kind in ("default", "prompts"):
            prompts = calibration.calibration_prompts(list(calib or s.calib.prompts), None,
                                                      len(calib) if calib else s.calib.num_prompts)
            samples, _ = calibrate(tgt, s, prompts, cache=False)
        torch.manual_seed(seed)
        stats = apply_quantization(tgt, s, specs, samples, prompts)
        if s.finetunes:
            stats["finetune"] = finetune(tgt, s, specs, samples, prompts or list(s.calib.prompts))
        counter = count_layer_inputs(denoiser, [x.name for x in specs], samples[0], tgt.device, tgt.dtype)
        report = Report(s.quant["name"], specs, model_cost(denoiser, specs, counter.counts, counter.macs), stats)
    mark_quantized(denoiser, QuantizedInfo(specs, s.quant["attn"], s.quant["name"], s.quant["method"]))
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
    smp = Sampling(steps, guidance, resolution or _resolution(pipe), batch_size, {})

    def images(p: Any) -> torch.Tensor:
        return generate_images(p, family, list(prompts), seeds, **smp.sampler_kwargs(), progress=False)

    return run_suite(cfg.eval, images(fp_pipe), images(pipe), list(prompts), None, str(cfg.paths.cache_dir),
                     next(denoiser_of(pipe)[1].parameters()).device)
