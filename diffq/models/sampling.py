"""What a job samples with (steps, guidance, resolution) and what identifies the FP model's outputs."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffq.cache import cache_key


@dataclass
class Sampling:
    """Sampler settings after applying sampler overrides to the model defaults."""

    steps: int
    guidance: float
    resolution: int
    batch_size: int
    call_kwargs: dict[str, Any]

    def sampler_kwargs(self, **changes: Any) -> dict[str, Any]:
        """The keywords the sampler functions take (``generate_images``, ``generate_samples``,
        ``capture_trajectories``, ``training_pool``...), with ``changes`` (e.g. ``steps=2``) applied."""
        return {"steps": self.steps, "guidance": self.guidance, "resolution": self.resolution,
                "batch_size": self.batch_size, "call_kwargs": self.call_kwargs, **changes}


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
