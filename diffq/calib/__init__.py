"""Calibration data: capture the FP sampler's denoiser inputs, cache them, hand them to methods."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

from omegaconf import SI

from diffq.cache import cache_key, cache_lock, cache_path, load_tensors, save_tensors
from diffq.calib.capture import CalibSample, capture_trajectories, flatten_samples, unflatten_samples, uniform_steps
from diffq.calib.select import (
    SELECTIONS,
    EdaDmConfig,
    assemble,
    capture_pool,
    edadm_counts,
    select_items,
    trajectory_count,
)
from diffq.errors import ConfigError
from diffq.models import Sampling, sample_seeds
from diffq.settings import typed
from diffq.timestep_groups import MIN_CALLS_PER_GROUP

log = logging.getLogger(__name__)

__all__ = ["CalibConfig", "CalibSample", "EdaDmConfig", "calibrate", "calibration_prompts", "check_selection",
           "check_timestep_coverage", "kept_steps", "load_or_capture", "training_pool", "uniform_steps"]

_CACHE_VERSION = 3  # 2: pool shards hold the final latents and noise coefficients; 3: training pools from the FP model


@dataclass
class CalibConfig:
    """Calibration set (the ``calib`` group): which prompts the FP sampler runs, which denoiser inputs are kept."""

    name: str = "uniform"
    # uniform (num_steps evenly spaced steps per trajectory) | edadm | all_steps_random (num_samples
    # drawn from every step of every trajectory)
    selection: str = "uniform"
    num_samples: Optional[int] = None  # edadm / all_steps_random; default num_prompts x num_steps
    edadm: EdaDmConfig = field(default_factory=EdaDmConfig)
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None  # one prompt per line; overrides `prompts`
    num_prompts: int = 4
    num_steps: int = 4  # sampler steps kept per trajectory, evenly spaced
    steps: Optional[int] = None  # sampler steps of the calibration run (default: model.steps)
    batch_size: int = 4
    seed: int = SI("${add:1234,${seed}}")
    cache: bool = True


def calib_settings(calib: Mapping[str, Any] | CalibConfig) -> CalibConfig:
    """The typed ``calib`` settings of a (resolved) config section."""
    if isinstance(calib, CalibConfig):
        return calib
    values = dict(calib)
    values["edadm"] = typed(EdaDmConfig, values.get("edadm"), "calib.edadm")
    return typed(CalibConfig, values, "calib")


def calibrate(pipe: Any, family: str, *, model_key: dict[str, Any], prompts: Sequence[str],
              settings: Mapping[str, Any] | CalibConfig, sampling: Sampling,
              cache_dir: str | None) -> tuple[list[CalibSample], bool]:
    """The calibration set of ``settings`` over ``prompts``, the FP sampler run as ``sampling`` says
    (its steps unless ``calib.steps``), cached under ``cache_dir`` when ``calib.cache``; (samples, hit)."""
    c = calib_settings(settings)
    steps = int(c.steps or sampling.steps)
    return load_or_capture(
        pipe, family, model_key=model_key, prompts=prompts, seed=int(c.seed),
        **sampling.sampler_kwargs(steps=steps, batch_size=c.batch_size), keep_steps=min(int(c.num_steps), steps),
        cache_dir=cache_dir if c.cache else None, selection=c.selection, num_samples=c.num_samples,
        edadm=asdict(c.edadm))


def calibration_prompts(prompts: Sequence[str], prompts_file: str | None, count: int) -> list[str]:
    """The ``count`` calibration prompts (cycled when fewer are given)."""
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"calibration prompt file {path} does not exist: fix calib.prompts_file")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"calibration prompt file {path} is empty: put one prompt per line")
    if not prompts:
        raise ConfigError("no calibration prompts: set calib.prompts or calib.prompts_file")
    if count <= 0:
        raise ConfigError(f"calib.num_prompts must be positive (got {count})")
    return [prompts[i % len(prompts)] for i in range(count)]


def kept_steps(num_steps: int, sampler_steps: int) -> int:
    """The sampler steps calibration keeps per trajectory: ``calib.num_steps``, at most the
    calibration sampler's ``sampler_steps`` (a warning says so when it is capped); ConfigError below 1."""
    if num_steps < 1 or sampler_steps < 1:
        raise ConfigError(f"calib.num_steps ({num_steps}) and the calibration sampler's steps ({sampler_steps}) must "
                          "be at least 1")
    if num_steps > sampler_steps:
        log.warning("calib.num_steps=%d is more than the calibration sampler's %d steps: all %d are kept (set "
                    "calib.num_steps<=%d, or raise calib.steps for a longer calibration trajectory)", num_steps,
                    sampler_steps, sampler_steps, sampler_steps)
    return min(num_steps, sampler_steps)


