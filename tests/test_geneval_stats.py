"""GenEval uncertainty: standard errors by hand, the paired bootstrap interval, formatting."""
from __future__ import annotations

import math

import numpy as np
import pytest

from diffq.eval.geneval import Detection, score
from diffq.eval.geneval_stats import (
    format_delta,
    format_score,
    geneval_summary,
    paired_difference,
    standard_error,
    standard_errors,
    task_outcomes,
)


def test_standard_errors_by_hand():
    # entry accuracies 1, 0.5, 0: sample std 0.5 over sqrt(3 entries)
    assert standard_error(np.array([[1, 1], [0, 1], [0, 0]], bool)) == pytest.approx(0.5 / math.sqrt(3))
    # one entry: its 4 images are the units; mean 0.75, sample variance 0.75 / 3 = 0.25 -> 0.5 / 2
    assert standard_error(np.array([[1, 0, 1, 1]], bool)) == pytest.approx(0.25)
    assert math.isnan(standard_error(np.array([[True]])))
    a, b = np.array([[1, 1], [0, 1], [0, 0]], bool), np.array([[1, 0], [1, 0]], bool)
    se = standard_errors({"colors": a, "counting": b})
    assert se["tasks_se"] == {"colors": pytest.approx(0.5 / math.sqrt(3)), "counting": 0.0}
    assert se["overall_se"] == pytest.approx(math.sqrt(0.25 / 3 + 0.0) / 2)  # SE of the mean of two task means


def _pair(rng: np.random.Generator, shape: tuple[int, int], gain: float) -> tuple[np.ndarray, np.ndarray]:
    """Paired outcomes: per entry a difficulty p, per image a uniform u; FP correct when u < p,
    quantized when u < p - gain (a worse model for gain > 0, the same images)."""
    p = rng.uniform(0.2, 1.0, size=(shape[0], 1))
    u = rng.uniform(size=shape)
    return u < p, u < p - gain


def test_identical_sides_give_a_zero_interval():
    rng = np.random.default_rng(1)
    fp = {t: rng.uniform(size=(6, 4)) < 0.6 for t in ("colors", "position")}
    diff = paired_difference(fp, {t: c.copy() for t, c in fp.items()})
    assert (diff["delta"], diff["low"], diff["high"]) == (0.0, 0.0, 0.0)
    assert format_delta(diff) == "Δ 0.00 [0.00, 0.00]"


def test_known_difference_is_covered_with_the_expected_width():
    rng = np.random.default_rng(2)
    fp, quant = {}, {}
    for tag in ("single_object", "counting", "colors"):
        fp[tag], quant[tag] = _pair(rng, (24, 4), 0.1)
    diff = paired_difference(fp, quant)
    exact = np.mean([quant[t].mean() - fp[t].mean() for t in fp])
    assert diff["delta"] == pytest.approx(exact) and diff["delta"] < -0.05
    assert diff["low"] < exact < diff["high"] < 0
    # the interval's half width ~ 1.96 x the standard error of the paired difference (entry level)
    se = math.sqrt(sum(standard_error(quant[t].astype(int) - fp[t]) ** 2 for t in fp)) / len(fp)
    assert 0.8 < (diff["high"] - diff["low"]) / (2 * 1.96 * se) < 1.3
    assert paired_difference(fp, quant) == diff  # fixed seed: the same interval every time


def test_interval_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    gain = 0.15  # below every difficulty, so each image is worse with probability gain: true delta -gain
    hits = 0
    for _ in range(100):
        fp, quant = zip(*(_pair(rng, (12, 4), gain) for _ in range(4)))
        diff = paired_difference(dict(enumerate(fp)), dict(enumerate(quant)), resamples=400,
                                 seed=int(rng.integers(1 << 30)))
        hits += diff["low"] <= -gain <= diff["high"]
    assert 0.88 <= hits / 100 <= 1.0


def test_mismatched_sides_are_refused():
    a = {"colors": np.ones((2, 2), bool)}
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference(a, {"colors": np.ones((3, 2), bool)})
    with pytest.raises(ValueError, match="same tasks"):
        paired_difference(a, {"counting": np.ones((2, 2), bool)})


def test_outcomes_follow_the_scored_entries():
    mask = np.zeros((4, 4), bool)
    entries = [{"tag": "colors", "include": [{"class": "square", "count": 1}], "prompt": "p"},
               {"tag": "counting", "include": [{"class": "circle", "count": 1}], "prompt": "q"},
               {"tag": "colors", "include": [{"class": "square", "count": 1}], "prompt": "p"}]
    sq = [Detection("square", (0, 0, 2, 2), mask, "red")]
    result = score(entries, [sq, [], [], [], [], sq], images_per_prompt=2)
    outcomes = task_outcomes(result)
    assert list(outcomes) == ["colors", "counting"]
    assert outcomes["colors"].tolist() == [[True, False], [False, True]]
    assert outcomes["counting"].tolist() == [[False, False]]


def test_formatting():
    assert format_score(0.7412, 0.0213) == "0.74 ± 0.02"
    assert format_delta({"delta": -0.0104, "low": -0.031, "high": 0.0099}) == "Δ -0.01 [-0.03, 0.01]"
    # an interval ending just below zero keeps its sign
    assert format_delta({"delta": -0.017, "low": -0.031, "high": -0.0035}) == "Δ -0.02 [-0.03, -0.00]"
    block = {"fp": {"overall": 0.74, "overall_se": 0.02}, "quant": {"overall": 0.731, "overall_se": 0.021},
             "delta": {"delta": -0.009, "low": -0.03, "high": 0.012}}
    assert geneval_summary(block, "w8a8") == "FP 0.74 ± 0.02, w8a8 0.73 ± 0.02, Δ -0.01 [-0.03, 0.01]"
