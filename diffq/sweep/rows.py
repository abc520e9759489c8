"""One row per job folder of a sweep: its status (ok, failed, unfinished), method, bits, seed,
configuration (overrides minus seed keys), quality metrics, cost and wall times, read from the
folder's ``config.yaml``, ``metrics.json``, ``.hydra/overrides.yaml`` and log, so a row exists for
every job that started."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from diffq.errors import ConfigError
from diffq.eval.geneval_stats import format_delta, format_score
from diffq.formats import make_format

# numeric columns: averaged over seeds with a 95% interval in the summary
NUMERIC = ["w_bits", "a_bits", "w_stored_bits", "psnr", "ssim", "lpips", "geneval", "fid_fp", "fid_quant", "fid_to_fp",
           "clip_fp", "clip_quant", "size_quant_mb", "compression", "calibration_s", "finetune_s", "sampling_quant_s"]
GENEVAL_TEXT = ["geneval_fp", "geneval_quant", "geneval_delta"]  # one job's GenEval scores with their errors
COLUMNS = ["job", "label", "method", "quant", "status", "seed", "overrides", *NUMERIC, *GENEVAL_TEXT, "error"]
# quality columns a sweep is judged on, with whether higher is better
QUALITY = {"psnr": True, "ssim": True, "lpips": False, "geneval": True, "fid_to_fp": False, "fid_quant": False,
           "clip_quant": True}
# overrides the W/A bits of a label already show
BITS_KEYS = {"quant.weight.bits", "quant.act.bits", "quant.mixdq.weight_bits", "quant.mixdq.act_bits"}


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep (Hydra's numbered subfolders), in job order."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def is_seed_key(key: str) -> bool:
    """Whether an override key only reseeds a job (``seed``, ``calib.seed``, ``finetune.data.val_seed``)."""
    last = key.rsplit(".", 1)[-1]
    return last == "seed" or last.endswith("_seed")


def override_items(overrides: list[str]) -> dict[str, str]:
    """``{key: value}`` of Hydra overrides (``+``/``~`` prefixes dropped), in their order."""
    items = {}
    for o in overrides:
        key, _, value = o.partition("=")
        items[key.lstrip("+~")] = value
    return items


def bits_label(quant: dict[str, Any]) -> str:
    """``W4A8``: the formats' bits per element (MixDQ: its target averages); a floating-point side reads
    16, a side whose rules set other widths per layer ``mixed`` (``Wmixed A8``: the report's bit columns
    hold the averages)."""
    if quant.get("method") == "mixdq":
        w, a = float(quant["mixdq"]["weight_bits"]), float(quant["mixdq"]["act_bits"])
        return f"W{w:.3g}A{a:.3g}"
    sides = []
    for side, letter in (("weight", "W"), ("act", "A")):
        base = quant[side]
        mixed = any(_other_width(r, side, base) for r in quant.get("rules") or [])
        sides.append(f"{letter}mixed" if mixed else f"{letter}{element_bits(base):.3g}")
    return " ".join(sides) if any(s.endswith("mixed") for s in sides) else "".join(sides)


EDGE_ROLES = {"conv_in", "conv_out", "time_embed"}  # first / last layers the papers keep at 8 bits or FP


def _other_width(rule: dict[str, Any], side: str, base: dict[str, Any]) -> bool:
    """Whether a rule gives the layers it matches (beyond the edge layers) another width on ``side``."""
    if rule.get("skip") or not isinstance(rule.get(side), dict) or _edge_only(rule):
        return False
    return element_bits({**base, **rule[side]}) != element_bits(base)


def _edge_only(rule: dict[str, Any]) -> bool:
    """Whether a rule only touches the edge layers (which a preset's W/A label leaves out)."""
    return bool(rule.get("roles")) and set(rule["roles"]) <= EDGE_ROLES and not rule.get("names")


def element_bits(tq: dict[str, Any]) -> float:
    """Bits per element of a tensor's format (16 when it stays floating point)."""
    fmt = make_format(tq["format"], tq["bits"], exp=tq.get("exp"), man=tq.get("man"),
                      symmetric=tq.get("symmetric", True))
    return 16.0 if fmt is None else fmt.element_bits


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


def job_row(job_dir: Path, name: str | None = None) -> dict[str, Any]:
    """Row of one job folder (``job``: ``name``, default the folder's): ``ok``; ``failed`` (the error it
    recorded, or the last error line of its log); ``unfinished`` (started, no result yet: running,
    interrupted or killed). Private keys: ``_config`` (the non-seed overrides, ``{key: value}``),
    ``_bits`` (``W4A8``, "" without a readable config) and ``_dir`` (the folder); :func:`set_labels`
    fills ``label``."""
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = [o.replace("\\", "") for o in OmegaConf.to_container(OmegaConf.load(overrides_file))] \
        if overrides_file.exists() else []
    items = override_items(overrides)
    seeds = {k: v for k, v in items.items() if is_seed_key(k)}
    row.update(job=name or job_dir.name, overrides=" ".join(overrides), _dir=job_dir, _bits="",
               _config={k: v for k, v in items.items() if not is_seed_key(k)})
    config_file = job_dir / "config.yaml"
    if config_file.exists():
        cfg = OmegaConf.to_container(OmegaConf.load(config_file))
        quant = cfg.get("quant", {})
        row.update(method=method_label(cfg), quant=quant.get("name", ""))
        try:
            row["_bits"] = bits_label(quant)
        except (ConfigError, KeyError, TypeError):  # a config from another version: no bits in the label
            pass
        if "seed" in cfg:
            seeds.setdefault("seed", str(cfg["seed"]))
    row["seed"] = " ".join(f"{k}={v}" for k, v in sorted(seeds.items()))
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
        w_bits=round(weight_bits_of(cost)[0], 3), a_bits=round(cost["effective_act_bits"], 3),
        w_stored_bits=round(weight_bits_of(cost)[1], 3),
        size_quant_mb=round(cost["size_quant_mb"], 4), compression=round(cost["compression"], 3),
        calibration_s=t.get("calibration_s", ""), finetune_s=t.get("finetune_s", ""),
        sampling_quant_s=t.get("sampling_quant_s", ""),
    )
    return row


