"""The Hydra app end to end: default run, every config composes, sweeps, bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffq.errors import CalibrationError, ConfigError
from diffq.job import run

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = "model=tiny_sd15"  # tests of the machinery, not of the testbed model
QUICK = ["eval.prompts=[a photo of a red circle,a photo of two blue squares]", "calib.num_prompts=2",
         "calib.num_steps=2", "model.steps=4"]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "diffq", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_default_run_writes_all_artifacts(tmp_path):
    res = _cli([f"hydra.run.dir={tmp_path / 'run'}", "export=true"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "run"
    for name in ("grid.png", "metrics.json", "spec.txt", "config.yaml", "model/diffusion_model.safetensors"):
        assert (run_dir / name).exists(), name
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "ok" and m["quant"] == "w8a8" and m["model"] == "testbed_unet"
    assert 25 < m["fidelity"]["psnr"]["mean"] < 100 and m["fidelity"]["ssim"]["mean"] > 0.8
    assert m["metrics"]["psnr"]["quant"] == m["fidelity"]["psnr"]["mean"]
    g = m["metrics"]["geneval"]  # the testbed's own benchmark, FP and W8A8
    tasks = {"single_object": 24, "two_object": 24, "counting": 24, "colors": 24, "position": 24, "color_attr": 24}
    assert g["settings"] == {"backend": "shapes", "detector": "shapes", "prompts": 43, "entries": 72,
                             "images_per_prompt": 2, "images_per_task": 24, "task_images": tasks,
                             "bootstrap": {"confidence": 0.95, "resamples": 2000, "seed": 0},
                             "threshold": 0.3, "counting_threshold": 0.9, "max_objects": 16,
                             "position_threshold": 0.1, "seed": 0}
    assert g["fp"]["overall"] >= 0.45 and g["quant"]["overall"] >= g["fp"]["overall"] - 0.15
    assert len(g["fp"]["tasks"]) == 6 and 0 < g["fp"]["overall_se"] < 0.1
    assert g["delta"]["low"] <= g["quant"]["overall"] - g["fp"]["overall"] <= g["delta"]["high"]
    assert "GenEval FP " in res.stderr + res.stdout and "Δ " in res.stderr + res.stdout  # the final log line
    assert len(m["fidelity"]["psnr"]["per_image"]) == len(m["prompts"])
    # the images, in GenEval's folder layout: quantized in the run folder, FP in the shared cache
    for side in ("quant", "fp"):
        root = Path(m["samples"][side])
        assert sorted(p.name for p in root.glob("*/samples/*.png"))[:2] == ["00000.png", "00000.png"]
        assert len(list(root.glob("*/samples/*.png"))) == 144 and len(list(root.glob("*/metadata.jsonl"))) == 72
        assert json.loads((root / "00071" / "metadata.jsonl").read_text())["prompt"] == m["prompts"][-1]
    assert Path(m["samples"]["quant"]) == run_dir / "samples"
    assert 8 < m["cost"]["effective_weight_bits"] < 10 and 7.9 < m["cost"]["effective_act_bits"] < 9
    assert m["cost"]["size_quant_mb"] < m["cost"]["size_fp_mb"]
    assert m["time"]["calibration_s"] > 0 and m["time"]["sampling_quant_s"] > 0
    spec = (run_dir / "spec.txt").read_text()
    assert "conv_in" in spec and "int8/channel/sym" in spec
    assert OmegaConf.load(run_dir / "config.yaml").model.name == "testbed_unet"
    # reload the export (one image: the same images after a reload are tested in test_job), reported
    # under the checkpoint's preset and attention settings whatever the command line names
    res = _cli([f"hydra.run.dir={tmp_path / 'reload'}", f"load={run_dir / 'model'}", "quant=w4a8",
                "quant.attn.enabled=true", "eval=none"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    m2 = json.loads((tmp_path / "reload" / "metrics.json").read_text())
    assert m2["fidelity"]["psnr"]["mean"] > 25
    assert m2["quant"] == "w8a8" and m2["attn"] == m["attn"] and not m2["attn"]["enabled"]
    assert "attention matmuls" not in (tmp_path / "reload" / "spec.txt").read_text()


def test_sweep_records_failures_and_writes_summary(tmp_path):
    res = _cli(["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", TINY, "quant.weight.granularity=channel,group:7",
                *QUICK], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "summary.csv")))
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "group size 7" in rows[1]["error"] and "granularity=group:7" in rows[1]["overrides"]
    assert float(rows[0]["psnr"]) > 20
    assert (tmp_path / "sweep" / "summary.md").read_text().count("\n") == 4
    assert (tmp_path / "sweep" / "pareto.png").exists() and (tmp_path / "sweep" / "comparison.png").exists()


def test_bad_input_exits_with_one_clear_message(tmp_path):
    res = _cli([f"hydra.run.dir={tmp_path / 'r'}", "quant.weight.format=fp", "quant.weight.bits=4",
                "quant.weight.exp=5", "quant.weight.man=3"], cwd=tmp_path)
    assert res.returncode == 2 and "E5M3" in res.stderr + res.stdout and "Traceback" not in res.stderr
    res = _cli(["model=nope"], cwd=tmp_path)
    assert res.returncode != 0 and "nope" in res.stderr


MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
QUANTS = sorted(p.stem for p in (CONF / "quant").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes(compose, model):
    cfg = compose(f"model={model}")
    assert cfg.model.name == model and cfg.model.pipeline_class.endswith("Pipeline")


@pytest.mark.parametrize("quant", QUANTS)
def test_every_quant_preset_composes_and_validates(compose, quant):
    from diffq.spec import validate_quant_args

    cfg = compose(f"quant={quant}")
    assert cfg.quant.name == quant
    validate_quant_args(cfg.quant.weight, cfg.quant.act)


def test_experiments_compose(compose):
    for exp in (CONF / "experiment").glob("*.yaml"):
        compose(f"experiment={exp.stem}")


def test_wrong_key_fails_at_compose_time(compose):
    with pytest.raises(Exception, match="bitz"):
        compose(TINY, "quant.weight.bitz=4")


@pytest.mark.parametrize("family_model", ["tiny_sdxl", "tiny_dit", "tiny_pixart", "tiny_sd3", "tiny_flux"])
def test_tiny_models_run_end_to_end(compose, tmp_path, family_model):
    cfg = compose(f"model={family_model}", "eval.grid=false", *QUICK)
    m = run(cfg, tmp_path)
    assert m["status"] == "ok" and m["fidelity"]["psnr"]["mean"] > 20
    assert m["cost"]["layers_quantized"] > 0.5 * m["cost"]["layers_total"]


def test_calibration_set_is_cached_and_attention_listed_in_spec(compose, tmp_path):
    cfg = compose(TINY, "eval.grid=false", "quant.attn.enabled=true", *QUICK)
    first = run(cfg, tmp_path / "a")
    second = run(compose(TINY, "eval.grid=false", "quant=w4a8", *QUICK), tmp_path / "b")
    assert second["calib"]["cache_hit"] and second["calib"]["fp_images_cache_hit"]
    assert second["calib"]["samples"] == first["calib"]["samples"] == 2  # 1 batch x 2 kept steps
    spec = (tmp_path / "a" / "spec.txt").read_text()
    assert "attention matmuls: q/k/v int8/tensor/sym, softmax output uint8/tensor/asym" in spec


def test_geneval_shapes_eval_scores_fp_and_quantized(compose, tmp_path):
    cfg = compose(TINY, "eval=geneval_shapes", "eval.geneval.images_per_task=3", "eval.images_per_prompt=1",
                  "eval.grid=false", "calib.num_prompts=2", "calib.num_steps=2", "model.steps=2")
    m = run(cfg, tmp_path)
    g = m["metrics"]["geneval"]
    tasks = {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert g["settings"]["entries"] == 18 and len(m["prompts"]) == 18
    assert g["settings"]["prompts"] == 17  # one of the 2 single-object prompts twice, 3 distinct in other tasks
    assert g["settings"]["task_images"] == {t: 3 for t in tasks} and g["settings"]["images_per_task"] == 3
    for side in ("fp", "quant"):
        assert set(g[side]["tasks"]) == set(g[side]["tasks_se"]) == tasks
        assert all(0.0 <= v <= 1.0 for v in g[side]["tasks"].values())
        assert g[side]["overall_se"] >= 0
    assert g["delta"]["low"] <= g["delta"]["delta"] <= g["delta"]["high"]
    assert g["delta"]["delta"] == pytest.approx(g["quant"]["overall"] - g["fp"]["overall"])
    assert g["settings"]["bootstrap"] == {"confidence": 0.95, "resamples": 2000, "seed": 0}
    # repeated prompts are entries of their own in GenEval's layout, with their own seeds
    meta = [json.loads((tmp_path / "samples" / f"{i:05d}" / "metadata.jsonl").read_text()) for i in range(18)]
    assert meta[0] == meta[1] != meta[2] and meta[0]["tag"] == "single_object" and len(set(m["seeds"])) == 18
    row = job_row_of(tmp_path, m)
    assert row["geneval_fp"] == f"{g['fp']['overall']:.2f} ± {g['fp']['overall_se']:.2f}"
    assert row["geneval_delta"].startswith("Δ ") and row["geneval_delta"].count(",") == 1
    with pytest.raises(ConfigError, match="eval.geneval.metadata"):
        run(compose(TINY, "eval.metrics=[psnr,geneval]", *QUICK), tmp_path / "x")
    with pytest.raises(ConfigError, match="images_per_task to a multiple"):
        run(compose(TINY, "eval=geneval_shapes", "eval.geneval.images_per_task=6"), tmp_path / "y")


def job_row_of(run_dir: Path, metrics: dict) -> dict:
    """The sweep summary row of a job folder holding ``metrics``."""
    from diffq.sweep import job_row

    job = run_dir / "0"
    job.mkdir()
    (job / "metrics.json").write_text(json.dumps(metrics, default=str))
    return job_row(job)


def test_missing_calibration_prompt_file(compose, tmp_path):
    cfg = compose(TINY, "calib.prompts_file=/nonexistent/prompts.txt", *QUICK)
    with pytest.raises(ConfigError, match="prompts.txt"):
        run(cfg, tmp_path)


def test_nan_in_calibration_activations_stops_early(compose, tmp_path, monkeypatch):
    import diffq.calib as calib_mod

    real = calib_mod.load_or_capture

    def poisoned(*args, **kwargs):
        samples, hit = real(*args, **kwargs)
        samples[0].kwargs["encoder_hidden_states"] = samples[0].kwargs["encoder_hidden_states"].clone()
        samples[0].kwargs["encoder_hidden_states"][0, 0, 0] = float("nan")
        return samples, hit

    monkeypatch.setattr(calib_mod, "load_or_capture", poisoned)
    cfg = compose(TINY, *QUICK)
    with pytest.raises(CalibrationError, match="NaN"):
        run(cfg, tmp_path)
    assert not (tmp_path / "metrics.json").exists()