def check_timestep_coverage(act: Mapping[str, Any], calib: Mapping[str, Any], sampler_steps: int) -> None:
    """ConfigError when ``calib=uniform`` keeps too few steps for ``quant.act``'s timestep groups: each
    group calibrated on its own needs MIN_CALLS_PER_GROUP distinct steps, shared groups one each. The
    fix it names can work: calibration keeps at most the calibration sampler's steps."""
    kept = kept_steps(int(calib["num_steps"]), sampler_steps)
    groups = int(act["timestep_groups"])
    if groups < 2 or calib["selection"] != "uniform":
        return
    per = 1 if act["timestep_init"] == "shared" else MIN_CALLS_PER_GROUP
    need = groups * per
    if kept >= need:
        return
    what = (f"quant.act.timestep_groups={groups} (timestep_init={act['timestep_init']}) needs calibration calls at "
            f"{need} or more sampler steps, but calibration keeps {kept}")
    if need <= sampler_steps:
        raise ConfigError(f"{what} (calib.num_steps={calib['num_steps']}); fix: set calib.num_steps={need} or lower "
                          "quant.act.timestep_groups")
    raise ConfigError(f"{what}: the calibration sampler runs only {sampler_steps} steps (calib.steps, else the "
                      f"sampler's); fix: lower quant.act.timestep_groups to {max(1, sampler_steps // per)} or less, or "
                      f"set calib.steps={need} calib.num_steps={need}")


def check_selection(selection: str) -> None:
    """ConfigError unless ``selection`` names a calibration-set selection (``calib.selection``)."""
    if selection not in SELECTIONS:
        raise ConfigError(f"unknown calib.selection {selection!r}: use one of {', '.join(SELECTIONS)}")


def load_or_capture(
    pipe: Any,
    family: str,
    *,
    model_key: dict[str, Any],
    prompts: Sequence[str],
    seed: int,
    steps: int,
    guidance: float,
    resolution: int,
    keep_steps: int,
    batch_size: int,
    call_kwargs: dict[str, Any],
    cache_dir: str | None,
    selection: str = "uniform",
    num_samples: int | None = None,
    edadm: Mapping[str, Any] | None = None,
) -> tuple[list[CalibSample], bool]:
    """The calibration set for this config, from the cache when present; returns (samples, hit).

    ``uniform`` keeps ``keep_steps`` evenly spaced calls of each trajectory; ``edadm`` and
    ``all_steps_random`` select ``num_samples`` (default: prompts x keep_steps) items from a pool
    of every call, streamed to disk (see :mod:`diffq.calib.select`)."""
    check_selection(selection)
    seeds = sample_seeds(seed, len(prompts))
    base = pool_base(model_key, prompts, seeds, steps, guidance, resolution, call_kwargs)
    n = int(num_samples or len(prompts) * keep_steps)
    edadm = dict(edadm or {})
    choice = {"keep": keep_steps} if selection == "uniform" else {"selection": selection, "n": n, "batch": batch_size,
                                                                   **({"edadm": edadm} if selection == "edadm" else {})}
    path = cache_path(cache_dir, "calib", cache_key({**base, **choice})) if cache_dir else None
    with cache_lock(path, "this calibration set") if path is not None else contextlib.nullcontext():
        if path is not None and (hit := load_tensors(path)) is not None:
            tensors, meta = hit
            log.info("calibration set loaded from cache %s", path)
            return unflatten_samples(tensors, meta["layout"]), True
        if selection == "uniform":
            samples = capture_trajectories(
                pipe, family, prompts, seeds, steps=steps, guidance=guidance, resolution=resolution,
                keep_steps=keep_steps, batch_size=batch_size, call_kwargs=call_kwargs,
            )
        else:
            samples = _select_from_pool(pipe, family, prompts, seeds, base, cache_dir, selection, n, seed, edadm,
                                        steps=steps, guidance=guidance, resolution=resolution,
                                        batch_size=batch_size, call_kwargs=call_kwargs)
        if path is not None:
            tensors, layout = flatten_samples(samples)
            save_tensors(path, tensors, {"layout": layout})
            log.info("calibration set cached at %s", path)
    return samples, False