def weight_bits_of(cost: dict[str, Any]) -> tuple[float, float]:
    """(the formats' bits, the stored bits) per weight of a job's cost block; run folders written before
    the two were split hold the stored bits as ``effective_weight_bits`` and the formats' bits as
    ``information_weight_bits`` where they differ."""
    if "stored_weight_bits" in cost:
        return cost["effective_weight_bits"], cost["stored_weight_bits"]
    return cost.get("information_weight_bits", cost["effective_weight_bits"]), cost["effective_weight_bits"]


def set_labels(rows: list[dict[str, Any]]) -> None:
    """Each row's ``label``: method, W/A bits and the non-seed overrides that vary across ``rows`` (bit
    widths the W/A bits show left out, and the preset ``quant=`` while the labels stay distinct
    without it); different configurations always get different labels."""
    configs: dict[tuple, dict[str, Any]] = {}  # one row per configuration, one with a readable config first
    for r in sorted(rows, key=lambda r: not r["_bits"]):
        configs.setdefault(tuple(sorted(r["_config"].items())), r)
    keys = list(dict.fromkeys(k for r in rows for k in r["_config"]))
    varying = [k for k in keys if len({r["_config"].get(k) for r in configs.values()}) > 1]

    def label(r: dict[str, Any], shown: list[str], hide_bits: bool = True) -> str:
        parts = [r["method"], r["_bits"], *(f"{k}={r['_config'][k]}" for k in shown if k in r["_config"]
                                             and not (hide_bits and r["_bits"] and k in BITS_KEYS))]
        return " ".join(p for p in parts if p) or f"job {r['job']}"

    for shown, hide in (([k for k in varying if k != "quant"], True), (varying, True), (keys, False)):
        labels = {c: label(r, shown, hide) for c, r in configs.items()}
        if len(set(labels.values())) == len(labels):
            break
    for r in rows:
        r["label"] = labels[tuple(sorted(r["_config"].items()))]


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


def objective_values(metrics: dict[str, Any], names: list[str]) -> list[float]:
    """A finished job's values of the summary columns ``names`` (what a sweeper optimises);
    ConfigError naming the ones the job did not compute."""
    from diffq.errors import ConfigError

    cost = metrics["cost"]
    values = {**metric_columns(metrics["metrics"]), "w_bits": cost["effective_weight_bits"],
              "a_bits": cost["effective_act_bits"], "w_stored_bits": cost["stored_weight_bits"],
              "size_quant_mb": cost["size_quant_mb"]}
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"sweep.objectives {missing} were not computed by this job: choose from {sorted(values)} "
                          "(a quality metric needs its eval.metrics entry)")
    return [float(values[n]) for n in names]
