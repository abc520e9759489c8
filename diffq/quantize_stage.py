"""The quantize stage, once and without Hydra: check the settings, resolve each layer's spec,
calibrate, apply the method and any reconstruction, finetune, and record what was done on the
denoiser. The Python API (:mod:`diffq.api`) and the CLI job (:mod:`diffq.job`) are thin adapters
that build a :class:`Target` and :class:`StageSettings` and call these functions in order.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from diffq import calib as calibration
from diffq.calib import CalibConfig, CalibSample, calib_settings
from diffq.calib.select import step_histogram
from diffq.errors import ConfigError
from diffq.export import CODECS
from diffq.finetune.stage import check_finetune, finetune_denoiser, plan_stages
from diffq.finetune.stage import enabled as finetune_enabled
from diffq.methods import MethodContext, get_method, get_recon_mode
from diffq.methods.reconstruct import reconstruct
from diffq.models import Sampling
from diffq.roles import CAUSAL_TEXT_FAMILIES, ROLES, quantizable_layers
from diffq.spec import LayerSpec, TensorQuant, resolve_spec, validate_quant_args

log = logging.getLogger(__name__)

_INFO = "_diffq"  # the attribute of a quantized denoiser holding its QuantizedInfo


@dataclass
class StageSettings:
    """The stage's resolved settings: the ``quant``, ``recon`` and ``finetune`` sections, the typed
    calibration settings, the run's seed and the cache folder."""

    quant: dict[str, Any]
    recon: dict[str, Any]
    finetune: dict[str, Any]
    calib: CalibConfig
    seed: int
    cache_dir: str

    @classmethod
    def from_config(cls, cfg: Any) -> StageSettings:
        """The settings of a composed config (the job's, or :func:`diffq.preset_config.compose_stage`'s)."""
        quant, recon, finetune, calib = (OmegaConf.to_container(cfg[k], resolve=True)
                                         for k in ("quant", "recon", "finetune", "calib"))
        return cls(quant, recon, finetune, calib_settings(calib), int(cfg.seed), str(cfg.paths.cache_dir))

    @property
    def finetunes(self) -> bool:
        """Whether the stage finetunes after PTQ (``finetune.steps > 0``)."""
        return finetune_enabled(self.finetune)


@dataclass
class Target:
    """What is quantized: the pipeline (None for a bare denoiser), its denoiser and family, the key of
    the FP model in caches, how its sampler runs, the device, the world the model was trained on and
    the run folder methods write into (None: nowhere)."""

    pipe: Any
    denoiser: nn.Module
    family: str | None
    model_key: dict[str, Any]
    sampling: Sampling
    device: torch.device
    world: str | None = None
    out_dir: Path | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's dtype."""
        return next(self.denoiser.parameters()).dtype


@dataclass
class QuantizedInfo:
    """What a quantized denoiser carries for saving: its layer specs, attention-matmul settings, the
    preset's name and the method."""

    specs: list[LayerSpec]
    attn: dict[str, Any]
    preset: str | None
    method: str | None


def mark_quantized(denoiser: nn.Module, info: QuantizedInfo) -> None:
    """Record on ``denoiser`` what quantized it (read back by :func:`quantized_info`)."""
    denoiser.__dict__[_INFO] = info


def quantized_info(denoiser: nn.Module) -> QuantizedInfo | None:
    """What quantized ``denoiser`` (None when diffq did not)."""
    return denoiser.__dict__.get(_INFO)


# ----------------------------------------------------------------------------- checks, before any model work


def check_settings(s: StageSettings, *, load: bool = False, world: str | None = None) -> None:
    """ConfigError for every stage setting that is wrong on its own (formats, method, reconstruction,
    calibration selection, attention formats, finetuning, a written plan), before any model loads."""
    q = s.quant
    validate_quant_args(q["weight"], q["act"])
    get_method(q["method"])
    check_recon(q, load)
    calibration.check_selection(s.calib.selection)
    check_attn(q["attn"])
    check_finetune(s.finetune, load=load, keep_fp_weights=q["keep_fp_weights"], world=world)
    read_plan_rules(q)


def check_recon(quant: Mapping[str, Any], load: bool = False) -> None:
    """ConfigError for a reconstruction that cannot run as configured."""
    if quant["recon"] == "none":
        return
    get_recon_mode(quant["recon"])
    if load:
        raise ConfigError("quant.recon applies when quantizing, not to a loaded export: drop load= or quant.recon")
    if not quant["keep_fp_weights"]:
        raise ConfigError("reconstruction needs the FP weights next to the quantized ones: "
                          "set quant.keep_fp_weights=true")


def check_attn(attn: Mapping[str, Any]) -> None:
    """ConfigError naming ``quant.attn.qkv`` / ``quant.attn.softmax`` when attention quantization is on
    and one of its formats cannot be built."""
    if not attn.get("enabled"):
        return
    for key in ("qkv", "softmax"):
        where = f"quant.attn.{key}"
        tq = TensorQuant.from_mapping(attn[key], where)
        try:
            tq.build_format()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from e


