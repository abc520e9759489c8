"""One summary row per job folder of a sweep: its status (ok, failed, unfinished), method, bits,
quality metrics, cost and wall times, read from the folder's ``config.yaml``, ``metrics.json``,
``.hydra/overrides.yaml`` and log, so a row exists for every job that started."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffq.eval.geneval_stats import format_delta, format_score

COLUMNS = [
    "job", "method", "quant", "status", "overrides", "w_bits", "a_bits", "psnr", "ssim", "lpips", "geneval",
    "geneval_fp", "geneval_quant", "geneval_delta", "fid_fp", "fid_quant", "fid_to_fp", "clip_fp", "clip_quant",
    "size_quant_mb", "compression", "calibration_s", "finetune_s", "sampling_quant_s", "pareto", "error",
]
# quality columns a sweep is judged on, with whether higher is better
QUALITY = {"psnr": True, "ssim": True, "lpips": False, "geneval": True, "fid_to_fp": False, "fid_quant": False,
           "clip_quant": True}


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (Hydra's numbered subfolders), in job order."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def method_label(cfg: dict[str, Any]) -> str:
    """The method a job ran, from its resolved config: ``quant.method`` plus its reconstruction,
    calibration selection and finetuning recipe when they are on (``rtn+block``, ``rtn+block+quest``)."""
    q, parts = cfg.get("quant", {}), []
    parts.append(str(q.get("method", "?")))
    if q.get("recon", "none") not in ("none", None):
        parts.append(str(q["recon"]))
    selection = cfg.get("calib", {}).get("selection", "uniform")
    if selection != "uniform":
        parts.append(str(selection))
    ft = cfg.get("finetune", {})
    if ft.get("name", "none") != "none" and ft.get("steps", 1):
        parts.append(str(ft["name"]))
    return "+".join(dict.fromkeys(parts))  # a recipe named like its method appears once


def job_row(job_dir: Path) -> dict[str, Any]:
    """Summary row of one job folder: ``ok``; ``failed`` (the error it recorded, or the last error line
    of its log); ``unfinished`` (started, no result yet: running, interrupted or killed)."""
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.exists() else []
    row.update(job=job_dir.name, overrides=" ".join(o.replace("\\", "") for o in overrides))
    config_file = job_dir / "config.yaml"
    if config_file.exists():
        cfg = OmegaConf.to_container(OmegaConf.load(config_file))
        row.update(method=method_label(cfg), quant=cfg.get("quant", {}).get("name", ""))
    path = job_dir / "metrics.json"
    if not path.exists():
        error = last_error(job_dir)
        row.update(status="failed" if error else "unfinished",
                   error=error or "no metrics.json: still running, interrupted or killed (see its log)")
        return row
    m = json.loads(path.read_text())
    row["status"] = m.get("status", "failed")
    if row["status"] != "ok":
        row["error"] = m.get("error", "")
        return row
    metrics, cost, t = m["metrics"], m["cost"], m["time"]
    row["method"] = row["method"] or m.get("method", "")
    row["quant"] = m.get("quant", row["quant"])
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


def last_error(job_dir: Path) -> str:
    """The last line of the job's Hydra log that reports an error ("" when there is none)."""
    for log_file in sorted(job_dir.glob("*.log")):
        lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if "ERROR" in ln or "Error:" in ln]
        if lines:
            return lines[-1].strip()[:500]
    return ""


def metric_columns(metrics: dict[str, Any]) -> dict[str, float]:
    """Summary columns of a job's ``metrics`` block (those it computed)."""
    picks = {"psnr": ("psnr", "quant"), "ssim": ("ssim", "quant"), "lpips": ("lpips", "quant"),
             "fid_fp": ("fid", "fp", "fid"), "fid_quant": ("fid", "quant", "fid"),
             "fid_to_fp": ("fid_fp", "quant", "fid"), "geneval": ("geneval", "quant", "overall"),
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


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by method (methods in order of first appearance), most bits first within a
    method; failed and unfinished jobs last, in job order."""
    ok = [r for r in rows if r["status"] == "ok"]
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in ok))}
    ok.sort(key=lambda r: (order[r["method"]], -float(r["w_bits"]), -float(r["a_bits"]), int(r["job"])))
    return ok + [r for r in rows if r["status"] != "ok"]


def objective_values(metrics: dict[str, Any], names: list[str]) -> list[float]:
    """A finished job's values of the summary columns ``names`` (what a sweeper optimises);
    ConfigError naming the ones the job did not compute."""
    from diffq.errors import ConfigError

    values = {**metric_columns(metrics["metrics"]), "w_bits": metrics["cost"]["effective_weight_bits"],
              "a_bits": metrics["cost"]["effective_act_bits"], "size_quant_mb": metrics["cost"]["size_quant_mb"]}
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"sweep.objectives {missing} were not computed by this job: choose from {sorted(values)} "
                          "(a quality metric needs its eval.metrics entry)")
    return [float(values[n]) for n in names]
