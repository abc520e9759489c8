"""Per-layer bit-widths under an average-bits budget by integer programming (MixDQ), solved with
``scipy.optimize.milp`` (HiGHS).

One binary ``x[i, b]`` per (layer, candidate bit-width); each layer takes exactly one; the
size-weighted average of the chosen bits (parameter counts for weights, input elements for
activations) lies within ``band`` of the target; the summed sensitivity scores of the choices
(higher is better: SSIM or SQNR with only that layer quantized at that width) are maximised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from diffq.errors import ConfigError


@dataclass
class Allocation:
    """The chosen bit-width per layer, the objective (summed scores) and the solver's status."""

    bits: list[float]
    score: float
    average: float
    status: str


def feasible_range(sizes: Sequence[float], candidates: Sequence[float], allowed: np.ndarray | None = None) -> tuple:
    """The lowest and highest size-weighted average bits any one-choice-per-layer plan reaches."""
    c = np.asarray(candidates, float)
    mask = np.ones((len(sizes), len(c)), bool) if allowed is None else np.asarray(allowed, bool)
    w = np.asarray(sizes, float) / float(np.sum(sizes))
    lo = float(sum(wi * c[m].min() for wi, m in zip(w, mask)))
    hi = float(sum(wi * c[m].max() for wi, m in zip(w, mask)))
    return lo, hi


def allocate_bits(sizes: Sequence[float], scores: np.ndarray, candidates: Sequence[float], target: float,
                  band: float = 0.02, allowed: np.ndarray | None = None, what: str = "bits") -> Allocation:
    """Maximise ``sum scores[i, choice_i]`` with the size-weighted average bits in
    ``[target - band, target + band]`` (``allowed[i, b]`` False forbids a choice). ConfigError,
    naming the feasible range, when no plan meets the band."""
    scores = np.asarray(scores, float)
    n, m = scores.shape
    c = np.asarray(candidates, float)
    if m != len(c) or n != len(sizes):
        raise ValueError(f"scores {scores.shape} do not match {len(sizes)} layers x {len(c)} candidates")
    lo, hi = feasible_range(sizes, c, allowed)
    if target + band < lo or target - band > hi:
        shown = ", ".join(f"{x:g}" for x in c)
        raise ConfigError(f"{what}: an average of {target:g} is out of reach: with candidates [{shown}] the "
                          f"average lies in [{lo:.3f}, {hi:.3f}]; pick a target in that range")
    w = np.asarray(sizes, float) / float(np.sum(sizes))
    one_each = LinearConstraint(np.kron(np.eye(n), np.ones(m)), 1, 1)
    budget = LinearConstraint(np.outer(w, c).reshape(1, -1), target - band, target + band)
    upper = np.ones(n * m) if allowed is None else np.asarray(allowed, float).reshape(-1)
    res = milp(-np.nan_to_num(scores, nan=-1e9).reshape(-1), constraints=[one_each, budget],
               integrality=np.ones(n * m), bounds=Bounds(0, upper))
    if res.x is None:
        raise ConfigError(f"{what}: no plan meets an average of {target:g} ± {band:g} bits ({res.message}); "
                          f"widen the band or move the target inside [{lo:.3f}, {hi:.3f}]")
    choice = np.round(res.x).reshape(n, m).argmax(1)
    bits = c[choice]
    return Allocation([float(b) for b in bits], float(scores[np.arange(n), choice].sum()), float(w @ bits),
                      str(res.message))


def split_budget(bits: float, ratio: float, k: float) -> tuple[float, float]:
    """MixDQ's split of an average budget between the quality and the content group: with ``ratio``
    = content size / quality size, ``b_quality = bits (1 + ratio) / (k ratio + 1)`` and
    ``b_content = k b_quality`` (the size-weighted average of the two is ``bits``)."""
    quality = bits * (1 + ratio) / (k * ratio + 1)
    return quality, k * quality