def check_codec(name: str | None) -> None:
    """ConfigError for an unknown export codec."""
    if name:
        CODECS.get(name)


def check_coverage(s: StageSettings, sampler_steps: int) -> None:
    """ConfigError when calibration keeps too few sampler steps for ``quant.act``'s timestep groups
    (``sampler_steps``: the sampler's, replaced by ``calib.steps`` when set)."""
    calib = {"num_steps": s.calib.num_steps, "selection": s.calib.selection}
    calibration.check_timestep_coverage(s.quant["act"], calib, int(s.calib.steps or sampler_steps))


def read_plan_rules(quant: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rules of a written bit plan (``quant.mixdq.plan``), appended to the preset's; ConfigError
    for a missing, unparsable or rule-less file."""
    path = (quant.get("mixdq") or {}).get("plan")
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


# ----------------------------------------------------------------------------- the stage


def resolve_layer_specs(denoiser: nn.Module, family: str | None, quant: Mapping[str, Any]) -> list[LayerSpec]:
    """Each layer's quantization from a quant config: the method's model rules, the preset's rules,
    a written MixDQ plan; ConfigError for an impossible rule or a method check that fails."""
    method = get_method(quant["method"])
    model_rules = getattr(method, "model_rules", None)  # a method's rules from the model (before the preset's)
    rules = ((model_rules(denoiser, quant) if model_rules else []) + list(quant["rules"]) + read_plan_rules(quant))
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


def layer_specs(denoiser: nn.Module, family: str | None, s: StageSettings) -> list[LayerSpec]:
    """The denoiser's layer specs; when the stage finetunes, every recipe stage must select something
    (ConfigError before calibration)."""
    specs = resolve_layer_specs(denoiser, family, s.quant)
    if s.finetunes:
        plan_stages(denoiser, family or "", specs, s.finetune, s.quant["attn"])
    return specs


def calibrate(target: Target, s: StageSettings, prompts: Sequence[str],
              cache: bool = True) -> tuple[list[CalibSample], dict[str, Any]]:
    """The calibration set of the FP sampler over ``prompts`` (from the cache when ``cache`` and
    ``calib.cache``) and its facts for metrics.json (size, selection, cache hit, calls per step)."""
    samples, hit = calibration.calibrate(target.pipe, target.family or "", model_key=target.model_key,
                                         prompts=prompts, settings=s.calib, sampling=target.sampling,
                                         cache_dir=s.cache_dir if cache else None)
    hist = step_histogram(samples, max(x.step for x in samples) + 1)
    log.info("calibration set (%s): denoiser input rows per sampler call: %s", s.calib.selection,
             " ".join(map(str, hist)))
    return samples, {"samples": len(samples), "selection": s.calib.selection, "cache_hit": hit, "steps": hist}


def apply_quantization(target: Target, s: StageSettings, specs: Sequence[LayerSpec], samples: Sequence[CalibSample],
                       prompts: Sequence[str]) -> dict[str, Any]:
    """Quantize the denoiser in place with ``quant.method`` and any reconstruction; the method's stats."""
    context = MethodContext(target.pipe, target.family or "", target.sampling, list(prompts), target.model_key,
                            s.cache_dir, s.seed, target.out_dir)
    q = s.quant
    stats = get_method(q["method"])(target.denoiser, specs, samples, q, device=target.device, dtype=target.dtype,
                                    context=context)
    if q["recon"] != "none":
        stats.update(reconstruct(target.denoiser, samples, s.recon, q["recon"], device=target.device,
                                 dtype=target.dtype))
    return stats


def finetune_state_key(model_key: Mapping[str, Any], s: StageSettings) -> dict[str, Any]:
    """Everything that determines the finetuned state (its cache key: a rerun resumes or reuses it)."""
    return {"model": dict(model_key), "quant": s.quant, "recon": s.recon if s.quant["recon"] != "none" else None,
            "calib": asdict(s.calib), "seed": s.seed,
            "finetune": {k: v for k, v in s.finetune.items() if k not in ("checkpoint_every", "resume")}}


def finetune(target: Target, s: StageSettings, specs: Sequence[LayerSpec], samples: Sequence[CalibSample],
             prompts: Sequence[str]) -> dict[str, Any]:
    """Finetune the quantized denoiser against its FP self (state cached under
    :func:`finetune_state_key`); what it trained, its curves and time for metrics.json."""
    stats = finetune_denoiser(target.pipe, target.family or "", specs, s.finetune, s.quant["attn"], calib=samples,
                              calib_prompts=prompts, smp=target.sampling, model_key=target.model_key,
                              cache_dir=s.cache_dir, state_key=finetune_state_key(target.model_key, s),
                              device=target.device, world=target.world)
    return {"name": s.finetune.get("name", "custom"), **stats}
