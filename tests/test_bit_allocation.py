"""Bit allocation by integer programming (MixDQ's per-group programs)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from diffq.bit_allocation import allocate_bits, feasible_range, split_budget
from diffq.errors import ConfigError


def _brute_force(sizes, scores, cands, target, band):
    w = np.asarray(sizes, float) / np.sum(sizes)
    best = None
    for choice in itertools.product(range(len(cands)), repeat=len(sizes)):
        avg = float(sum(wi * cands[c] for wi, c in zip(w, choice)))
        if abs(avg - target) <= band + 1e-12:
            s = float(sum(scores[i, c] for i, c in enumerate(choice)))
            best = s if best is None or s > best else best
    return best


@pytest.mark.parametrize("seed", range(5))
def test_ilp_finds_the_known_optimum_and_respects_the_band(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(10, 1000, 6)
    cands = [2, 4, 8]
    scores = np.sort(rng.random((6, 3)), axis=1)  # more bits, higher score
    target, band = 4.5, 0.3
    plan = allocate_bits(sizes, scores, cands, target, band)
    assert abs(plan.average - target) <= band + 1e-9
    assert plan.score == pytest.approx(_brute_force(sizes, scores, cands, target, band))
    assert set(plan.bits) <= set(cands)


def test_hand_made_instance():
    # two equal layers; the first loses a lot at 4 bits, the second almost nothing: an average of 6
    # puts the first at 8 and the second at 4
    scores = np.array([[0.1, 0.9], [0.85, 0.9]])
    plan = allocate_bits([100, 100], scores, [4, 8], 6.0, 0.01)
    assert plan.bits == [8.0, 4.0] and plan.average == 6.0


def test_forbidden_choices_and_infeasible_budgets():
    scores = np.ones((3, 2))
    allowed = np.array([[True, True], [False, True], [True, True]])  # layer 1 must keep 8 bits
    plan = allocate_bits([1, 1, 1], scores, [4, 8], 16 / 3, 0.01, allowed=allowed)
    assert plan.bits[1] == 8.0
    assert feasible_range([1, 1, 1], [4, 8], allowed) == pytest.approx((16 / 3, 8.0))
    with pytest.raises(ConfigError, match=r"out of reach.*\[5\.333, 8\.000\]"):
        allocate_bits([1, 1, 1], scores, [4, 8], 4.0, 0.02, allowed=allowed, what="quant.mixdq.weight_bits")


def test_budget_split_keeps_the_average():
    for k in (0.46, 1.0, 1.36):
        q, c = split_budget(5.0, 2.0, k)
        assert (q + 2.0 * c) / 3.0 == pytest.approx(5.0) and c == pytest.approx(k * q)
