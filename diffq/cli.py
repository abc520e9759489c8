"""The Hydra app: ``python -m diffq [group=option ...] [key=value ...]`` (``-m`` for sweeps)."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from diffq.config import register_configs
from diffq.errors import DiffqError
from diffq.eval.geneval_stats import geneval_summary
from diffq.sweep import main as report_main
from diffq.sweep.rows import objective_values

log = logging.getLogger("diffq")

register_configs()


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def task(cfg: DictConfig) -> dict | None:
    """Run one job. In a sweep a failing job is recorded (status failed) and the sweep goes on."""
    from diffq.job import run, write_failure, write_metrics  # here, not at the top: `diffq report` needs no models

    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    logging.getLogger("diffq").setLevel(cfg.log_level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        metrics = run(cfg, out_dir)
    except Exception as e:  # noqa: BLE001 - every failure is reported, the sweep must go on
        write_failure(out_dir, e, _overrides())
        if hc.mode != RunMode.MULTIRUN:
            if isinstance(e, DiffqError):
                log.error("%s", e)
                sys.exit(2)
            raise
        log.error("job failed: %s\n%s", e, traceback.format_exc())
        return None
    if metrics["status"] == "worker":  # another process of an accelerate launch writes the results
        return None
    metrics["overrides"] = _overrides()
    write_metrics(out_dir, metrics)
    fid, cost = metrics["fidelity"], metrics["cost"]
    geneval = metrics["metrics"].get("geneval")
    log.info(
        "done: %s", ", ".join(f"{k} {v['mean']:.3f}" for k, v in fid.items())
        + (f", GenEval {geneval_summary(geneval, metrics['label'])}" if geneval else "")
        + f", W {cost['effective_weight_bits']:.2f} bits (stored {cost['stored_weight_bits']:.2f}),"
        + f" A {cost['effective_act_bits']:.2f} bits"
        + f" -> {out_dir}",
    )
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://diffq.conf", config_name="config")
def app(cfg: DictConfig) -> list[float] | None:
    """The Hydra app: one job; returns the ``sweep.objectives`` values to a sweeper that optimises them."""
    metrics = task(cfg)
    if metrics is None or not cfg.sweep.objectives:
        return None
    return objective_values(metrics, list(cfg.sweep.objectives))


def main() -> None:
    """Entry point of ``python -m diffq`` and the ``diffq`` console script; ``diffq report <sweep_dir> ...``
    rebuilds (or merges) sweep reports instead (``--markdown``: the README table)."""
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        sys.exit(report_main(sys.argv[2:]))
    app()
