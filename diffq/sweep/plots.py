"""The sweep's Pareto plot: each quality metric against effective weight bits, one series per
method, the Pareto-optimal jobs (weight bits, activation bits, quality) circled."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from diffq.sweep.rows import QUALITY

LABELS = {"psnr": "PSNR vs FP (dB)", "ssim": "SSIM vs FP", "lpips": "LPIPS vs FP", "geneval": "GenEval",
          "fid_to_fp": "FID to FP", "fid_quant": "FID", "clip_quant": "CLIP score"}


def pareto_plot(rows: list[dict[str, Any]], fronts: dict[str, set[str]], path: Path) -> bool:
    """Write ``path`` (one panel per quality metric the jobs computed); False when no job has one."""
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
            ax.scatter([r["w_bits"] for r in pts], [r[metric] for r in pts], s=[18 + 3 * (16 - min(16, r["a_bits"]))
                       for r in pts], color=f"C{i % 10}", label=method, alpha=0.85)
            for r in pts:
                ax.annotate(f"{r['quant']} A{r['a_bits']:.3g}", (r["w_bits"], r[metric]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        front = sorted((r for r in ok if r["job"] in fronts.get(metric, set())), key=lambda r: r["w_bits"])
        ax.scatter([r["w_bits"] for r in front], [r[metric] for r in front], s=160, facecolors="none",
                   edgecolors="black", linewidths=1.2, label="Pareto front")
        ax.set(xlabel="effective weight bits", ylabel=LABELS[metric] + ("" if QUALITY[metric] else " (lower better)"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("quality vs bits (marker size: fewer activation bits = larger; circled: Pareto-optimal in "
                 "weight bits, activation bits and the metric)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