def pool_base(model_key: dict[str, Any], prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
              resolution: int, call_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What identifies a set of FP trajectories (the key of the calibration set and pool caches)."""
    return {"v": _CACHE_VERSION, "model": model_key, "prompts": list(prompts), "seeds": list(seeds), "steps": steps,
            "guidance": guidance, "resolution": resolution, "call_kwargs": call_kwargs}


def pool_folder(cache_dir: str, base: dict[str, Any], hook: str, batch_size: int) -> Path:
    """The on-disk pool of every denoiser call of the trajectories ``base`` describes."""
    return Path(os.path.expanduser(str(cache_dir))) / "calib_pool" / cache_key({**base, "hook": hook,
                                                                                "batch": batch_size})


def training_pool(pipe: Any, family: str, *, model_key: dict[str, Any], prompts: Sequence[str], seed: int,
                  steps: int, guidance: float, resolution: int, batch_size: int, call_kwargs: dict[str, Any],
                  cache_dir: str) -> Path:
    """The pool of FP trajectories over ``prompts`` (captured where missing, shared with calibration
    selections over the same prompts); returns its folder. ``pipe`` must run its FP model (a
    quantized denoiser in :func:`~diffq.model_quant.float_mode`): the key names the FP model only."""
    base = pool_base(model_key, prompts, sample_seeds(seed, len(prompts)), steps, guidance, resolution, call_kwargs)
    folder = pool_folder(cache_dir, base, "auto", batch_size)
    capture_pool(pipe, family, prompts, sample_seeds(seed, len(prompts)), folder, hook="auto", steps=steps,
                 guidance=guidance, resolution=resolution, batch_size=batch_size, call_kwargs=call_kwargs)
    return folder


def _select_from_pool(pipe: Any, family: str, prompts: Sequence[str], seeds: list[int], base: dict[str, Any],
                      cache_dir: str | None, selection: str, n: int, seed: int, edadm: dict[str, Any],
                      **sampling: Any) -> list[CalibSample]:
    hook = edadm.get("hook", "auto")
    with contextlib.ExitStack() as stack:
        root = cache_dir or stack.enter_context(tempfile.TemporaryDirectory())
        folder = pool_folder(root, base, hook, sampling["batch_size"])
        capture_pool(pipe, family, prompts, seeds, folder, hook=hook, **sampling)
        trajectories, calls = trajectory_count(folder)
        counts = None
        if selection == "edadm":
            features = load_tensors(folder / "features.safetensors")[0]["features"]
            counts = edadm_counts(features, n, float(edadm.get("lam", 5.0)), edadm.get("radius"),
                                  float(edadm.get("radius_quantile", 0.3)), cap=trajectories)
        items = select_items(selection, n, trajectories, calls, seed, counts)
        return assemble(folder, items, sampling["batch_size"])
