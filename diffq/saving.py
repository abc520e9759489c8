"""Save and load a quantized pipeline as a folder, a pair: :func:`save_pipeline` writes the denoiser
as diffq's packed export (:func:`diffq.export.save_denoiser`) and every other component as diffusers
saves it; :func:`load_pipeline` rebuilds a runnable pipeline from it."""
from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from diffq.errors import ConfigError
from diffq.export import load_denoiser, read_metadata, save_denoiser
from diffq.files import use_umask
from diffq.models import denoiser_of
from diffq.quantize_stage import QuantizedInfo, mark_quantized, quantized_info
from diffq.spec import LayerSpec

__all__ = ["PIPELINE_FILE", "load_pipeline", "save_pipeline", "save_quantized"]

PIPELINE_FILE = "diffq_pipeline.json"


def save_pipeline(pipe: Any, folder: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized pipeline to ``folder``: the denoiser as diffq's packed export, every other
    component as diffusers saves it; :func:`load_pipeline` (its pair) turns it back into a runnable
    pipeline.

    A non-empty ``folder`` is refused unless ``overwrite=True``, which replaces it whole, and only
    once the new save is complete (a failed save leaves the old folder as it was).

    >>> diffq.save_pipeline(pipe, "out/w4a8")
    """
    name, denoiser = denoiser_of(pipe)
    info = quantized_info(denoiser)
    if info is None:
        raise ConfigError(f"the pipeline's {name} is not quantized by diffq: run diffq.quantize(pipe, ...) first")
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file: save_pipeline writes a folder; pick another path")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(f"{folder} is not empty: pass overwrite=True to replace it, or pick an empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_denoiser(denoiser, info.specs, staging / name, info.attn,
                      extra={"quant": info.preset, "method": info.method})
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
    """The pipeline :func:`save_pipeline` wrote (its pair), its denoiser rebuilt bit-exactly from the export.

    >>> pipe = diffq.load_pipeline("out/w4a8"); images = pipe("a photo of a red circle").images
    """
    import diffusers

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{folder} does not exist: pass the folder diffq.save_pipeline wrote")
    info_file = folder / PIPELINE_FILE
    if not info_file.is_file():
        raise ConfigError(f"{folder} is not a pipeline saved by diffq.save_pipeline (no {PIPELINE_FILE})")
    info = json.loads(info_file.read_text())
    meta = read_metadata(folder / info["denoiser"])
    denoiser = load_denoiser(folder / info["denoiser"])
    mark_quantized(denoiser, QuantizedInfo([LayerSpec.from_dict(d) for d in meta["specs"]], meta["attn"],
                                           meta["extra"].get("quant"), meta["extra"].get("method")))
    cls = getattr(diffusers, info["class_name"])
    pipe = cls.from_pretrained(str(folder), **{info["denoiser"]: denoiser})
    return pipe.to(device) if device else pipe


def save_quantized(pipe: Any, folder: str | Path, overwrite: bool = False) -> Path:
    """The former name of :func:`save_pipeline` (kept for one release; it warns)."""
    warnings.warn("diffq.save_quantized is now diffq.save_pipeline (the pair of diffq.load_pipeline)",
                  DeprecationWarning, stacklevel=2)
    return save_pipeline(pipe, folder, overwrite)
