"""Sweep-end summary: one row per job in summary.csv / summary.md, plus a bits-vs-quality plot."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diffq.eval.geneval_stats import format_delta, format_score

log = logging.getLogger(__name__)

COLUMNS = [
    "job", "status", "overrides", "psnr", "ssim", "lpips", "geneval_fp", "geneval_quant", "geneval_delta",
    "fid_fp", "fid_quant", "fid_to_fp", "clip_fp", "clip_quant", "w_bits", "a_bits", "size_quant_mb", "compression",
    "calibration_s", "finetune_s", "sampling_quant_s", "error",
]


def job_row(job_dir: Path) -> dict[str, Any]:
    """Summary row of one job folder (a job without metrics.json crashed)."""
    path = job_dir / "metrics.json"
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    row.update(job=job_dir.name, overrides=" ".join(o.replace("\\", "") for o in overrides))
    if not path.exists():
        row.update(status="failed", error="no metrics.json: the job crashed (see its log)")
        return row
    m = json.loads(path.read_text())
    row["status"] = m.get("status", "failed")
    if row["status"] != "ok":
        row["error"] = m.get("error", "")
        return row
    metrics, cost, t = m["metrics"], m["cost"], m["time"]
    row.update({col: round(value, 4) for col, value in metric_columns(metrics).items()})
    if "geneval" in metrics:
        row.update(geneval_columns(metrics["geneval"]))
    row.update(
        w_bits=round(cost["effective_weight_bits"], 3), a_bits=round(cost["effective_act_bits"], 3),
        size_quant_mb=round(cost["size_quant_mb"], 4), compression=round(cost["compression"], 3),
        calibration_s=t.get("calibration_s", ""), finetune_s=t.get("finetune_s", ""),
        sampling_quant_s=t.get("sampling_quant_s", ""),
    )
    return row


def metric_columns(metrics: dict[str, Any]) -> dict[str, float]:
    """Summary columns of a job's ``metrics`` block (those it computed)."""
    picks = {"psnr": ("psnr", "quant"), "ssim": ("ssim", "quant"), "lpips": ("lpips", "quant"),
             "fid_fp": ("fid", "fp", "fid"), "fid_quant": ("fid", "quant", "fid"),
             "fid_to_fp": ("fid_fp", "quant", "fid"),
             "clip_fp": ("clip_score", "fp"), "clip_quant": ("clip_score", "quant")}
    out = {}
    for col, path in picks.items():
        value: Any = metrics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            out[col] = float(value)
    return out


def geneval_columns(block: dict[str, Any]) -> dict[str, str]:
    """GenEval columns of a job: each side's score with its standard error (``0.74 ± 0.02``) and the
    paired difference with its interval (``Δ -0.01 [-0.03, 0.01]``)."""
    return {"geneval_fp": format_score(block["fp"]["overall"], block["fp"]["overall_se"]),
            "geneval_quant": format_score(block["quant"]["overall"], block["quant"]["overall_se"]),
            "geneval_delta": format_delta(block["delta"])}


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Collect every job folder under ``sweep_dir`` into summary.csv, summary.md and summary.png."""
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    rows = [job_row(j) for j in jobs]
    with open(sweep_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(rows, sweep_dir / "summary.png")
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    ok = [r for r in rows if r["status"] == "ok" and r["psnr"] != ""]
    if not ok:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for r in ok:
        ax.scatter(r["w_bits"], r["psnr"], s=25 + 4 * (16 - min(16, float(r["a_bits"]))))
        ax.annotate(r["overrides"] or r["job"], (r["w_bits"], r["psnr"]), fontsize=6)
    ax.set_xlabel("effective weight bits")
    ax.set_ylabel("PSNR vs FP (dB)")
    ax.set_title("quality vs bits (marker size: fewer activation bits = larger)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SummaryCallback(Callback):
    """Hydra callback writing the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        failed = sum(r["status"] != "ok" for r in rows)
        log.info("sweep summary: %d jobs (%d failed) -> %s", len(rows), failed, sweep_dir / "summary.md")
