"""Calibration sets drawn from every sampler step: a streamed on-disk pool, then a selection.

The pool holds every denoiser call of every calibration trajectory, one safetensors shard per
prompt batch under the cache (a rerun resumes at the first missing shard), so memory holds one
batch's trajectory at a time. A selection picks ``N`` (trajectory, call) items and assembles
them into batched calls, one call index per batch, CFG branches kept together:

- ``all_steps_random`` (DeepCompressor): ``N`` items uniformly at random from the pool;
- ``edadm`` (EDA-DM's TDAC): from the first batch's feature maps at ``hook`` (the middle
  block's attention output by default), call index ``i`` gets density ``d_i`` (how many other
  calls lie within mean squared distance ``r``; ``r`` absolute, or the ``radius_quantile`` of the
  pairwise distances) and diversity ``v_i = sum_j (1 - cos(F_i, F_j))`` (cosine along channels,
  averaged over positions), both min-max normalised; ``w = d + lam * v``; ``round(N w / sum w)``
  items (largest remainders make the sum exactly ``N``; a call index never gets more items than
  there are trajectories), each from a distinct trajectory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffq.cache import cache_lock, load_meta, load_tensors, save_tensors
from diffq.calib.capture import CalibSample, CallRecorder, check_finite, flatten_samples, unflatten_samples
from diffq.calib.schedule import StepRecorder
from diffq.errors import CalibrationError, ConfigError
from diffq.models import denoiser_of, generate_images

log = logging.getLogger(__name__)

SELECTIONS = ("uniform", "edadm", "all_steps_random")


@dataclass
class EdaDmConfig:
    """EDA-DM's timestep-diverse selection (``calib.edadm``)."""

    hook: str = "auto"  # module whose output is compared across steps (auto: mid-block attention output)
    lam: float = 5.0  # weight of diversity vs density (5.0 for SD in the paper's code)
    radius: Optional[float] = None  # absolute density radius (the code's 0.3 for SD); null: radius_quantile
    radius_quantile: float = 0.3  # radius as this quantile of the pairwise feature distances

UNBATCHED = {"txt_ids", "img_ids"}  # FLUX position ids: no batch dimension


