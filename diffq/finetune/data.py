"""Training batches for finetuning, all drawn from a pool of the FP teacher's sampler trajectories
(:func:`diffq.calib.training_pool`, cached on disk and shared with the calibration selections):

- ``trajectory`` (on-policy, data-free): denoiser calls the teacher's sampler really made, at random
  (trajectory, step) items;
- ``noised`` (data-free): the teacher's own final latent of a trajectory, noised afresh at one of
  the sampler's timesteps (``x = a x0 + b noise``, :mod:`diffq.calib.schedule`), with that call's
  conditioning and timestep;
- ``images`` (data): the same with ``x0`` a real image of the model's world encoded by its VAE,
  the caption as prompt, and the standard diffusion target (epsilon, v or flow velocity).

An item is one trajectory's rows of one call (its CFG branches); a batch stacks items row-wise.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from diffq.calib.schedule import prediction_type
from diffq.calib.select import UNBATCHED, PoolShard, load_pool_shard, trajectory_rows
from diffq.errors import ConfigError
from diffq.registry import Registry

log = logging.getLogger(__name__)

DATA_SOURCES: Registry[Callable[..., "TrainingData"]] = Registry("finetune.data.source")


@dataclass
class TrainBatch:
    """Denoiser kwargs of one step and, for data sources, the diffusion target."""

    kwargs: dict[str, Any]
    target: torch.Tensor | None = None


def _rows(kwargs: Mapping[str, Any]) -> int:
    return int(next(iter(kwargs.values())).shape[0])


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One call from several items: per-row tensors concatenated (a shared scalar timestep becomes
    one per row, so items of different steps mix), everything else from the first item."""
    rows = [_rows(it) for it in items]

    def merge(name: str, values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, Mapping):
            return {k: merge(k, [v[k] for v in values]) for k in first}
        if not torch.is_tensor(first) or name in UNBATCHED:
            return first
        if first.dim() == 0 and name == "timestep":
            return torch.cat([v.reshape(1).expand(n) for v, n in zip(values, rows)])
        if first.dim() > 0 and all(v.shape[0] == n for v, n in zip(values, rows)):
            return torch.cat(values)
        return first

    return {k: merge(k, [it[k] for it in items]) for k in items[0]}


