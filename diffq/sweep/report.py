"""The sweep report: summary.csv / summary.md (one row per configuration, each metric's mean and 95%
interval over its seeds, differences vs a baseline configuration, Pareto membership per metric, grouped
by method), jobs.csv (one row per job), pareto.png and comparison.png, written when a multirun ends and
rebuilt any time from the job folders of one or several sweeps by ``diffq report`` (also for crashed,
interrupted or still running sweeps)."""
from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffq.sweep.grid import comparison_grid
from diffq.sweep.pareto import pareto_mask
from diffq.sweep.plots import pareto_plot
from diffq.sweep.rows import COLUMNS, GENEVAL_TEXT, NUMERIC, QUALITY, job_dirs, job_row, set_labels
from diffq.sweep.seeds import SUMMARY, add_differences, configuration_rows

log = logging.getLogger(__name__)

# column headers of the markdown tables, and decimals shown
NAMES = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "geneval": "GenEval-shapes", "fid_fp": "FID (FP)",
         "fid_quant": "FID", "fid_to_fp": "FID-to-FP", "clip_fp": "CLIP score (FP)", "clip_quant": "CLIP score",
         "w_bits": "W bits", "a_bits": "A bits", "w_stored_bits": "W stored bits",
         "size_quant_mb": "size MB", "compression": "compression",
         "calibration_s": "calibration s", "finetune_s": "finetune s", "sampling_quant_s": "sampling s", "n": "seeds"}
DECIMALS = {"psnr": 2, "ssim": 3, "lpips": 3, "geneval": 3, "fid_fp": 1, "fid_quant": 1, "fid_to_fp": 1,
            "clip_fp": 2, "clip_quant": 2, "w_bits": 2, "a_bits": 2, "w_stored_bits": 2,
            "size_quant_mb": 3, "compression": 2,
            "calibration_s": 1, "finetune_s": 1, "sampling_quant_s": 1}