def feature_module(model: nn.Module, hook: str) -> nn.Module:
    """The module whose output EDA-DM compares across steps (``auto``: the middle block's attention
    output of a UNet, else the middle transformer block)."""
    modules = dict(model.named_modules())
    if hook != "auto":
        if hook not in modules:
            raise ConfigError(f"calib.edadm.hook {hook!r} is not a module of {type(model).__name__}: use auto or a "
                              f"module name such as {next(n for n in modules if n)}")
        return modules[hook]
    for name in ("mid_block.attentions.0", "mid_block"):
        if name in modules:
            return modules[name]
    blocks = [n for n in modules if n.count(".") == 1 and n.split(".")[0].endswith("transformer_blocks")]
    if not blocks:
        raise ConfigError(f"no default EDA-DM feature point in {type(model).__name__}: set calib.edadm.hook")
    return modules[blocks[len(blocks) // 2]]


def _first_tensor(out: Any) -> torch.Tensor:
    while not torch.is_tensor(out):
        out = out[-1] if isinstance(out, (tuple, list)) else out.sample
    return out


def capture_pool(pipe: Any, family: str, prompts: Sequence[str], seeds: Sequence[int], folder: Path, *,
                 hook: str, steps: int, guidance: float, resolution: int, batch_size: int,
                 call_kwargs: dict[str, Any]) -> None:
    """Write every denoiser call of every trajectory to ``folder`` (one shard per prompt batch, with
    the batch's final latents and each step's noise coefficients, see :mod:`diffq.calib.schedule`)
    and the first batch's features at ``hook`` (``features.safetensors``)."""
    with cache_lock(folder / "pool", "this trajectory pool"):
        _capture_pool(pipe, family, prompts, seeds, folder, hook=hook, steps=steps, guidance=guidance,
                      resolution=resolution, batch_size=batch_size, call_kwargs=call_kwargs)


def _capture_pool(pipe: Any, family: str, prompts: Sequence[str], seeds: Sequence[int], folder: Path, *,
                  hook: str, steps: int, guidance: float, resolution: int, batch_size: int,
                  call_kwargs: dict[str, Any]) -> None:
    _, denoiser = denoiser_of(pipe)
    starts = list(range(0, len(prompts), batch_size))
    todo = [b for b, _ in enumerate(starts) if not (folder / f"batch_{b:04d}.safetensors").exists()]
    if len(todo) < len(starts):
        log.info("calibration pool: %d of %d batches already in %s", len(starts) - len(todo), len(starts), folder)
    for b in tqdm(todo, desc="calibration pool", unit="batch", disable=not todo):
        recorder, features = CallRecorder(denoiser), []
        handles = [denoiser.register_forward_pre_hook(recorder, with_kwargs=True)]
        if b == 0:
            handles.append(feature_module(denoiser, hook).register_forward_hook(
                lambda m, a, out: features.append(_first_tensor(out).detach().float().cpu())))
        try:
            with StepRecorder(pipe.scheduler) as stepped:
                generate_images(pipe, family, prompts[starts[b]:starts[b] + batch_size],
                                seeds[starts[b]:starts[b] + batch_size], steps=steps, guidance=guidance,
                                resolution=resolution, batch_size=batch_size, call_kwargs=call_kwargs, progress=False)
        finally:
            for h in handles:
                h.remove()
        for i, call in enumerate(recorder.calls):
            check_finite(call, i)
        if b == 0:
            save_tensors(folder / "features.safetensors", {"features": torch.stack(features)}, {})
        tensors, layout = flatten_samples([CalibSample(c, i) for i, c in enumerate(recorder.calls)])
        if stepped.final is not None:
            tensors["final"] = stepped.final
        save_tensors(folder / f"batch_{b:04d}.safetensors", tensors,
                     {"layout": layout, "trajectories": len(prompts[starts[b]:starts[b] + batch_size]),
                      "noise": stepped.coefficients, "offset": starts[b]})


@dataclass
class PoolShard:
    """One prompt batch of a pool: every denoiser call of its trajectories, their final latents
    (None when the scheduler step was not seen) and each scheduler step's noise coefficients."""

    calls: list[CalibSample]
    trajectories: int
    offset: int  # index of the batch's first trajectory in the pool
    final: torch.Tensor | None
    noise: list[tuple[float, float] | None]


def load_pool_shard(path: Path) -> PoolShard:
    """Read one shard of a pool written by :func:`capture_pool`."""
    hit = load_tensors(path)
    if hit is None:
        raise CalibrationError(f"calibration pool shard {path} is missing or unreadable: "
                               f"delete {path.parent} to recapture")
    tensors, meta = hit
    final = tensors.pop("final", None)
    return PoolShard(unflatten_samples(tensors, meta["layout"]), int(meta["trajectories"]), int(meta.get("offset", 0)),
                     final, [tuple(c) if c else None for c in meta.get("noise", [])])


def edadm_counts(features: torch.Tensor, n: int, lam: float, radius: float | None, radius_quantile: float,
                 cap: int) -> np.ndarray:
    """Items per call index from features ``[calls, rows, C, ...]`` (density + lam x diversity)."""
    t = len(features)
    flat = features.flatten(1)
    dist = torch.cdist(flat, flat).pow(2) / flat.shape[1]  # mean squared distance between calls
    off = dist[~torch.eye(t, dtype=torch.bool)]
    r = float(radius) if radius is not None else float(torch.quantile(off, radius_quantile)) if len(off) else 0.0
    density = ((dist <= r).sum(1) - 1).double()
    # [calls, rows, channels, positions]: UNet maps are [.., C, H, W], transformer tokens [.., tokens, D]
    chans = features.flatten(3) if features.dim() == 5 else features.movedim(-1, 2)
    unit = F.normalize(chans, dim=2)
    cos = torch.einsum("irkp,jrkp->ij", unit, unit) / (unit.shape[1] * unit.shape[3])
    diversity = (1 - cos).sum(1).double()

    def minmax(v: torch.Tensor) -> np.ndarray:
        span = float(v.max() - v.min())
        return ((v - v.min()) / span).numpy() if span > 0 else np.zeros(len(v))

    w = minmax(density) + lam * minmax(diversity)
    w = w + 1e-12 if w.sum() == 0 else w
    return largest_remainder(w / w.sum() * n, n, cap)


def largest_remainder(quota: np.ndarray, n: int, cap: int) -> np.ndarray:
    """Integer counts near ``quota`` summing to ``n``, none above ``cap`` (excess moves to the
    next-largest remainders)."""
    counts = np.minimum(np.floor(quota).astype(int), cap)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    while counts.sum() < n:
        room = [i for i in order if counts[i] < cap] or []
        if not room:
            raise ConfigError(f"cannot place {n} calibration samples: at most {cap * len(counts)} fit")
        for i in room[: n - counts.sum()]:
            counts[i] += 1
    return counts


def select_items(selection: str, n: int, trajectories: int, calls: int, seed: int,
                 counts: np.ndarray | None = None) -> list[tuple[int, int]]:
    """(call index, trajectory) pairs of the selection, sorted by call index."""
    pool = trajectories * calls
    if n > pool:
        raise ConfigError(f"calib.num_samples={n} is larger than the captured pool of {pool} (= {trajectories} "
                          f"trajectories x {calls} denoiser calls): lower it or raise calib.num_prompts")
    rng = np.random.default_rng(seed)
    if selection == "all_steps_random":
        flat = rng.choice(pool, size=n, replace=False)
        items = [(int(i) % calls, int(i) // calls) for i in flat]
    else:
        items = [(i, int(j)) for i, k in enumerate(counts)
                 for j in rng.choice(trajectories, size=int(k), replace=False)]
    return sorted(items)


def _rows(kwargs: dict[str, Any]) -> int:
    first = next(iter(kwargs.values()))
    return int(first.shape[0])


def trajectory_rows(kwargs: dict[str, Any], batch_trajectories: int, j: int) -> dict[str, Any]:
    """Trajectory ``j``'s rows of one call (each CFG branch's row), shared tensors as they are."""
    rows = _rows(kwargs)
    branches = rows // batch_trajectories

    def take(name: str, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: take(k, x) for k, x in v.items()}
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows and name not in UNBATCHED:
            return v.reshape(branches, batch_trajectories, *v.shape[1:])[:, j]
        return v

    return {k: take(k, v) for k, v in kwargs.items()}


def _merge(parts: list[dict[str, Any]], batched: dict[str, Any]) -> dict[str, Any]:
    """Rows of several trajectories as one call (branch-major, like the pipelines batch CFG)."""
    def merge(name: str, values: list[Any], ref: Any) -> Any:
        if isinstance(ref, dict):
            return {k: merge(k, [v[k] for v in values], ref[k]) for k in ref}
        if torch.is_tensor(ref) and ref.dim() > 0 and ref.shape[0] == _rows(batched) and name not in UNBATCHED:
            stacked = torch.stack(values, 1)  # [branches, n, ...]
            return stacked.reshape(-1, *stacked.shape[2:])
        return values[0]

    return {k: merge(k, [p[k] for p in parts], batched[k]) for k in parts[0]}


def assemble(folder: Path, items: list[tuple[int, int]], batch_size: int) -> list[CalibSample]:
    """Load the selected (call, global trajectory) items shard by shard and batch them per call index."""
    shards = sorted(folder.glob("batch_*.safetensors"))
    picked: dict[int, list[tuple[int, dict[str, Any], dict[str, Any]]]] = {}
    offset = 0
    for shard in shards:
        loaded = load_pool_shard(shard)
        calls, n_traj = loaded.calls, loaded.trajectories
        for call, traj in items:
            if offset <= traj < offset + n_traj:
                kw = calls[call].kwargs
                picked.setdefault(call, []).append((traj, trajectory_rows(kw, n_traj, traj - offset), kw))
        offset += n_traj
    samples = []
    for call in sorted(picked):
        rows = sorted(picked[call], key=lambda x: x[0])
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            samples.append(CalibSample(_merge([c[1] for c in chunk], chunk[0][2]), call))
    return samples


def trajectory_count(folder: Path) -> tuple[int, int]:
    """(trajectories, denoiser calls per trajectory) of a captured pool."""
    shards = sorted(folder.glob("batch_*.safetensors"))
    total, calls = 0, 0
    for shard in shards:
        meta = load_meta(shard)
        if meta is None:
            raise CalibrationError(f"calibration pool shard {shard} is unreadable: delete {folder} to recapture")
        total += int(meta["trajectories"])
        calls = len(meta["layout"])
    return total, calls


def step_histogram(samples: Sequence[CalibSample], calls: int) -> list[int]:
    """Denoiser input rows (CFG branches included) per call index of the trajectory."""
    hist = [0] * calls
    for s in samples:
        rows = _rows(s.kwargs)
        hist[s.step] += rows
    return hist
