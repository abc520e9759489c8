"""Load a diffusers pipeline from a model config (tiny, hub id or local folder) and name its parts."""
from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import diffusers
import torch
from diffusers import DiffusionPipeline
from omegaconf import MISSING, DictConfig, OmegaConf
from packaging.version import Version
from torch import nn

from diffq.errors import CheckpointError, ConfigError
from diffq.models.tiny import FAMILIES, PIPELINE_CLASSES, build_tiny_pipeline
from diffq.roles import detect_family
from diffq.worlds import world_of

__all__ = [
    "DTYPES", "ModelConfig", "load_pipeline", "resolve_dtype", "denoiser_of", "set_denoiser", "text_encoders_of",
    "family_of_pipeline",
]

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DENOISER_NAMES = ("unet", "transformer")
# diffusers 0.42 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns)
_DTYPE_KWARG = "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


@dataclass
class ModelConfig:
    """Which diffusion pipeline to load and how to sample it (the ``model`` group)."""

    name: str = MISSING
    family: str = MISSING  # sd | sdxl | dit | pixart | sd3 | flux
    source: str = "tiny"  # tiny (random, built from config) | pretrained (hub id or local folder)
    pretrained: Optional[str] = None  # hub id or local folder when source=pretrained
    pipeline_class: str = MISSING  # diffusers pipeline class name
    resolution: int = 32
    steps: int = 10
    guidance: float = 5.0
    dtype: str = "float32"  # float32 | float16 | bfloat16
    variant: Optional[str] = None  # e.g. fp16 weights variant on the hub
    seed: int = 0  # seed of the random weights of a tiny model
    tiny: Dict[str, Any] = field(default_factory=dict)  # size overrides for tiny builders
    call_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra pipeline __call__ kwargs
    # prompts this model understands, replacing calib/eval prompts when set (class labels of
    # class-conditional models such as DiT)
    prompts: List[str] = field(default_factory=list)
    # fail early on prompts with words the model's word-level tokenizer does not know (testbed)
    vocabulary_check: bool = False
    # the procedural world the model was trained on (a registered world, diffq/worlds.py): eval=quick then
    # draws its prompts from the world's GenEval set and scores them with the world's detector
    world: Optional[str] = None
    # CLIP model for clip_score (hub id or folder): the one the paper evaluations use
    clip_model: Optional[str] = None


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name (float32, float16, bfloat16)."""
    if name not in DTYPES:
        raise ConfigError(f"unknown model.dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _pipeline_class(name: str, family: str) -> type[DiffusionPipeline]:
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise ConfigError(
            f"unknown model.pipeline_class {name!r}: use a diffusers pipeline class, "
            f"e.g. {PIPELINE_CLASSES[family]} for family {family!r}"
        )
    return cls


def _local_folder(pretrained: str) -> str | None:
    """The folder ``pretrained`` names, or None when it is a hub id ("name" or "org/name").

    An existing directory is local; so is anything starting with "/", "." or "~" or with more
    than one "/" (which no hub id has) — such a path must exist.
    """
    path = os.path.expanduser(pretrained)
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        raise CheckpointError(
            f"model.pretrained {pretrained} is a file: point it at a diffusers pipeline folder "
            "(the one holding model_index.json)"
        )
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:
        raise CheckpointError(
            f"model folder {pretrained} does not exist: fix model.pretrained or download the model with "
            f"`hf download <hub-id> --local-dir {pretrained}`"
        )
    return None


def _saved_pipeline_class(folder: str) -> str | None:
    """The pipeline class a diffusers folder's model_index.json names."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise CheckpointError(
            f"model folder {folder} has no model_index.json: point model.pretrained at a diffusers "
            "pipeline folder (save_pretrained or `hf download` output)"
        )
    try:
        with open(index, encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{index} is not valid JSON ({err}): download the model folder again") from err


def _pipeline_kwargs(cls: type[DiffusionPipeline]) -> dict[str, Any]:
    """Skip the safety checker (and its feature extractor) of pipelines that have one."""
    if "safety_checker" not in inspect.signature(cls.__init__).parameters:
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _from_pretrained(cfg: ModelConfig | DictConfig, cls: type[DiffusionPipeline]) -> DiffusionPipeline:
    if not cfg.pretrained:
        raise ConfigError(
            f"model {cfg.name} has source=pretrained but no model.pretrained: set it to a hub id or a local folder"
        )
    if (world := world_of(str(cfg.pretrained))) is not None:  # a world's shipped model: name what is missing
        world.check_asset_folder(str(cfg.pretrained))
    folder = _local_folder(str(cfg.pretrained))
    saved_class = _saved_pipeline_class(folder) if folder is not None else None
    families = {c: f for f, c in PIPELINE_CLASSES.items()}
    if saved_class in families and families[saved_class] != cfg.family:
        raise CheckpointError(
            f"model folder {folder} holds a {saved_class} ({families[saved_class]}) but the config asks for "
            f"{cfg.pipeline_class} (family {cfg.family}): fix model.pretrained, or model.family and "
            "model.pipeline_class"
        )
    source = folder or str(cfg.pretrained)
    dtype = resolve_dtype(cfg.dtype)
    logger.info("loading %s from %s (%s)", cls.__name__, source, cfg.dtype)
    try:
        return cls.from_pretrained(source, variant=cfg.variant, **{_DTYPE_KWARG: dtype}, **_pipeline_kwargs(cls))
    except (OSError, ValueError, TypeError) as err:
        if folder is None:
            raise CheckpointError(
                f"cannot load model {source} from the Hugging Face hub (not cached, or offline): {err}. "
                f"Fix: download it first with `hf download {source} --local-dir <dir>` and set "
                "model.pretrained=<dir>, or check the id and unset HF_HUB_OFFLINE"
            ) from err
        raise CheckpointError(
            f"cannot load {cls.__name__} from {folder} (its model_index.json names {saved_class}): {err}. "
            "Fix model.pipeline_class, model.variant or the folder's files"
        ) from err


def _check_config(cfg: ModelConfig | DictConfig) -> type[DiffusionPipeline]:
    """The config's pipeline class, after checking that family, source, dtype and pipeline
    class are known and agree with each other.

    A tiny model must use its family's pipeline class; a pretrained one may use any diffusers
    pipeline (e.g. PixArtAlphaPipeline) but not another family's main class.
    """
    if cfg.family not in FAMILIES:
        raise ConfigError(f"unknown model.family {cfg.family!r}: use one of {', '.join(FAMILIES)}")
    if cfg.source not in ("tiny", "pretrained"):
        raise ConfigError(f"unknown model.source {cfg.source!r}: use 'tiny' or 'pretrained'")
    resolve_dtype(cfg.dtype)
    cls = _pipeline_class(cfg.pipeline_class, cfg.family)
    expected = PIPELINE_CLASSES[cfg.family]
    if cfg.pipeline_class != expected and (cfg.source == "tiny" or cfg.pipeline_class in PIPELINE_CLASSES.values()):
        raise ConfigError(
            f"model.pipeline_class {cfg.pipeline_class!r} does not match family {cfg.family!r}: "
            f"use {expected} (or change model.family)"
        )
    return cls


def _tiny_overrides(tiny: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    if isinstance(tiny, DictConfig):
        return OmegaConf.to_container(tiny, resolve=True)
    return dict(tiny)


def load_pipeline(cfg: ModelConfig | DictConfig, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """The pipeline ``cfg`` describes, every module in eval mode, progress bars off, on ``device``.

    ``source=tiny`` builds random tiny weights offline; ``source=pretrained`` loads a hub id or
    a local diffusers folder. Bad configs raise ConfigError, missing models CheckpointError.
    """
    cls = _check_config(cfg)
    if cfg.source == "tiny":
        pipe = build_tiny_pipeline(cfg.family, cfg.seed, **_tiny_overrides(cfg.tiny))
        if cfg.dtype != "float32":
            pipe.to(dtype=resolve_dtype(cfg.dtype))
    else:
        pipe = _from_pretrained(cfg, cls)
        found = family_of_pipeline(pipe)
        if found != cfg.family:
            raise ConfigError(
                f"model.family is {cfg.family!r} but {cfg.pretrained} holds a {found!r} denoiser: "
                f"set model.family={found}"
            )
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def denoiser_of(pipe: DiffusionPipeline) -> tuple[str, nn.Module]:
    """The denoiser's attribute name ("unet" or "transformer") and module."""
    for name in _DENOISER_NAMES:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise ConfigError(f"{type(pipe).__name__} has no unet or transformer: diffq quantizes diffusion denoisers only")


def set_denoiser(pipe: DiffusionPipeline, module: nn.Module) -> None:
    """Replace the pipeline's denoiser (e.g. with a quantized one)."""
    name, _ = denoiser_of(pipe)
    setattr(pipe, name, module)


def text_encoders_of(pipe: DiffusionPipeline) -> dict[str, nn.Module]:
    """The pipeline's text encoders by attribute name (text_encoder, text_encoder_2, ...)."""
    return {
        name: module for name, module in pipe.components.items()
        if name.startswith("text_encoder") and isinstance(module, nn.Module)
    }


def family_of_pipeline(pipe: DiffusionPipeline) -> str:
    """The architecture family of the pipeline's denoiser (sd, sdxl, dit, pixart, sd3, flux)."""
    _, denoiser = denoiser_of(pipe)
    family = detect_family(denoiser)
    if family not in FAMILIES:
        raise ConfigError(
            f"unsupported denoiser {type(denoiser).__name__}: diffq supports the families {', '.join(FAMILIES)}"
        )
    return family
