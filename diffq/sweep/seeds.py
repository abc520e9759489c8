"""Seeds in a sweep: one row per configuration (a job's overrides minus its seed keys) with each
metric's mean and Student-t 95% interval over its seeds, and differences against a baseline
configuration (paired by seed when both ran the same seeds, Welch otherwise), significant only
when their interval excludes zero."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats

from diffq.sweep.rows import GENEVAL_TEXT, NUMERIC, QUALITY

CONFIDENCE = 0.95
STATS = [c for m in NUMERIC for c in (m, f"{m}_lo", f"{m}_hi", f"{m}_n")]
DIFFS = [c for m in QUALITY for c in (f"d_{m}", f"d_{m}_lo", f"d_{m}_hi", f"d_{m}_sig")]
SUMMARY = ["label", "jobs", "seeds", "method", "quant", "status", "overrides", *STATS, *GENEVAL_TEXT, "pairing",
           *DIFFS, "pareto", "error"]


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width ``t_{0.975, n-1} * sd / sqrt(n)`` of ``values`` (half nan for fewer than 2)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(stats.t.ppf(0.5 + CONFIDENCE / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def difference(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> dict[str, Any]:
    """``a - b`` from the ``(seed, value)`` of two configurations' jobs: per-seed differences and their
    t-interval over the seeds both ran (``paired``: at least 2, each once per side), else Welch's
    interval of the difference of means; ``significant`` when the interval excludes zero (None
    without an interval)."""
    da, db = dict(a), dict(b)
    common = sorted(da.keys() & db.keys())
    if len(common) >= 2 and len(da) == len(a) and len(db) == len(b):
        delta, half = t_interval(np.array([da[s] for s in common]) - np.array([db[s] for s in common]))
        kind, n = "paired", f"{len(common)} seeds"
    else:
        xa, xb = np.array([v for _, v in a]), np.array([v for _, v in b])
        delta, half = float(xa.mean() - xb.mean()), welch_half(xa, xb)
        kind, n = "" if math.isnan(half) else "unpaired (Welch)", f"{xa.size} vs {xb.size} seeds"
    significant = None if math.isnan(half) else abs(delta) > half
    return {"delta": delta, "lo": delta - half, "hi": delta + half, "significant": significant,
            "pairing": f"{kind}, {n}" if kind else n}


def welch_half(xa: np.ndarray, xb: np.ndarray) -> float:
    """Half-width of Welch's 95% interval of ``mean(xa) - mean(xb)`` (nan when a side has fewer than 2)."""
    if min(xa.size, xb.size) < 2:
        return math.nan
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    if va + vb == 0:
        return 0.0
    df = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df) * math.sqrt(va + vb))


def configuration_rows(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per configuration of the finished jobs (in order of first job), each numeric
    column's mean with ``_lo``/``_hi`` (empty for one seed) and ``_n``; private ``_jobs`` (their rows)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in jobs:
        if r["status"] == "ok":
            groups.setdefault(r["label"], []).append(r)
    out = []
    for label, members in groups.items():
        first = members[0]
        row: dict[str, Any] = {c: "" for c in SUMMARY}
        row.update(label=label, jobs=" ".join(r["job"] for r in members), seeds=" ".join(r["seed"] for r in members),
                   method=first["method"], quant=first["quant"], status="ok", _jobs=members,
                   overrides=" ".join(f"{k}={v}" for k, v in first["_config"].items()))
        for m in NUMERIC:
            values = [float(r[m]) for r in members if r[m] != ""]
            if values:
                mean, half = t_interval(np.array(values))
                row.update({m: round(mean, 4), f"{m}_n": len(values)})
                if not math.isnan(half):
                    row.update({f"{m}_lo": round(mean - half, 4), f"{m}_hi": round(mean + half, 4)})
        if len(members) == 1:
            row.update({c: first[c] for c in GENEVAL_TEXT})
        out.append(row)
    return out


def add_differences(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> None:
    """Fill each other row's ``d_<metric>`` columns (quality metrics both computed) and ``pairing``
    with its difference to ``baseline``."""
    def by_seed(row: dict[str, Any], m: str) -> list[tuple[str, float]]:
        return [(r["seed"], float(r[m])) for r in row["_jobs"] if r[m] != ""]

    for row in rows:
        if row is baseline or row["status"] != "ok":
            continue
        for m in QUALITY:
            a, b = by_seed(row, m), by_seed(baseline, m)
            if not a or not b:
                continue
            d = difference(a, b)
            row.update({f"d_{m}": round(d["delta"], 4), "pairing": d["pairing"]})
            if d["significant"] is not None:
                row.update({f"d_{m}_lo": round(d["lo"], 4), f"d_{m}_hi": round(d["hi"], 4),
                            f"d_{m}_sig": "significant" if d["significant"] else "within noise"})
