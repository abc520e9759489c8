"""The sweep report: summary.csv / summary.md (grouped by method, Pareto membership per metric),
pareto.png and comparison.png, written when a multirun ends and rebuilt any time from the job
folders by ``diffq report <sweep_dir>`` (also for crashed, interrupted or still running sweeps)."""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffq.sweep.grid import comparison_grid
from diffq.sweep.pareto import pareto_mask
from diffq.sweep.plots import pareto_plot
from diffq.sweep.rows import COLUMNS, QUALITY, job_dirs, job_row, sort_rows

log = logging.getLogger(__name__)


def pareto_fronts(rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    """For each quality metric the finished jobs computed: the jobs on its Pareto front over
    (effective weight bits, effective activation bits, metric)."""
    fronts = {}
    for metric, higher in QUALITY.items():
        pts = [r for r in rows if r["status"] == "ok" and r[metric] != ""]
        if pts:
            costs = np.array([[float(r["w_bits"]), float(r["a_bits"])] for r in pts])
            mask = pareto_mask(costs, np.array([float(r[metric]) for r in pts]), higher)
            fronts[metric] = {r["job"] for r, keep in zip(pts, mask) if keep}
    return fronts


def write_report(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Rebuild summary.csv, summary.md, pareto.png and comparison.png of ``sweep_dir``; returns the rows."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {sweep_dir}: pass the folder Hydra printed (outputs/sweeps/<time>)")
    rows = sort_rows([job_row(j) for j in job_dirs(sweep_dir)])
    fronts = pareto_fronts(rows)
    for r in rows:
        r["pareto"] = ",".join(m for m, jobs in fronts.items() if r["job"] in jobs)
    with open(sweep_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(markdown_table(rows), encoding="utf-8")
    pareto_plot(rows, fronts, sweep_dir / "pareto.png")
    comparison_grid(sweep_dir, rows, sweep_dir / "comparison.png")
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """summary.md: the columns any job filled, rows as sorted (grouped by method)."""
    cols = [c for c in COLUMNS if c in ("job", "method", "status") or any(r[c] != "" for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |"
              for r in rows]
    return "\n".join(lines) + "\n"


class SummaryCallback(Callback):
    """Hydra callback writing the sweep report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:  # noqa: D102
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_report(sweep_dir)
        failed = sum(r["status"] != "ok" for r in rows)
        log.info("sweep report: %d jobs (%d not ok) -> %s (pareto.png, comparison.png)", len(rows), failed,
                 sweep_dir / "summary.md")


def main(argv: Sequence[str] | None = None) -> int:
    """``diffq report <sweep_dir>`` / ``diffq-report <sweep_dir>``: rebuild a sweep's report."""
    parser = argparse.ArgumentParser(prog="diffq report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep folder (outputs/sweeps/<time>), holding numbered job folders")
    args = parser.parse_args(argv)
    try:
        rows = write_report(args.sweep_dir)
    except FileNotFoundError as e:
        print(f"diffq report: {e}", file=sys.stderr)
        return 2
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed", "unfinished")}
    print(markdown_table(rows), end="")
    print(f"{len(rows)} jobs ({', '.join(f'{n} {s}' for s, n in counts.items())}) -> "
          f"{Path(args.sweep_dir) / 'summary.md'}, pareto.png, comparison.png")
    return 0
