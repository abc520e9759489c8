"""Range observers: how a quantizer turns observed tensors into a range (or a scale statistic).

Each observer is a small class registered in :data:`OBSERVERS` under its ``observer:`` name.
An observer sees grouped views (see :mod:`diffq.layout`) batch by batch and, at the end of
calibration, gives the format's parameters; dynamic quantizers use :meth:`Observer.batch_range`
and :meth:`Observer.params` on every call instead.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from diffq.errors import ConfigError
from diffq.formats import EPS, Format
from diffq.layout import Layout
from diffq.registry import Registry

__all__ = ["OBSERVERS", "Observer", "make_observer"]

RESERVOIR_ROWS = 4096  # activation rows an MSE search keeps (uniform reservoir)
QUANTILE_MAX = 2**24  # elements a quantile is computed over (strided subsample above)
MSE_ALPHAS = torch.cat([torch.linspace(0.1, 1.2, 100), torch.ones(1)])  # 1.0 = plain min-max


class Observer:
    """Min-max range, global over batches or an EMA ``running = m*running + (1-m)*batch`` (``momentum=m``)."""

    dynamic_ok = True  # usable for ranges computed at run time

    def __init__(self, layout: Layout, symmetric: bool, percentile: float = 99.99, momentum: float | None = None):
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100] (got {percentile}); e.g. 99.99")
        self.layout, self.symmetric = layout, symmetric
        self.percentile, self.momentum = percentile, momentum
        self.reset()

    def reset(self) -> None:
        """Forget what was observed."""
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.count = 0

    def batch_range(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """(lo, hi) of one grouped view per kept group."""
        dims = self.layout.reduce_dims
        if self.symmetric:
            hi = v.abs().amax(dims, keepdim=True)
            return -hi, hi
        return v.amin(dims, keepdim=True), v.amax(dims, keepdim=True)

    def update(self, v: Tensor) -> None:
        """Fold one batch into the running statistic."""
        self.update_range(*self.batch_range(v))

    def update_range(self, lo: Tensor, hi: Tensor) -> None:
        """Fold one batch's range into the running statistic."""
        self.count += 1
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.momentum is None:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            m = self.momentum
            self.lo, self.hi = m * self.lo + (1 - m) * lo, m * self.hi + (1 - m) * hi

    def result(self) -> tuple[Tensor, Tensor]:
        """The calibrated (lo, hi)."""
        assert self.lo is not None and self.hi is not None
        return self.lo, self.hi

    def params(self, fmt: Format, lo: Tensor, hi: Tensor, given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The format's parameters for the range ``[lo, hi]`` (``given``: ones calibrated already)."""
        return fmt.params_from_range(lo, hi, self.symmetric, given)

    def finish(self, fmt: Format) -> dict[str, Tensor]:
        """Parameters from everything observed."""
        return self.params(fmt, *self.result())


class _Averaged(Observer):
    """A per-batch statistic averaged over batches."""

    def update_range(self, lo: Tensor, hi: Tensor) -> None:
        self.count += 1
        self.lo = lo if self.lo is None else self.lo + lo
        self.hi = hi if self.hi is None else self.hi + hi

    def result(self) -> tuple[Tensor, Tensor]:
        lo, hi = super().result()
        return lo / self.count, hi / self.count


class Percentile(_Averaged):
    """Per-batch ``percentile`` quantile (of |x| when symmetric), averaged over batches."""

    def batch_range(self, v: Tensor) -> tuple[Tensor, Tensor]:
        flat, kept = self.layout.flatten(v)
        flat = flat[:, :: math.ceil(flat.numel() / QUANTILE_MAX)]
        p = self.percentile / 100.0
        if self.symmetric:
            hi = torch.quantile(flat.abs(), p, dim=1)
            return -hi.reshape(kept), hi.reshape(kept)
        lo, hi = torch.quantile(flat, torch.tensor([1.0 - p, p], device=flat.device), dim=1)
        return lo.reshape(kept), hi.reshape(kept)


class AbsMean(_Averaged):
    """The scale itself is mean ``|x|`` (BitNet's ternary rule); symmetric only."""

    def __init__(self, layout: Layout, symmetric: bool, **options: object):
        if not symmetric:
            raise ConfigError(f"observer {type(self).__name__.lower()} is symmetric only; "
                              "set symmetric=true or use minmax")
        super().__init__(layout, symmetric, **options)  # type: ignore[arg-type]

    def statistic(self, flat: Tensor) -> Tensor:
        """Per kept row of ``flat`` [kept, reduced]."""
        return flat.abs().mean(1)

    def batch_range(self, v: Tensor) -> tuple[Tensor, Tensor]:
        flat, kept = self.layout.flatten(v)
        hi = self.statistic(flat).reshape(kept)
        return -hi, hi

    def params(self, fmt: Format, lo: Tensor, hi: Tensor, given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return {"scale": hi.clamp_min(EPS)}


class AbsMedian(AbsMean):
    """The scale itself is median ``|x|``."""

    def statistic(self, flat: Tensor) -> Tensor:
        return flat.abs().median(1).values


class TWN(AbsMean):
    """Ternary weight networks' rule: threshold ``0.7 * mean|x|`` and the least-squares scale
    ``mean(|x| : |x| > threshold)``; with the grid's round-to-nearest the zero band is
    ``scale / 2``, close to the threshold for bell-shaped weights."""

    def statistic(self, flat: Tensor) -> Tensor:
        a = flat.abs()
        kept = a > 0.7 * a.mean(1, keepdim=True)
        return (a * kept).sum(1) / kept.sum(1).clamp_min(1)


class LSQ(AbsMean):
    """LSQ's step-size initialisation ``2 * mean|x| / sqrt(Qp)``, ``Qp`` the format's largest level
    (7 for int4, 127 for int8), as BinaryDM's activation quantizer (``_ActQ``) sets its step; symmetric
    only. Static: ``mean|x|`` of each calibration batch (one denoiser call), averaged over the batches,
    so the step is the mean of the steps the batches give one by one (the released ``_ActQ`` re-sets
    its step from every batch it sees, its ``init_scale`` flag never being set, so there is no single
    first-batch value to copy). Dynamic (``dynamic: true``): each call's own step, with no gradient
    through the statistic (the released code copies it into the step's ``.data``)."""

    def params(self, fmt: Format, lo: Tensor, hi: Tensor, given: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        return {"scale": (2.0 * hi.detach() / math.sqrt(fmt.maxval)).clamp_min(EPS)}


class MSE(Observer):
    """Min-max range, then per kept group the ``alpha`` in [0.1, 1.2] (and 1.0) of it minimising the
    fake-quant squared error on the observed data (weights: the tensor; activations: a uniform
    reservoir of up to 4096 rows)."""

    dynamic_ok = False

    def reset(self) -> None:
        super().reset()
        self.sample: Tensor | None = None
        self.keys: Tensor | None = None
        self.gen = torch.Generator().manual_seed(0)

    def update(self, v: Tensor) -> None:
        super().update(v)
        if self.layout.kind == "weight":
            self.sample = v
            return
        keys = torch.rand(v.shape[0], generator=self.gen)
        if self.sample is not None and self.keys is not None:
            v, keys = torch.cat([self.sample, v]), torch.cat([self.keys, keys])
        if v.shape[0] > RESERVOIR_ROWS:
            keep = keys.topk(RESERVOIR_ROWS, largest=False).indices
            v, keys = v[keep], keys[keep]
        self.sample, self.keys = v, keys

    def finish(self, fmt: Format) -> dict[str, Tensor]:
        lo, hi = self.result()
        v = self.sample
        assert v is not None
        dims = [d + 1 for d in self.layout.reduce_dims]
        chunk = max(1, QUANTILE_MAX // max(v.numel(), 1))
        candidates = MSE_ALPHAS.to(v.device)
        errors = []
        for alphas in candidates.split(chunk):
            a = alphas.view(-1, 1, 1, 1)
            trial = self.params(fmt, a * lo, a * hi)
            err = fmt.fake_quant(v[None], trial) - v
            errors.append(err.square().sum(dims, keepdim=True))
        best = candidates[torch.cat(errors).argmin(0)]
        return self.params(fmt, best * lo, best * hi)


OBSERVERS: Registry[type[Observer]] = Registry("observer")
OBSERVERS.register("minmax")(Observer)
OBSERVERS.register("percentile")(Percentile)
OBSERVERS.register("mse")(MSE)
OBSERVERS.register("absmean")(AbsMean)
OBSERVERS.register("absmedian")(AbsMedian)
OBSERVERS.register("twn")(TWN)
OBSERVERS.register("lsq")(LSQ)


def make_observer(name: str, layout: Layout, symmetric: bool, dynamic: bool = False, **options: object) -> Observer:
    """The observer ``name`` for tensors of ``layout`` (ConfigError for unknown names, or for one that
    cannot follow ``dynamic`` ranges)."""
    cls = OBSERVERS.get(name)
    if dynamic and not cls.dynamic_ok:
        raise ConfigError(f"observer {name} searches once at calibration; use minmax or percentile with dynamic ranges")
    return cls(layout, symmetric, **options)  # type: ignore[arg-type]
