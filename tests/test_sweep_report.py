"""The sweep report from job folders: statuses (ok, failed, crashed, unfinished), grouping by method,
Pareto fronts, plots, the comparison grid, ``diffq report``, and sweeps through the joblib and
submitit_local launchers."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffq.sweep import write_report
from diffq.sweep.pareto import pareto_mask
from diffq.sweep.report import pareto_fronts

TINY = ["model=tiny_sd15", "eval.prompts=[a photo of a red circle,a photo of two blue squares]",
        "calib.num_prompts=2", "calib.num_steps=2", "model.steps=3"]


def test_pareto_mask_on_a_hand_made_table():
    # costs (bits), quality: (4, 20) and (8, 30) are optimal; (8, 25) is dominated by (8, 30);
    # (6, 19) by (4, 20); two equal optimal points are both kept
    costs = np.array([[4.0], [8.0], [8.0], [6.0], [4.0]])
    quality = np.array([20.0, 30.0, 25.0, 19.0, 20.0])
    assert pareto_mask(costs, quality).tolist() == [True, True, False, False, True]
    # lower is better (FID): (4, 50) and (8, 10) optimal, (6, 60) dominated
    assert pareto_mask(np.array([[4.0], [8.0], [6.0]]), np.array([50.0, 10.0, 60.0]), False).tolist() == [
        True, True, False]
    # two costs: W8A16 does not dominate W8A8 (fewer activation bits is a cost advantage)
    two = np.array([[8.0, 16.0], [8.0, 8.0], [8.0, 8.0]])
    assert pareto_mask(two, np.array([40.0, 35.0, 30.0])).tolist() == [True, True, False]


def _samples(root: Path, values: list[float]) -> None:
    for i, v in enumerate(values):
        (root / f"{i:05d}" / "samples").mkdir(parents=True, exist_ok=True)
        (root / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps({"prompt": f"p{i}"}))
        Image.fromarray(np.full((8, 8, 3), int(v * 255), np.uint8)).save(root / f"{i:05d}" / "samples" / "00000.png")


def _job(sweep: Path, num: int, *, quant: str, method: str = "rtn", recon: str = "none", finetune: str = "none",
         metrics: dict | None = None, log: str = "") -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml([f"quant={quant}"]))
    cfg = {"quant": {"name": quant, "method": method, "recon": recon}, "calib": {"selection": "uniform"},
           "finetune": {"name": finetune, "steps": 10 if finetune != "none" else 0}}
    (job / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if log:
        (job / "diffq.log").write_text(log)
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def _ok(sweep: Path, num: int, quant: str, w: float, a: float, psnr: float, **kw) -> None:
    job = sweep / str(num)
    _samples(job / "samples", [0.2 + 0.1 * num, 0.5])
    m = {"status": "ok", "quant": quant, "method": kw.get("method", "rtn"),
         "metrics": {"psnr": {"quant": psnr}, "ssim": {"quant": psnr / 100}},
         "cost": {"effective_weight_bits": w, "effective_act_bits": a, "size_quant_mb": w / 8, "compression": 16 / w},
         "time": {"calibration_s": 1.0}, "samples": {"fp": str(sweep / "fp"), "quant": str(job / "samples")},
         "prompts": ["p0", "p1"]}
    _job(sweep, num, quant=quant, metrics=m, **kw)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    s = tmp_path / "sweep"
    _samples(s / "fp", [0.9, 0.1])
    _ok(s, 0, "w8a8", 8.0, 8.0, 40.0)
    _ok(s, 1, "w4a8", 4.0, 8.0, 25.0)
    _ok(s, 2, "brecq_w4a8", 4.0, 8.0, 30.0, recon="block")  # dominates job 1
    _job(s, 3, quant="w2a8", metrics={"status": "failed", "error": "ConfigError: int bits must be in 2..8"})
    _job(s, 4, quant="w3a8", log="[2026-01-01][diffq][ERROR] - job failed: RuntimeError: out of memory\n")
    _job(s, 5, quant="w6a8")  # started, no result: running or interrupted
    _ok(s, 6, "w6a8", 6.0, 8.0, 35.0)
    return s


def test_report_groups_by_method_marks_the_front_and_keeps_every_job(sweep):
    rows = write_report(sweep)
    assert [(r["job"], r["method"], r["status"]) for r in rows] == [
        ("0", "rtn", "ok"), ("6", "rtn", "ok"), ("1", "rtn", "ok"), ("2", "rtn+block", "ok"),
        ("3", "rtn", "failed"), ("4", "rtn", "failed"), ("5", "rtn", "unfinished")]
    by_job = {r["job"]: r for r in rows}
    assert "int bits must be in 2..8" in by_job["3"]["error"]
    assert "out of memory" in by_job["4"]["error"]
    assert "interrupted" in by_job["5"]["error"]
    assert by_job["0"]["pareto"] == "psnr,ssim" and by_job["2"]["pareto"] == "psnr,ssim"
    assert by_job["6"]["pareto"] == "psnr,ssim" and by_job["1"]["pareto"] == ""
    assert pareto_fronts(rows)["psnr"] == {"0", "2", "6"}
    table = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["job"] for r in table] == ["0", "6", "1", "2", "3", "4", "5"] and table[0]["psnr"] == "40.0"
    md = (sweep / "summary.md").read_text()
    assert md.count("\n") == 9 and "| rtn+block |" in md and "geneval" not in md.splitlines()[0]
    for name in ("pareto.png", "comparison.png"):
        assert Image.open(sweep / name).size[0] > 200


def test_comparison_grid_rows_are_fp_then_each_finished_job(sweep):
    write_report(sweep)
    grid = np.asarray(Image.open(sweep / "comparison.png").convert("L")).astype(float)
    # FP plus the four finished jobs: five rows of 128-pixel cells below the caption band
    assert grid.shape[0] == 12 * 3 + 6 + 5 * 128
    cell = lambda row, col: grid[42 + row * 128 + 60, 90 + col * 128 + 60]  # noqa: E731
    assert abs(cell(0, 0) - round(0.9 * 255)) <= 1 and abs(cell(0, 1) - round(0.1 * 255)) <= 1
    assert abs(cell(1, 0) - int(0.2 * 255)) <= 1  # job 0's first image (rows follow the sorted table)
    assert abs(cell(2, 0) - int(0.8 * 255)) <= 1  # job 6


def test_diffq_report_command_rebuilds_an_interrupted_sweep(sweep):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "diffq", "report", str(sweep)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "7 jobs (4 ok, 2 failed, 1 unfinished)" in res.stdout and (sweep / "pareto.png").exists()
    res = subprocess.run([sys.executable, "-m", "diffq", "report", str(sweep / "nope")], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 2 and "no sweep folder" in res.stderr


def _sweep_cli(tmp_path: Path, launcher: list[str]) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIFFQ_CACHE_DIR": str(tmp_path / "cache")}  # nothing cached yet
    out = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "diffq", "-m", f"hydra.sweep.dir={out}", *launcher, *TINY,
                          "quant.weight.bits=8,3", "quant.weight.granularity=channel"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return list(csv.DictReader(open(out / "summary.csv")))


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15"]],
                         ids=["joblib", "submitit_local"])
def test_launchers_run_a_two_job_sweep(tmp_path, launcher):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher" if "joblib" in launcher[0]
                        else "hydra_plugins.hydra_submitit_launcher")
    rows = _sweep_cli(tmp_path, launcher)
    bits = {r["job"]: next(o for o in r["overrides"].split() if o.startswith("quant.weight.bits=")) for r in rows}
    assert sorted(bits.values()) == ["quant.weight.bits=3", "quant.weight.bits=8"]
    assert all(r["status"] == "ok" for r in rows)
    psnr = {bits[r["job"]]: float(r["psnr"]) for r in rows}
    assert psnr["quant.weight.bits=8"] > psnr["quant.weight.bits=3"] + 3
    assert torch.tensor([float(r["w_bits"]) for r in rows]).max() > 7
    # jobs running side by side compute the shared FP images and calibration set once (a file lock):
    # the other job waits and reads them
    calib = [json.loads((tmp_path / "sweep" / r["job"] / "metrics.json").read_text())["calib"] for r in rows]
    assert sorted(c["fp_images_cache_hit"] for c in calib) == [False, True]
    assert sorted(c["cache_hit"] for c in calib) == [False, True]


def test_optuna_bits_search_returns_objectives_and_reports_its_front(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-m", "diffq", "-m", "experiment=optuna_bits", f"hydra.sweep.dir={out}",
                          "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.population_size=3", *TINY],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    results = OmegaConf.load(out / "optimization_results.yaml")
    best = [list(t["values"]) for t in results.solutions]  # the sweeper's Pareto set
    # Optuna's best trials are the values the jobs returned: (PSNR, effective weight bits) of rows
    values = {(round(float(r["psnr"]), 2), round(float(r["w_bits"]), 2)) for r in rows}
    assert best and all((round(p, 2), round(w, 2)) in values for p, w in best)
    assert any("psnr" in r["pareto"] for r in rows)