class Pool:
    """Every (trajectory, call) item of a pool folder, held in memory."""

    def __init__(self, folder: Path) -> None:
        paths = sorted(folder.glob("batch_*.safetensors"))
        if not paths:
            raise ConfigError(f"the trajectory pool {folder} is empty: raise finetune.data.num_prompts")
        self.shards: list[PoolShard] = [load_pool_shard(p) for p in paths]
        self.items = [(s, j, c) for s, shard in enumerate(self.shards) for j in range(shard.trajectories)
                      for c in range(len(shard.calls))]
        self.latent_key = next(iter(self.shards[0].calls[0].kwargs))

    def kwargs(self, item: tuple[int, int, int]) -> dict[str, Any]:
        """The item's denoiser kwargs (one trajectory's rows of one call)."""
        s, j, c = item
        shard = self.shards[s]
        return trajectory_rows(shard.calls[c].kwargs, shard.trajectories, j)

    def trajectory(self, item: tuple[int, int, int]) -> int:
        """The item's trajectory index in the whole pool (= its prompt's index)."""
        return self.shards[item[0]].offset + item[1]

    def final(self, item: tuple[int, int, int]) -> torch.Tensor:
        """The teacher's final latent of the item's trajectory (one row)."""
        s, j, _ = item
        shard = self.shards[s]
        if shard.final is None:
            raise ConfigError("the trajectory pool has no final latents (its scheduler step was not seen): "
                              "use finetune.data.source=trajectory")
        rows = shard.final.reshape(-1, shard.trajectories, *shard.final.shape[1:])
        return rows[0, j : j + 1]

    def coefficients(self, item: tuple[int, int, int]) -> tuple[float, float]:
        """``(a, b)`` of the item's call: its input is ``a x0 + b noise``."""
        s, _, c = item
        shard = self.shards[s]
        per_step = len(shard.calls) // max(1, len(shard.noise))
        coef = shard.noise[c // per_step] if shard.noise and len(shard.calls) % len(shard.noise) == 0 else None
        if coef is None:
            raise ConfigError("the sampler's scheduler does not expose its noise levels per step (or calls the "
                              "denoiser a varying number of times per step): use finetune.data.source=trajectory")
        return coef


class TrainingData:
    """Draws training batches from a pool; subclasses say what the latent input and target are."""

    def __init__(self, pool: Pool, **_: Any) -> None:
        self.pool = pool

    def draw(self, n: int, gen: torch.Generator) -> TrainBatch:
        """``n`` random items (with replacement) as one batch."""
        picks = torch.randint(len(self.pool.items), (n,), generator=gen).tolist()
        made = [self.item(self.pool.items[i], gen) for i in picks]
        targets = [t for _, t in made]
        return TrainBatch(collate([kw for kw, _ in made]), torch.cat(targets) if targets[0] is not None else None)

    def item(self, item: tuple[int, int, int], gen: torch.Generator) -> tuple[dict[str, Any], torch.Tensor | None]:
        """One item's kwargs and target (None: distillation only)."""
        return self.pool.kwargs(item), None


@DATA_SOURCES.register("trajectory")
class TrajectoryData(TrainingData):
    """The teacher's own sampler calls (on-policy)."""


@DATA_SOURCES.register("noised")
class NoisedData(TrainingData):
    """The teacher's final latents noised afresh at the sampler's timesteps."""

    def __init__(self, pool: Pool, **kw: Any) -> None:
        super().__init__(pool)
        probe = pool.items[0]
        pool.coefficients(probe)
        latent = pool.kwargs(probe)[pool.latent_key]
        x0 = self.clean(probe)
        if tuple(x0.shape[1:]) != tuple(latent.shape[1:]):
            raise ConfigError(f"the pipeline's final latents {tuple(x0.shape[1:])} are not in the denoiser's input "
                              f"layout {tuple(latent.shape[1:])}: use finetune.data.source=trajectory")

    def clean(self, item: tuple[int, int, int]) -> torch.Tensor:
        """The clean latent ``x0`` of the item (one row)."""
        return self.pool.final(item)

    def item(self, item: tuple[int, int, int], gen: torch.Generator) -> tuple[dict[str, Any], torch.Tensor | None]:
        kwargs = self.pool.kwargs(item)
        latent = kwargs[self.pool.latent_key]
        x0 = self.clean(item).float()
        noise = torch.randn(x0.shape, generator=gen)
        a, b = self.pool.coefficients(item)
        rows = latent.shape[0]
        kwargs[self.pool.latent_key] = (a * x0 + b * noise).expand(rows, *x0.shape[1:]).to(latent.dtype)
        return kwargs, self.target(x0, noise, a, b, rows)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, a: float, b: float, rows: int) -> torch.Tensor | None:
        """The diffusion-loss target of the item (None: distillation only)."""
        return None


@DATA_SOURCES.register("images")
class ImageData(NoisedData):
    """Real images of the model's world (VAE latents) noised at the sampler's timesteps, with the
    standard diffusion target for what the model predicts."""

    def __init__(self, pool: Pool, *, latents: torch.Tensor, prediction: str, **kw: Any) -> None:
        self.latents, self.prediction = latents, prediction
        if prediction not in ("epsilon", "v_prediction", "flow"):
            raise ConfigError(f"finetune.data.source=images: no diffusion target for prediction type {prediction!r}")
        super().__init__(pool)

    def clean(self, item: tuple[int, int, int]) -> torch.Tensor:
        k = self.pool.trajectory(item)
        return self.latents[k : k + 1]

    def target(self, x0: torch.Tensor, noise: torch.Tensor, a: float, b: float, rows: int) -> torch.Tensor:
        if self.prediction == "epsilon":
            t = noise
        elif self.prediction == "v_prediction":
            t = a * noise - b * x0
        else:
            t = noise - x0
        return t.expand(rows, *t.shape[1:])


# ----------------------------------------------------------------------------- prompts and images


@torch.no_grad()
def encode_images(pipe: Any, family: str, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """VAE latents of uint8 images in the denoiser's input layout: posterior mean, minus the VAE's
    shift, times its scaling factor (FLUX: packed 2x2 patches)."""
    vae = pipe.vae
    p = next(vae.parameters())
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    z = torch.cat([vae.encode(x[i : i + batch].to(p.device, p.dtype)).latent_dist.mean.float().cpu()
                   for i in range(0, len(x), batch)])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = (z - shift) * vae.config.scaling_factor
    if family == "flux":
        z = type(pipe)._pack_latents(z, *z.shape)
    return z


def image_data_inputs(pipe: Any, family: str, images: np.ndarray) -> dict[str, Any]:
    """The ``images`` source's extra inputs: encoded latents and the model's prediction type."""
    return {"latents": encode_images(pipe, family, images), "prediction": prediction_type(pipe.scheduler)}
