"""Timestep-aware activation quantizers: one set of calibrated parameters per group of sampler steps.

A static activation's range drifts over the sampling trajectory; QuEST's code (and TDQ, PTQ4DM's
follow-ups) keep a separate range for each group of timesteps. ``timestep_groups: G`` on an
activation's :class:`~diffq.tensor_quant.TensorQuant` builds a :class:`TimestepGroupedQuantizer`:
``G`` ordinary quantizers and the timestep values that separate their groups.

The denoiser's timestep reaches the quantizers through :class:`TimestepRouter`, a forward
pre-hook on the denoiser (installed by :func:`diffq.model_quant.prepare`) that hands every
grouped quantizer the per-row timestep of the call. Rows of one batch may come from different
steps (finetuning and reconstruction batches mix them): each row is quantized with its own
group's parameters. The boundaries are set from the calibration set's timesteps
(:func:`set_boundaries`: its distinct timesteps, in sampling order, split into ``G`` contiguous
groups of equal count, a boundary halfway between neighbouring groups) and are buffers, so an
export carries them and a reloaded model switches groups exactly as the quantized one did.

Two ways to start the groups (``timestep_init``): ``own`` calibrates each group on its own steps'
calls and needs :data:`MIN_CALLS_PER_GROUP` distinct timesteps in each (one step's range is a poor
range for the neighbouring steps the group also covers); ``shared`` (QuEST's code) gives every group
the range of the whole calibration set, so the groups differ only once training has separated them,
and is meant for one group per calibration timestep (``calib.num_steps`` = the sampler's steps).
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from diffq.errors import CalibrationError
from diffq.quantizer import Quantizer

__all__ = ["MIN_CALLS_PER_GROUP", "TIMESTEP_INITS", "TimestepGroupedQuantizer", "TimestepRouter", "grouped_quantizers",
           "install_router", "router_of",
           "set_boundaries", "call_timesteps"]


TIMESTEP_INITS = ("own", "shared")
MIN_CALLS_PER_GROUP = 2  # distinct calibration timesteps each group needs with timestep_init=own


class TimestepGroupedQuantizer(nn.Module):
    """``G`` static activation quantizers (``parts``), each used for the rows whose timestep falls in
    its group; ``boundaries`` (``G - 1`` descending timestep values) separate the groups."""

    kind = "act"

    def __init__(self, parts: Sequence[Quantizer], shared_init: bool = False) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.shared_init = shared_init  # calibration: every group observes every call
        self.register_buffer("boundaries", torch.empty(0))
        self.timesteps: torch.Tensor | None = None  # per-row timesteps of the current call (set by the router)

    @property
    def dynamic(self) -> bool:
        """Always False: every group has static, calibrated parameters."""
        return False

    @property
    def needs_calibration(self) -> bool:
        """Whether the groups have ranges to calibrate."""
        return self.parts[0].needs_calibration

    @property
    def groups(self) -> int:
        """Number of timestep groups."""
        return len(self.parts)

    def group_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The group index of each timestep (0: the noisiest, first-sampled group)."""
        if self.boundaries.numel() != self.groups - 1:
            raise CalibrationError(f"timestep groups of {self.parts[0].name or '<unnamed>'} have no boundaries: "
                                   "calibrate the model (or load a calibrated export) before using it")
        t = timesteps.detach().reshape(-1, 1).to(self.boundaries.device, self.boundaries.dtype)
        return (self.boundaries.reshape(1, -1) > t).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize each row of ``x`` with the parameters of its timestep's group."""
        if self.timesteps is None:
            raise CalibrationError(f"{self.parts[0].name or 'a timestep-grouped quantizer'} ran outside a denoiser "
                                   "call: its group comes from the denoiser's timestep (install_router(denoiser))")
        if self.shared_init and self.parts[0].calibrating:
            for part in self.parts:
                part(x)
            return x
        index = self.group_of(self.timesteps)
        groups = index.unique()
        if groups.numel() == 1:
            return self.parts[int(groups)](x)
        if index.numel() != x.shape[0]:
            raise CalibrationError(f"{self.parts[0].name}: a batch mixing timestep groups must have one row per "
                                   f"timestep ({index.numel()}), got a tensor of {x.shape[0]} rows")
        index = index.to(x.device)
        out = torch.zeros_like(x)
        for g in groups.tolist():  # the groups present in this batch (inference: one)
            rows = (index == g).nonzero().squeeze(1)
            out = out.index_copy(0, rows, self.parts[g](x.index_select(0, rows)))
        return out

    def extra_repr(self) -> str:
        return f"{self.groups} timestep groups: {self.parts[0].extra_repr()}"


