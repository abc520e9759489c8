"""The sweep's Pareto plot: each quality metric against effective weight bits, one point per
configuration (mean over its seeds, 95% interval as error bars), one series per method, the
Pareto-optimal configurations (weight bits, activation bits, quality) circled."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from diffq.sweep.rows import QUALITY

LABELS = {"psnr": "PSNR vs FP (dB)", "ssim": "SSIM vs FP", "lpips": "LPIPS vs FP", "geneval": "GenEval",
          "fid_to_fp": "FID to FP", "fid_quant": "FID", "clip_quant": "CLIP score"}


def half_widths(rows: list[dict[str, Any]], metric: str) -> np.ndarray:
    """The 95% half-widths of ``metric`` over configuration rows (0 where there is no interval)."""
    return np.array([(float(r[f"{metric}_hi"]) - float(r[f"{metric}_lo"])) / 2 if r[f"{metric}_lo"] != "" else 0.0
                     for r in rows])


def point_label(label: str, method: str) -> str:
    """A point's annotation: its label without the method and with each override's key shortened to
    its last part (``sweep.bits.attn=8`` -> ``attn=8``), wrapped to 22 characters a line."""
    short = re.sub(r"(?<![\w.])[\w]+(?:\.[\w]+)+=", lambda m: m.group(0).rsplit(".", 1)[1], label)
    return "\n".join(textwrap.wrap(short.removeprefix(method).strip(), 22))


def pareto_plot(rows: list[dict[str, Any]], fronts: dict[str, set[str]], path: Path) -> bool:
    """Write ``path`` from configuration rows (one panel per quality metric they computed; ``fronts``:
    the Pareto-optimal labels per metric); False when none has one."""
    ok = [r for r in rows if r["status"] == "ok"]
    metrics = [m for m in QUALITY if any(r[m] != "" for r in ok)]
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in ok))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for i, method in enumerate(methods):
            pts = [r for r in ok if r["method"] == method and r[metric] != ""]
            if not pts:
                continue
            x, y = (np.array([float(r[c]) for r in pts]) for c in ("w_bits", metric))
            ax.errorbar(x, y, xerr=half_widths(pts, "w_bits"), yerr=half_widths(pts, metric), fmt="none",
                        ecolor=f"C{i % 10}", elinewidth=0.8, capsize=2, alpha=0.85)
            ax.scatter(x, y, s=[18 + 3 * (16 - min(16, float(r["a_bits"]))) for r in pts], color=f"C{i % 10}",
                       label=method, alpha=0.85)
            for r, xi, yi in zip(pts, x, y):
                ax.annotate(point_label(r["label"], method), (xi, yi), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        front = sorted((r for r in ok if r["label"] in fronts.get(metric, set())), key=lambda r: float(r["w_bits"]))
        ax.scatter([float(r["w_bits"]) for r in front], [float(r[metric]) for r in front], s=160, facecolors="none",
                   edgecolors="black", linewidths=1.2, label="Pareto front")
        ax.set(xlabel="effective weight bits", ylabel=LABELS[metric] + ("" if QUALITY[metric] else " (lower better)"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("quality vs bits, mean over seeds with 95% intervals\n(marker size: fewer activation bits = "
                 "larger; circled: Pareto-optimal in weight bits, activation bits and the metric)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
