"""The sweep report from job folders: statuses (ok, failed, crashed, unfinished), grouping by method,
labels, seeds (mean and 95% interval per configuration, paired differences), Pareto fronts, plots, the
comparison grid, ``diffq report`` (markdown, several sweeps), the top-level seed, and sweeps through
the joblib and submitit_local launchers."""
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
from scipy import stats

from diffq.sweep import write_report
from diffq.sweep.pareto import pareto_mask
from diffq.sweep.plots import half_widths
from diffq.sweep.report import main as report_main
from diffq.sweep.report import pareto_fronts
from diffq.sweep.rows import job_row, set_labels
from diffq.sweep.seeds import difference, t_interval

T975 = {2: 4.302652729911275, 1: 12.706204736174707}  # Student t quantiles 0.975 for 2 and 1 degrees of freedom

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
         metrics: dict | None = None, log: str = "", w: float = 8, a: float = 8, seed: int | None = None,
         overrides: tuple[str, ...] = ()) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    seeds = [] if seed is None else [f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml([f"quant={quant}", *overrides, *seeds]))
    side = lambda bits: {"format": "int", "bits": bits} if bits < 16 else {"format": "none", "bits": 8}  # noqa: E731
    cfg = {"quant": {"name": quant, "method": method, "recon": recon, "weight": side(w), "act": side(a)},
           "calib": {"selection": "uniform"}, "finetune": {"name": finetune, "steps": 10 if finetune != "none" else 0},
           "seed": seed or 0}
    (job / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if log:
        (job / "diffq.log").write_text(log)
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def _ok(sweep: Path, num: int, quant: str, w: float, a: float, psnr: float, ssim: float | None = None,
        fp: str = "fp", **kw) -> None:
    job = sweep / str(num)
    _samples(job / "samples", [0.2 + 0.1 * (num % 8), 0.5])
    m = {"status": "ok", "quant": quant, "method": kw.get("method", "rtn"),
         "metrics": {"psnr": {"quant": psnr}, "ssim": {"quant": psnr / 100 if ssim is None else ssim}},
         "cost": {"effective_weight_bits": w, "effective_act_bits": a, "size_quant_mb": w / 8, "compression": 16 / w},
         "time": {"calibration_s": 1.0}, "samples": {"fp": str(sweep / fp), "quant": str(job / "samples")},
         "prompts": ["p0", "p1"]}
    _job(sweep, num, quant=quant, metrics=m, w=w, a=a, **kw)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    s = tmp_path / "sweep"
    _samples(s / "fp", [0.9, 0.1])
    _ok(s, 0, "w8a8", 8.0, 8.0, 40.0)
    _ok(s, 1, "w4a8", 4.0, 8.0, 25.0)
    _ok(s, 2, "brecq_w4a8", 4.0, 8.0, 30.0, recon="block")  # dominates job 1
    _job(s, 3, quant="w2a8", w=2, metrics={"status": "failed", "error": "ConfigError: int bits must be in 2..8"})
    _job(s, 4, quant="w3a8", w=3, log="[2026-01-01][diffq][ERROR] - job failed: RuntimeError: out of memory\n")
    _job(s, 5, quant="w6a8", w=6)  # started, no result: running or interrupted
    _ok(s, 6, "w6a8", 6.0, 8.0, 35.0)
    return s


def test_report_groups_by_method_marks_the_front_and_keeps_every_job(sweep):
    rows = write_report(sweep)
    # labels say what ran (method, W/A bits); the preset names are left out as the labels differ without them
    assert [(r["jobs"], r["label"], r["status"]) for r in rows] == [
        ("0", "rtn W8A8", "ok"), ("6", "rtn W6A8", "ok"), ("1", "rtn W4A8", "ok"), ("2", "rtn+block W4A8", "ok"),
        ("3", "rtn W2A8", "failed"), ("4", "rtn W3A8", "failed"), ("5", "rtn W6A8", "unfinished")]
    by_job = {r["jobs"]: r for r in rows}
    assert "int bits must be in 2..8" in by_job["3"]["error"]
    assert "out of memory" in by_job["4"]["error"]
    assert "interrupted" in by_job["5"]["error"]
    assert by_job["0"]["pareto"] == "psnr,ssim" and by_job["2"]["pareto"] == "psnr,ssim"
    assert by_job["6"]["pareto"] == "psnr,ssim" and by_job["1"]["pareto"] == ""
    assert pareto_fronts(rows)["psnr"] == {"rtn W8A8", "rtn+block W4A8", "rtn W6A8"}
    table = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [r["jobs"] for r in table] == ["0", "6", "1", "2", "3", "4", "5"] and table[0]["psnr"] == "40.0"
    # one seed: a mean without an interval, and no differences table
    assert table[0]["psnr_n"] == "1" and table[0]["psnr_lo"] == table[0]["psnr_hi"] == ""
    assert table[1]["d_psnr"] == "-5.0"
    assert table[1]["d_psnr_sig"] == "" and table[0]["pairing"] == "baseline"
    jobs = list(csv.DictReader(open(sweep / "jobs.csv")))
    assert [r["job"] for r in jobs] == ["0", "1", "2", "3", "4", "5", "6"] and jobs[6]["seed"] == "seed=0"
    md = (sweep / "summary.md").read_text()
    assert md.count("\n") == 9 and "| rtn+block W4A8 | 2 | 1 | ok | 4.00 | 8.00 | 30.00 | 0.300 |" in md
    assert "geneval" not in md.splitlines()[0] and "Differences" not in md
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
    assert "7 jobs (4 ok, 2 failed, 1 unfinished) in 4 configurations" in res.stdout
    assert (sweep / "pareto.png").exists()
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
    bits = {r["jobs"]: next(o for o in r["overrides"].split() if o.startswith("quant.weight.bits=")) for r in rows}
    assert sorted(bits.values()) == ["quant.weight.bits=3", "quant.weight.bits=8"]
    assert all(r["status"] == "ok" for r in rows)
    # each row says the bits it ran (not the preset's name, w8a8), the fixed override left out
    assert {bits[r["jobs"]]: r["label"] for r in rows} == {"quant.weight.bits=8": "rtn W8A8",
                                                           "quant.weight.bits=3": "rtn W3A8"}
    psnr = {bits[r["jobs"]]: float(r["psnr"]) for r in rows}
    assert psnr["quant.weight.bits=8"] > psnr["quant.weight.bits=3"] + 3
    assert torch.tensor([float(r["w_bits"]) for r in rows]).max() > 7
    # jobs running side by side compute the shared FP images and calibration set once (a file lock):
    # the other job waits and reads them
    calib = [json.loads((tmp_path / "sweep" / r["jobs"] / "metrics.json").read_text())["calib"] for r in rows]
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


PSNR = {"w8a8": [40.0, 35.0, 45.0], "w4a8": [39.0, 34.0, 44.2]}  # W4A8: 0.8-1 dB lower at every seed
SSIM = {"w8a8": [0.50, 0.60, 0.70], "w4a8": [0.55, 0.58, 0.75]}  # W4A8: +0.05, -0.02, +0.05: noise


def _seeded(sweep: Path, quant: str, seeds: range, start: int = 0) -> None:
    """Jobs ``start``, ... of ``quant`` at ``seeds`` (override ``seed=S``), each sampling its seed's FP images."""
    w = 8 if quant == "w8a8" else 4
    for num, seed in enumerate(seeds, start):
        _samples(sweep / f"fp{seed}", [0.9, 0.1])
        _ok(sweep, num, quant, w, 8, PSNR[quant][seed], SSIM[quant][seed], fp=f"fp{seed}", seed=seed)


@pytest.fixture
def seeds(tmp_path: Path) -> Path:
    """Seeds 0, 1, 2 of W8A8 and W4A8 (jobs 0-5), one seed of W4A4 (job 6)."""
    s = tmp_path / "seeds"
    _seeded(s, "w8a8", range(3))
    _seeded(s, "w4a8", range(3), start=3)
    _ok(s, 6, "w4a4", 4, 4, 20.0, 0.2, fp="fp0", seed=0)
    return s


def _half(values: list[float]) -> float:
    """Hand-computed Student-t 95% half-width of 3 values: t_{0.975, 2} sd / sqrt(3)."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return T975[len(values) - 1] * sd / len(values) ** 0.5


def test_seeds_make_one_row_per_configuration_with_t_intervals(seeds):
    rows = write_report(seeds)
    assert [(r["label"], r["jobs"], r["seeds"]) for r in rows] == [
        ("rtn W8A8", "0 1 2", "seed=0 seed=1 seed=2"), ("rtn W4A8", "3 4 5", "seed=0 seed=1 seed=2"),
        ("rtn W4A4", "6", "seed=0")]
    table = {r["label"]: r for r in csv.DictReader(open(seeds / "summary.csv"))}
    a, b, c = table["rtn W8A8"], table["rtn W4A8"], table["rtn W4A4"]
    assert float(a["psnr"]) == 40.0 and a["psnr_n"] == "3" and a["overrides"] == "quant=w8a8"
    assert _half(PSNR["w8a8"]) == pytest.approx(12.42069, abs=1e-5)  # 4.3027 * 5 / sqrt(3)
    for row, quant in ((a, "w8a8"), (b, "w4a8")):
        for metric, values in (("psnr", PSNR[quant]), ("ssim", SSIM[quant])):
            mean, half = sum(values) / 3, _half(values)
            assert float(row[metric]) == pytest.approx(mean, abs=1e-4)
            assert (float(row[f"{metric}_lo"]), float(row[f"{metric}_hi"])) == pytest.approx(
                (mean - half, mean + half), abs=1e-4)
    assert float(a["w_bits_lo"]) == float(a["w_bits_hi"]) == 8.0  # no spread: a zero-width interval
    # one seed: the value, no interval
    assert c["psnr"] == "20.0" and c["psnr_n"] == "1" and c["psnr_lo"] == c["psnr_hi"] == ""
    mean, half = t_interval(np.array([3.0]))
    assert mean == 3.0 and np.isnan(half)
    assert t_interval(np.array([1.0, 3.0]))[1] == pytest.approx(T975[1] * 2**0.5 / 2**0.5)
    # the Pareto plot's error bars are these half-widths
    assert half_widths(rows, "psnr") == pytest.approx([_half(PSNR["w8a8"]), _half(PSNR["w4a8"]), 0.0], abs=1e-4)
    jobs = list(csv.DictReader(open(seeds / "jobs.csv")))
    assert len(jobs) == 7 and jobs[4]["label"] == "rtn W4A8" and jobs[4]["seed"] == "seed=1"
    # the comparison grid: FP and one row per configuration, the jobs of the first seed (same FP images)
    assert np.asarray(Image.open(seeds / "comparison.png")).shape[0] == 12 * 3 + 6 + 4 * 128


def test_differences_are_paired_by_seed_and_significant_only_outside_noise(seeds):
    rows = {r["label"]: r for r in write_report(seeds)}
    a, b, c = rows["rtn W8A8"], rows["rtn W4A8"], rows["rtn W4A4"]
    assert a["pairing"] == "baseline" and b["pairing"] == "paired, 3 seeds"
    # PSNR: per-seed differences -1, -1, -0.8: significant although the seeds spread by 10 dB
    d = [-1.0, -1.0, -0.8]
    assert b["d_psnr"] == pytest.approx(-0.9333, abs=1e-4)
    assert (b["d_psnr_lo"], b["d_psnr_hi"]) == pytest.approx((sum(d) / 3 - _half(d), sum(d) / 3 + _half(d)), abs=1e-4)
    assert b["d_psnr_hi"] < 0 and b["d_psnr_sig"] == "significant"
    # SSIM: +0.05, -0.02, +0.05: the interval holds zero
    d = [0.05, -0.02, 0.05]
    assert (b["d_ssim_lo"], b["d_ssim_hi"]) == pytest.approx((0.02667 - _half(d), 0.02667 + _half(d)), abs=1e-4)
    assert b["d_ssim_lo"] < 0 < b["d_ssim_hi"] and b["d_ssim_sig"] == "within noise"
    # one seed against three: a difference, no interval, no mark
    assert c["d_psnr"] == -20.0 and c["d_psnr_lo"] == "" and c["d_psnr_sig"] == "" and c["pairing"] == "1 vs 3 seeds"
    md = (seeds / "summary.md").read_text()
    assert "Differences vs `rtn W8A8`" in md
    assert ("| rtn W4A8 | paired, 3 seeds | -0.93 [-1.22, -0.65] significant | +0.027 [-0.074, +0.127] within noise |"
            in md)
    # the same values on unmatched seeds: Welch's interval of the difference of means, within noise
    xa, xb = PSNR["w4a8"], PSNR["w8a8"]
    welch = difference([(f"s{i}", v) for i, v in enumerate(xa)], [(f"t{i}", v) for i, v in enumerate(xb)])
    va, vb = (sum((v - sum(x) / 3) ** 2 for v in x) / 2 / 3 for x in (xa, xb))
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    half = stats.t.ppf(0.975, df) * (va + vb) ** 0.5
    assert welch["pairing"] == "unpaired (Welch), 3 vs 3 seeds" and not welch["significant"]
    assert (welch["lo"], welch["hi"]) == pytest.approx((-0.9333 - half, -0.9333 + half), abs=1e-4)
    # another baseline: W8A8 is 0.93 dB better than W4A8
    rows = {r["label"]: r for r in write_report(seeds, baseline="rtn W4A8")}
    assert rows["rtn W8A8"]["d_psnr"] == pytest.approx(0.9333, abs=1e-4)
    assert rows["rtn W8A8"]["d_psnr_sig"] == "significant"


def test_report_markdown_prints_the_readme_table(seeds, capsys):
    assert report_main([str(seeds), "--markdown", "--metrics", "psnr,ssim,n"]) == 0
    assert capsys.readouterr().out == (
        "| configuration | PSNR | SSIM | seeds |\n|---|---|---|---|\n"
        "| rtn W8A8 | 40.00 ± 12.42 | 0.600 ± 0.248 | 3 |\n"
        "| rtn W4A8 | 39.07 ± 12.67 | 0.627 ± 0.268 | 3 |\n"
        "| rtn W4A4 | 20.00 | 0.200 | 1 |\n")
    assert not (seeds / "summary.md").exists()  # --markdown writes nothing
    assert report_main([str(seeds), "--markdown", "--metrics", "psnr", "--baseline", "rtn W4A8"]) == 0
    out = capsys.readouterr().out
    assert "| rtn W8A8 | 40.00 ± 12.42 |" in out and "Differences vs `rtn W4A8`" in out
    assert "| rtn W8A8 | paired, 3 seeds | +0.93 [+0.65, +1.22] significant |" in out
    assert report_main([str(seeds), "--markdown"]) == 0  # default: seeds, quality metrics computed, W/A bits
    assert capsys.readouterr().out.startswith("| configuration | seeds | PSNR | SSIM | W bits | A bits |\n")
    assert report_main([str(seeds), "--markdown", "--metrics", "psnr,nope"]) == 2
    assert "unknown metric(s) ['nope']" in capsys.readouterr().err
    assert report_main([str(seeds), "--baseline", "rtn W2A8"]) == 2
    assert "labels: rtn W8A8, rtn W4A8, rtn W4A4" in capsys.readouterr().err


def test_several_sweep_folders_merge_by_configuration(tmp_path, capsys):
    # seeds 0 and 1 in one sweep, seed 2 in another
    first, second = tmp_path / "first", tmp_path / "second"
    _seeded(first, "w8a8", range(2))
    _seeded(first, "w4a8", range(2), start=2)
    _seeded(second, "w8a8", range(2, 3))
    _seeded(second, "w4a8", range(2, 3), start=1)
    assert report_main([str(first), str(second)]) == 0  # no --out: printed, nothing written
    out = capsys.readouterr().out
    assert "| rtn W8A8 | first/0 first/1 second/0 | 3 | ok | 8.00 | 8.00 | 40.00 ± 12.42 |" in out  # bits: no spread
    assert "6 jobs (6 ok, 0 failed, 0 unfinished) in 2 configurations; nothing written" in out
    assert not (first / "summary.csv").exists()
    assert report_main([str(first), str(second), "--out", str(tmp_path / "merged")]) == 0
    table = {r["label"]: r for r in csv.DictReader(open(tmp_path / "merged" / "summary.csv"))}
    assert table["rtn W4A8"]["jobs"] == "first/2 first/3 second/1" and table["rtn W4A8"]["psnr_n"] == "3"
    assert table["rtn W4A8"]["pairing"] == "paired, 3 seeds" and table["rtn W4A8"]["d_psnr_sig"] == "significant"
    assert float(table["rtn W8A8"]["psnr_hi"]) == pytest.approx(40 + _half(PSNR["w8a8"]), abs=1e-4)


def test_labels_show_method_bits_and_the_overrides_that_vary(compose):
    from diffq.sweep.rows import bits_label

    def labels(*configs: tuple[str, str, dict]) -> list[str]:
        rows = [{"job": str(i), "method": m, "_bits": b, "_config": c} for i, (m, b, c) in enumerate(configs)]
        set_labels(rows)
        return [r["label"] for r in rows]

    # the swept bit width is in W/A; a fixed override is left out
    assert labels(("rtn", "W6A8", {"quant": "w8a8", "quant.weight.bits": "6", "calib.num_prompts": "4"}),
                  ("rtn", "W8A8", {"quant": "w8a8", "quant.weight.bits": "8", "calib.num_prompts": "4"}),
                  ("rtn", "W8A8", {"quant": "w8a8", "quant.weight.bits": "8", "calib.num_prompts": "32"})) == [
        "rtn W6A8 calib.num_prompts=4", "rtn W8A8 calib.num_prompts=4", "rtn W8A8 calib.num_prompts=32"]
    # presets that method and bits do not tell apart keep their name
    assert labels(("rtn+ternary_distill", "W1.58A16", {"quant": "ternary_w158", "finetune.steps": "1000"}),
                  ("rtn+ternary_distill", "W1.58A16", {"quant": "ternary_w158", "finetune.steps": "2000"}),
                  ("rtn", "W4A4", {"quant": "mxfp4_w4a4"}), ("rtn", "W4A4", {"quant": "nvfp4_w4a4"}),
                  ("", "", {"quant": "w4a4", "quant.weight.bits": "3"})) == [
        "rtn+ternary_distill W1.58A16 quant=ternary_w158 finetune.steps=1000",
        "rtn+ternary_distill W1.58A16 quant=ternary_w158 finetune.steps=2000",
        "rtn W4A4 quant=mxfp4_w4a4", "rtn W4A4 quant=nvfp4_w4a4", "quant=w4a4 quant.weight.bits=3"]
    # W/A bits are the formats' bits per element (MixDQ: its targets), FP sides 16
    bits = {q: bits_label(OmegaConf.to_container(compose(f"quant={q}", *extra).quant, resolve=True))
            for q, extra in (("ternary_w158", ()), ("mixdq_w5a8", ()), ("w4a16_nvfp4", ()), ("fp_w4a8", ()),
                             ("w8a8", ("quant.weight.bits=6",)))}
    assert bits == {"ternary_w158": "W1.58A16", "mixdq_w5a8": "W5A8", "w4a16_nvfp4": "W4A16", "fp_w4a8": "W4A8",
                    "w8a8": "W6A8"}


def test_top_level_seed_sets_every_seed_and_keeps_todays_defaults(compose):
    def seeds(cfg) -> tuple[int, ...]:
        return (cfg.calib.seed, cfg.eval.seed, cfg.recon.seed, cfg.finetune.seed, cfg.finetune.data.seed,
                cfg.finetune.data.val_seed, cfg.model.seed)

    assert seeds(compose()) == (1234, 0, 0, 0, 4321, 8765, 0)
    assert seeds(compose("seed=0", "calib=edadm", "eval=geneval_shapes", "recon=quick")) == (
        1234, 0, 0, 0, 4321, 8765, 0)
    assert seeds(compose("seed=2")) == (1236, 2, 2, 2, 4323, 8767, 0)  # the tiny model's weights stay
    # every preset of the groups follows it, and each seed is still settable on its own
    cfg = compose("seed=2", "calib=edadm", "eval=geneval_shapes", "recon=edadm", "finetune=ternary_distill",
                  "calib.seed=7")
    assert seeds(cfg) == (7, 2, 2, 2, 4323, 8767, 0)
    assert OmegaConf.to_container(compose("seed=1").calib, resolve=True)["seed"] == 1235


def test_rows_report_the_formats_bits_and_the_stored_bits(tmp_path):
    new = {"effective_weight_bits": 6.29, "stored_weight_bits": 8.29}  # W6 in int8 containers
    old = {"effective_weight_bits": 8.29, "information_weight_bits": 6.29}  # a run folder of the earlier layout
    for i, cost in enumerate((new, old)):
        _ok(tmp_path / "s", i, "w8a8", 8.0, 8.0, 30.0)
        path = tmp_path / "s" / str(i) / "metrics.json"
        m = json.loads(path.read_text())
        m["cost"] = {**cost, "effective_act_bits": 6.0, "size_quant_mb": 1.0, "compression": 2.0}
        path.write_text(json.dumps(m))
        row = job_row(tmp_path / "s" / str(i))
        assert (row["w_bits"], row["w_stored_bits"], row["a_bits"]) == (6.29, 8.29, 6.0)


def test_bits_labels_say_when_rules_mix_widths():
    from diffq.sweep.rows import bits_label

    side = {"format": "int", "bits": 8, "granularity": "channel"}
    quant = {"method": "rtn", "weight": side, "act": {**side, "granularity": "tensor"}, "rules": []}
    assert bits_label(quant) == "W8A8"
    edge = [{"roles": ["conv_in", "conv_out"], "weight": {"bits": 4}}, {"roles": ["time_embed"], "skip": True}]
    assert bits_label({**quant, "rules": edge}) == "W8A8"  # the papers' 8-bit edges are not a mix
    ffn = [{"roles": ["ffn_up", "ffn_down"], "weight": {"bits": 4}}]
    assert bits_label({**quant, "rules": ffn}) == "Wmixed A8"
    assert bits_label({**quant, "rules": [{"roles": ["ffn_up"], "weight": {"bits": 8}}]}) == "W8A8"  # same width


def test_pareto_points_get_short_labels():
    from diffq.sweep.plots import point_label

    label = point_label("rtn Wmixed A8 sweep.bits.attn=8 sweep.bits.conv=6", "rtn")
    assert label.replace("\n", " ") == "Wmixed A8 attn=8 conv=6" and max(map(len, label.splitlines())) <= 22
    assert point_label("rtn W4A8 quant=w4a8", "rtn") == "W4A8 quant=w4a8"