def grouped_quantizers(model: nn.Module) -> list[TimestepGroupedQuantizer]:
    """Every timestep-grouped quantizer of ``model``."""
    return [m for m in model.modules() if isinstance(m, TimestepGroupedQuantizer)]


def call_timesteps(timestep: Any, rows: int) -> torch.Tensor:
    """A denoiser call's timestep argument as one value per row (a scalar is shared by all rows)."""
    t = torch.as_tensor(timestep).detach().reshape(-1).float()
    return t.expand(rows) if t.numel() == 1 else t


class TimestepRouter:
    """Forward pre-hook on a denoiser: gives its grouped quantizers the call's per-row timesteps."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.signature = inspect.signature(denoiser.forward)
        self.quantizers = grouped_quantizers(denoiser)
        self.timesteps: torch.Tensor | None = None
        self.handle = denoiser.register_forward_pre_hook(self, with_kwargs=True)

    def route(self, timesteps: torch.Tensor | None) -> None:
        """Use ``timesteps`` (one per row) for the next forwards."""
        self.timesteps = timesteps
        for q in self.quantizers:
            q.timesteps = timesteps

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        first = next(iter(bound.values()))
        if "timestep" not in bound:
            raise CalibrationError(f"{type(module).__name__} was called without a timestep: timestep-grouped "
                                   "activation quantizers need it")
        self.route(call_timesteps(bound["timestep"], int(first.shape[0])))

    def remove(self) -> None:
        """Detach the hook."""
        self.handle.remove()


def install_router(denoiser: nn.Module) -> TimestepRouter | None:
    """Route the denoiser's timesteps to its grouped quantizers (None when it has none); replaces a
    router installed before."""
    old = router_of(denoiser)
    if old is not None:
        old.remove()
    router = TimestepRouter(denoiser) if grouped_quantizers(denoiser) else None
    denoiser.__dict__["_diffq_router"] = router
    return router


def router_of(model: nn.Module) -> TimestepRouter | None:
    """The router installed on ``model``, if any."""
    return model.__dict__.get("_diffq_router")


def _sampling_order(values: torch.Tensor) -> np.ndarray:
    return np.sort(np.unique(values.numpy()))[::-1]


def set_boundaries(model: nn.Module, timesteps: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> None:
    """Set every grouped quantizer's boundaries from the calibration calls' ``timesteps``: their
    distinct values in sampling order (descending) split into contiguous groups of equal count.
    CalibrationError when there are fewer distinct timesteps than groups."""
    quantizers = grouped_quantizers(model)
    if not quantizers:
        return
    values = _sampling_order(torch.cat([t.reshape(-1).float().cpu() for t in timesteps]))
    for g in sorted({q.groups for q in quantizers}):
        if len(values) < g:
            raise CalibrationError(f"{g} timestep groups need calibration calls at {g} or more timesteps, but the "
                                   f"calibration set has {len(values)}; fix: raise calib.num_steps (or "
                                   "calib.num_samples) to at least the number of groups, or lower timestep_groups")
        chunks = np.array_split(values, g)
        own = [q for q in quantizers if q.groups == g and not q.shared_init]
        if own and min(len(c) for c in chunks) < MIN_CALLS_PER_GROUP:
            raise CalibrationError(f"{g} timestep groups calibrated on their own steps need {MIN_CALLS_PER_GROUP} or "
                                   f"more distinct calibration timesteps each, but the calibration set has "
                                   f"{len(values)} in all; fix: raise calib.num_steps to at least "
                                   f"{MIN_CALLS_PER_GROUP * g}, or start every group from one calibration "
                                   "(quant.act.timestep_init=shared)")
        bounds = torch.tensor([(a[-1] + b[0]) / 2 for a, b in zip(chunks[:-1], chunks[1:])], dtype=torch.float32)
        for q in quantizers:
            if q.groups == g:
                q.boundaries = bounds.to(q.boundaries.device, copy=True)
