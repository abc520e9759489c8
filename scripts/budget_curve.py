"""Quality against finetuning steps from sweep or run folders (`experiment=finetune_budget`):
one PNG with the held-out distillation loss of every job against its steps (left) and PSNR /
GenEval-shapes / FID-to-FP at the end of each job against its budget (right, mean and 95% interval
over the seeds present), plus the same numbers as a markdown table on stdout.

    python scripts/budget_curve.py outputs/sweeps/<time> [more folders] --out assets/budget/ternary_flux.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from diffq.sweep.rows import metric_columns  # noqa: E402
from diffq.sweep.seeds import t_interval  # noqa: E402

METRICS = {"psnr": "PSNR vs FP (dB)", "geneval": "GenEval-shapes", "fid_to_fp": "FID-to-FP", "clip_quant": "CLIP score"}


def job_folders(paths: list[Path]) -> list[Path]:
    """Every folder with a metrics.json under the given sweep or run folders."""
    return sorted({p.parent for root in paths for p in [root / "metrics.json", *root.glob("*/metrics.json")]
                   if p.exists()})


def job_point(folder: Path) -> dict:
    """Steps, seed, final metrics and the validation curve of one finished job."""
    m = json.loads((folder / "metrics.json").read_text())
    cfg = OmegaConf.load(folder / "config.yaml")
    ft = m.get("finetune") or {}
    geneval = (m.get("metrics") or {}).get("geneval") or {}
    return {"steps": int(cfg.finetune.steps), "seed": int(cfg.get("seed", 0)), "val_curve": ft.get("val_curve") or [],
            **{k: None for k in METRICS}, **metric_columns(m.get("metrics") or {}),
            "fp": {"geneval": geneval.get("fp", {}).get("overall"),
                   "clip_quant": metric_columns(m.get("metrics") or {}).get("clip_fp")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    points = [job_point(f) for f in job_folders(args.folders)]
    if not points:
        raise SystemExit(f"no finished jobs (metrics.json) under {', '.join(map(str, args.folders))}")
    budgets = sorted({p["steps"] for p in points})
    fig, axes = plt.subplots(1, 1 + len(METRICS), figsize=(4 * (1 + len(METRICS)), 3.4))
    for p in points:
        if p["val_curve"]:
            s, v = np.array(p["val_curve"]).T
            axes[0].plot(s, v, marker=".", label=f"{p['steps']} steps, seed {p['seed']}")
    axes[0].set(xscale="symlog", yscale="log", xlabel="step", ylabel="held-out distillation loss")
    axes[0].legend(fontsize=7)
    print("| steps | seeds | " + " | ".join(METRICS.values()) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    cells: dict[int, list[str]] = {b: [] for b in budgets}
    for ax, (key, name) in zip(axes[1:], METRICS.items()):
        means, halves = [], []
        for b in budgets:
            vals = np.array([p[key] for p in points if p["steps"] == b and p[key] is not None], dtype=float)
            mean, half = t_interval(vals) if len(vals) else (float("nan"), float("nan"))
            means.append(mean)
            halves.append(half if np.isfinite(half) else 0.0)
            cells[b].append(f"{mean:.3g}" + (f" ± {half:.2g}" if len(vals) > 1 and np.isfinite(half) else ""))
        ax.errorbar(budgets, means, yerr=halves, marker="o", capsize=3)
        fp = next((p["fp"].get(key) for p in points if p["fp"].get(key) is not None), None)
        if fp is not None:
            ax.axhline(fp, color="gray", ls="--", lw=1, label=f"FP {fp:.3g}")
            ax.legend(fontsize=7)
        ax.set(xscale="log", xlabel="finetuning steps", ylabel=name)
        ax.set_xticks(budgets, [str(b) for b in budgets], minor=False)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for b in budgets:
        n = len({p["seed"] for p in points if p["steps"] == b})
        print(f"| {b} | {n} | " + " | ".join(cells[b]) + " |")
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
