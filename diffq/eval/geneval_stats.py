"""Uncertainty of GenEval scores: standard errors and the paired FP-vs-quantized difference.

A side's outcome is, per task, a boolean array ``[entries, images_per_prompt]`` (is each image
correct). A task's accuracy is its mean, the score the unweighted mean of the task accuracies.

- Standard error of a task: the sample standard deviation (ddof 1) of its units over
  ``sqrt(units)``; the units are its entries' accuracies (so both the prompts and the seeds
  count as noise), or for a task of a single entry its images. Overall: ``sqrt(sum_t se_t^2) / T``,
  the standard error of a mean of ``T`` independent task means.
- FP vs quantized: ``delta = quant - fp`` with a percentile interval from a paired bootstrap
  over the same units, stratified by task: each resample draws a task's entries (each with all
  its seeds' images) with replacement and takes the same images for both sides. An entry's
  accuracy already holds its seeds' noise, so the seeds are not drawn a second time (that
  double counts their variance: 99% coverage for a nominal 95% in a simulation).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from diffq.eval.geneval import GenEvalResult

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


def task_outcomes(result: GenEvalResult) -> dict[str, np.ndarray]:
    """Per task, whether each image is correct: bool ``[entries, images_per_prompt]``, entries in order."""
    rows: dict[str, list[tuple[bool, ...]]] = {}
    for prompt in result.prompts:
        rows.setdefault(prompt.tag, []).append(prompt.correct)
    return {tag: np.array(r, dtype=bool) for tag, r in rows.items()}


def _units(values: np.ndarray) -> np.ndarray:
    """The independent units of a task's ``[entries, images]`` values: entry means, or with a single
    entry its images."""
    return values.mean(1) if len(values) > 1 else values[0].astype(np.float64)


def standard_error(correct: np.ndarray) -> float:
    """Standard error of the accuracy of one task's ``[entries, images]`` outcomes (see module doc);
    nan for a single image."""
    units = _units(correct)
    return float(units.std(ddof=1) / math.sqrt(len(units))) if len(units) > 1 else float("nan")


def standard_errors(outcomes: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """``{"overall_se": ..., "tasks_se": {task: ...}}`` of one side's outcomes."""
    tasks = {tag: standard_error(c) for tag, c in outcomes.items()}
    overall = math.sqrt(sum(se**2 for se in tasks.values())) / len(tasks)
    return {"overall_se": overall, "tasks_se": tasks}


def paired_difference(fp: Mapping[str, np.ndarray], quant: Mapping[str, np.ndarray], resamples: int = RESAMPLES,
                      confidence: float = CONFIDENCE, seed: int = SEED) -> dict[str, Any]:
    """Quantized minus FP overall score with its bootstrap ``confidence`` interval (module doc)."""
    if list(fp) != list(quant) or any(fp[t].shape != quant[t].shape for t in fp):
        raise ValueError("FP and quantized outcomes must cover the same tasks, entries and images")
    rng = np.random.default_rng(seed)
    replicates = np.zeros(resamples)
    for tag in fp:
        units = _units(quant[tag].astype(np.float64) - fp[tag])
        replicates += units[rng.integers(len(units), size=(resamples, len(units)))].mean(1)
    replicates /= len(fp)
    delta = float(np.mean([quant[t].mean() - fp[t].mean() for t in fp]))
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"delta": delta, "low": float(low), "high": float(high), "confidence": confidence,
            "resamples": resamples, "seed": seed}


def format_score(mean: float, se: float) -> str:
    """``0.74 ± 0.02``: a score and its standard error."""
    return f"{mean:.2f} ± {se:.2f}"


def format_delta(diff: Mapping[str, float]) -> str:
    """``Δ -0.01 [-0.03, 0.01]`` from a :func:`paired_difference` result; a small negative value keeps
    its sign (``-0.00``), so an interval below zero reads as such."""
    return f"Δ {diff['delta']:.2f} [{diff['low']:.2f}, {diff['high']:.2f}]"


def geneval_summary(block: Mapping[str, Any], name: str = "quant") -> str:
    """One line of a job's ``geneval`` metric: ``FP 0.74 ± 0.02, <name> 0.73 ± 0.02, Δ -0.01 [-0.03, 0.01]``."""
    sides = [f"{label} {format_score(block[side]['overall'], block[side]['overall_se'])}"
             for side, label in (("fp", "FP"), ("quant", name))]
    return ", ".join([*sides, format_delta(block["delta"])])