def pareto_fronts(rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    """For each quality metric the finished configurations computed: the labels on its Pareto front over
    (mean weight bits, mean activation bits, mean metric)."""
    fronts = {}
    for metric, higher in QUALITY.items():
        pts = [r for r in rows if r["status"] == "ok" and r[metric] != ""]
        if pts:
            costs = np.array([[float(r["w_bits"]), float(r["a_bits"])] for r in pts])
            mask = pareto_mask(costs, np.array([float(r[metric]) for r in pts]), higher)
            fronts[metric] = {r["label"] for r, keep in zip(pts, mask) if keep}
    return fronts


def sweep_folders(sweep_dirs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The sweep folders as paths; FileNotFoundError for one that is not there."""
    dirs = [Path(sweep_dirs)] if isinstance(sweep_dirs, (str, Path)) else [Path(d) for d in sweep_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(f"no sweep folder {d}: pass the folder Hydra printed (outputs/sweeps/<time>)")
        if not job_dirs(d):
            what = "a single run's folder" if (d / "metrics.json").exists() or (d / "config.yaml").exists() else \
                "not a sweep folder"
            raise FileNotFoundError(f"no job folders found in {d} ({what}): pass a sweep folder "
                                    "(outputs/sweeps/<time>, holding the numbered job folders 0/, 1/, ...)")
    return dirs


def job_rows(dirs: list[Path]) -> list[dict[str, Any]]:
    """The labelled rows of every job of ``dirs``, in job order (named ``<sweep>/<num>`` with several)."""
    rows = [job_row(j, f"{d.name}/{j.name}" if len(dirs) > 1 else None) for d in dirs for j in job_dirs(d)]
    set_labels(rows)
    return rows


def summary_rows(jobs: list[dict[str, Any]], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per configuration (grouped by method in order of first appearance, most bits first), its
    differences vs ``baseline`` (a label; default the first job's configuration) and Pareto membership,
    then one row per failed or unfinished job. ValueError for a baseline no configuration has."""
    rows = configuration_rows(jobs)
    if baseline is not None and baseline not in {r["label"] for r in rows}:
        raise ValueError(f"no configuration labelled {baseline!r}; labels: {', '.join(r['label'] for r in rows)}")
    base = next((r for r in rows if r["label"] == baseline), rows[0] if len(rows) > 1 else None)
    if base is not None:
        add_differences(rows, base)
        base["pairing"] = "baseline"
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    rows.sort(key=lambda r: (order[r["method"]], -float(r["w_bits"]), -float(r["a_bits"])))
    fronts = pareto_fronts(rows)
    for r in rows:
        r["pareto"] = ",".join(m for m, labels in fronts.items() if r["label"] in labels)
    failed = [{**{c: "" for c in SUMMARY}, **{c: r[c] for c in ("label", "method", "quant", "status", "error")},
               "jobs": r["job"], "seeds": r["seed"], "overrides": " ".join(f"{k}={v}" for k, v in r["_config"].items())}
              for r in jobs if r["status"] != "ok"]
    return rows + failed


REPORT_FILES = ("summary.md", "summary.csv", "jobs.csv", "pareto.png", "comparison.png")


def write_report(sweep_dirs: str | Path | Sequence[str | Path], out: str | Path | None = None,
                 baseline: str | None = None) -> list[dict[str, Any]]:
    """Rebuild summary.csv, summary.md, jobs.csv, pareto.png and comparison.png of the jobs of
    ``sweep_dirs`` in ``out`` (default: the one sweep folder); returns the summary rows."""
    dirs = sweep_folders(sweep_dirs)
    if out is None and len(dirs) > 1:
        raise ValueError("several sweep folders: say where their merged report goes (--out)")
    out = Path(out) if out is not None else dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    jobs = job_rows(dirs)
    rows = summary_rows(jobs, baseline)
    for name, columns, table in (("summary.csv", SUMMARY, rows), ("jobs.csv", COLUMNS, jobs)):
        with open(out / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table)
    (out / "summary.md").write_text(summary_markdown(rows), encoding="utf-8")
    ok = [r for r in rows if r["status"] == "ok"]
    pareto_plot(ok, pareto_fronts(ok), out / "pareto.png")
    comparison_grid([j for r in ok for j in r["_jobs"]], out / "comparison.png")
    return rows


def cell(row: dict[str, Any], metric: str) -> str:
    """``43.36 ± 0.12`` (mean ± 95% half-width), the mean alone for one seed or no spread, "" when not
    computed."""
    if metric == "n":
        return str(len(row["_jobs"])) if row["status"] == "ok" else ""
    if row[metric] == "":
        return ""
    d = DECIMALS[metric]
    mean = float(row[metric])
    half = (float(row[f"{metric}_hi"]) - float(row[f"{metric}_lo"])) / 2 if row[f"{metric}_lo"] != "" else 0.0
    return f"{mean:.{d}f} ± {half:.{d}f}" if half else f"{mean:.{d}f}"


def diff_cell(row: dict[str, Any], metric: str) -> str:
    """``+0.53 [+0.21, +0.85] significant`` / ``... within noise``; ``+0.53 (no interval)`` for one seed."""
    if row[f"d_{metric}"] == "":
        return ""
    d = DECIMALS[metric]
    delta = f"{float(row[f'd_{metric}']):+.{d}f}"
    if row[f"d_{metric}_sig"] == "":
        return f"{delta} (no interval)"
    return f"{delta} [{float(row[f'd_{metric}_lo']):+.{d}f}, {float(row[f'd_{metric}_hi']):+.{d}f}] " \
           f"{row[f'd_{metric}_sig']}"


def table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table (``|`` in cells escaped)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, body)]) + "\n"


