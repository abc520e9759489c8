"""MixDQ: candidate parameters, one-layer sensitivity, the plan family, the written plan."""
from __future__ import annotations

import pytest
import yaml

from diffq import job
from diffq.errors import ConfigError
from diffq.methods import mixdq

TINY = ["model=tiny_sd15", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3", "quant=mixdq_w4a8", "quant.mixdq.num_prompts=2",
        "quant.mixdq.sqnr_calls=2", "quant.mixdq.k_weight=[1.0,1.36]", "quant.mixdq.k_act=[1.0]"]


def test_mixdq_job_plans_caches_and_its_written_plan_reloads(compose, tmp_path, monkeypatch):
    base = [*TINY, f"paths.cache_dir={tmp_path / 'cache'}"]
    first = job.run(compose(*base), tmp_path / "first")
    info = first["calib"]["mixdq"]
    assert abs(info["weight_bits_avg"] - 4.0) <= 0.02 and info["content_layers"] > 0
    assert all(p["image_mse"] >= 0 for p in info["plans"]) and info["chosen"] in [p["k"] for p in info["plans"]]
    programs = [g for p in info["plans"] for g in p["programs"]]
    assert programs and all("Optimization terminated successfully" in g["status"] for g in programs)
    assert all(abs(g["average"] - g["target"]) <= 0.02 + 1e-9 for g in programs)  # each program's band
    spec = (tmp_path / "first" / "spec.txt").read_text()
    assert "int2/channel" in spec or "int8/channel" in spec  # mixed widths, not uniform 4 bits
    assert "+bos fp" in spec
    assert (tmp_path / "first" / "mixdq_sensitivity.csv").exists()
    assert (tmp_path / "first" / "mixdq_sensitivity.png").exists()

    monkeypatch.setattr(mixdq, "measure", lambda *a, **k: pytest.fail("measured again instead of using the cache"))
    again = job.run(compose(*base), tmp_path / "again")
    assert again["calib"]["mixdq"]["plans"] == info["plans"]  # deterministic, from the cache
    assert again["fidelity"]["psnr"]["per_image"] == first["fidelity"]["psnr"]["per_image"]

    plan = tmp_path / "first" / "mixdq_plan.yaml"
    rules = yaml.safe_load(plan.read_text())["rules"]
    assert rules and all(len(r["names"]) == 1 for r in rules)
    reloaded = job.run(compose(*base, f"quant.mixdq.plan={plan}"), tmp_path / "reloaded")
    assert (tmp_path / "reloaded" / "spec.txt").read_text() == spec
    assert reloaded["fidelity"]["psnr"]["per_image"] == first["fidelity"]["psnr"]["per_image"]


def test_an_infeasible_budget_stops_before_calibration(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "quantize", lambda *a, **k: pytest.fail("calibrated before failing"))
    cfg = compose(*TINY, f"paths.cache_dir={tmp_path / 'cache'}", "quant.mixdq.weight_bits=1.5")
    with pytest.raises(ConfigError, match=r"1\.500 weight bits is out of reach.*\[\d\.\d+, 8\.000\]"):
        job.run(cfg, tmp_path / "run")


def test_a_missing_plan_file_stops_before_the_model_loads(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline before failing"))
    with pytest.raises(ConfigError, match="mixdq_plan.yaml"):
        job.run(compose(*TINY, f"quant.mixdq.plan={tmp_path / 'nope.yaml'}"), tmp_path / "run")


def test_plan_rules_round_trip():
    plan = {"weight": {"a": 4, "b": 8}, "act": {"a": 8, "c": None}}
    rules = mixdq.plan_rules(plan)
    assert rules == [{"names": ["a"], "weight": {"bits": 4}, "act": {"bits": 8}},
                     {"names": ["b"], "weight": {"bits": 8}}, {"names": ["c"], "act": {"format": "none"}}]