def results_markdown(rows: list[dict[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """The README's table format: a configuration column, then ``metrics`` (default: the quality
    metrics any configuration computed, W/A bits, and the seed count when any has several) as
    ``mean ± half``. ValueError for an unknown metric."""
    ok = [r for r in rows if r["status"] == "ok"]
    if metrics is None:
        metrics = [m for m in (*QUALITY, "w_bits", "a_bits") if any(r[m] != "" for r in ok)]
        metrics += ["w_stored_bits"] if any(r["w_stored_bits"] != r["w_bits"] for r in ok) else []
        metrics = ["n", *metrics] if any(len(r["_jobs"]) > 1 for r in ok) else metrics
    unknown = [m for m in metrics if m not in NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(NAMES)}")
    return table(["configuration", *(NAMES[m] for m in metrics)], [[r["label"], *(cell(r, m) for m in metrics)]
                                                                    for r in ok])


def differences_markdown(rows: list[dict[str, Any]], always: bool = False) -> str:
    """The differences vs the baseline configuration (quality metrics), "" when there is none or
    (unless ``always``) no difference has an interval."""
    base = next((r for r in rows if r["pairing"] == "baseline"), None)
    others = [r for r in rows if r["status"] == "ok" and r is not base]
    if base is None or not (always or any(r[f"d_{m}_sig"] for r in others for m in QUALITY)):
        return ""
    metrics = [m for m in QUALITY if any(r[f"d_{m}"] != "" for r in others)]
    return (f"Differences vs `{base['label']}`: mean [95% interval], significant when the interval excludes "
            "zero\n\n" + table(["configuration", "pairing", *(NAMES[m] for m in metrics)],
                               [[r["label"], r["pairing"], *(diff_cell(r, m) for m in metrics)] for r in others]))


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """summary.md: every configuration with the columns any row filled (``mean ± half``), the failed
    and unfinished jobs, then the differences vs the baseline when they have intervals."""
    metrics = [m for m in NUMERIC if any(r[m] != "" for r in rows)
               and (m != "w_stored_bits" or any(r[m] != r["w_bits"] for r in rows))]  # shown where they differ
    text = [c for c in (*GENEVAL_TEXT, "pareto", "error") if any(r[c] != "" for r in rows)]
    body = [[r["label"], r["jobs"], cell(r, "n"), r["status"], *(cell(r, m) for m in metrics), *(r[c] for c in text)]
            for r in rows]
    main = table(["configuration", "jobs", "seeds", "status", *(NAMES[m] for m in metrics), *text], body)
    diffs = differences_markdown(rows)
    return main + ("\n" + diffs if diffs else "")


def job_counts(rows: list[dict[str, Any]]) -> str:
    """``7 jobs (4 ok, 2 failed, 1 unfinished) in 3 configurations`` from summary rows."""
    ok = [r for r in rows if r["status"] == "ok"]
    counts = {"ok": sum(len(r["_jobs"]) for r in ok), **{s: sum(r["status"] == s for r in rows)
                                                          for s in ("failed", "unfinished")}}
    return (f"{sum(counts.values())} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}) in "
            f"{len(ok)} configuration{'s' * (len(ok) != 1)}")


class SummaryCallback(Callback):
    """Hydra callback writing the sweep report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_report(sweep_dir)
        log.info("sweep report: %s -> %s (pareto.png, comparison.png)", job_counts(rows), sweep_dir / "summary.md")


def main(argv: Sequence[str] | None = None) -> int:
    """``diffq report <sweep_dir> [<sweep_dir> ...]``: rebuild the report of one sweep, or merge several
    (seeds run as separate sweeps) into ``--out``; ``--markdown`` prints the README table instead."""
    parser = argparse.ArgumentParser(
        prog="diffq report", description="Rebuild a sweep's report from its job folders (one row per configuration, "
        "mean and 95% interval over seeds), or merge several sweeps' jobs by configuration.")
    parser.add_argument("sweep_dirs", nargs="+", metavar="sweep_dir",
                        help="sweep folders (outputs/sweeps/<time>) holding numbered job folders; several are "
                             "merged, their jobs grouped by configuration")
    parser.add_argument("--markdown", action="store_true",
                        help="print the results table in the README's format (and the differences table with "
                             "--baseline); write nothing")
    parser.add_argument("--metrics", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                        help=f"columns of --markdown, comma-separated, from: {', '.join(NAMES)}")
    parser.add_argument("--baseline", help="label of the configuration differences are taken against "
                                           "(default: the first job's)")
    parser.add_argument("--out", help="folder of the report files (default: the sweep folder; needed for several)")
    args = parser.parse_args(argv)
    try:
        if args.markdown or (len(args.sweep_dirs) > 1 and args.out is None):
            rows = summary_rows(job_rows(sweep_folders(args.sweep_dirs)), args.baseline)
            if args.markdown:
                diffs = differences_markdown(rows, always=True) if args.baseline else ""
                print(results_markdown(rows, args.metrics) + ("\n" + diffs if diffs else ""), end="")
                return 0
            print(summary_markdown(rows), end="")
            print(f"{job_counts(rows)}; nothing written: pass --out DIR for the merged report files")
            return 0
        started = time.time()
        rows = write_report(args.sweep_dirs, args.out, args.baseline)
    except (FileNotFoundError, ValueError) as e:
        print(f"diffq report: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.sweep_dirs[0])
    written = [n for n in REPORT_FILES if (out / n).exists() and (out / n).stat().st_mtime >= started - 1]
    print(summary_markdown(rows), end="")
    print(f"{job_counts(rows)} -> {out}: {', '.join(written)}"
          + (f" (no {', '.join(n for n in REPORT_FILES if n not in written)}: no finished job to draw)"
             if len(written) < len(REPORT_FILES) else ""))
    return 0
