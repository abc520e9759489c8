"""MixDQ: candidate parameters, one-layer sensitivity, the plan family under the honest budget, the
control, the written plan, the near-global SSIM and BOS on a text encoder with CLIP's BOS outlier."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from diffq import job
from diffq.errors import ConfigError
from diffq.eval.fidelity import ssim
from diffq.methods import mixdq
from diffq.models import sample_seeds

TINY = ["model=tiny_sd15", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3", "quant=mixdq_w4a8", "quant.mixdq.num_prompts=2",
        "quant.mixdq.sqnr_calls=2", "quant.mixdq.k_weight=[1.0,1.36]", "quant.mixdq.k_act=[1.0]",
        "quant.mixdq.budget_offsets=[-0.3,0.0]"]


def test_mixdq_job_plans_under_the_honest_budget_caches_and_its_written_plan_reloads(compose, tmp_path, monkeypatch):
    base = [*TINY, f"paths.cache_dir={tmp_path / 'cache'}"]
    first = job.run(compose(*base), tmp_path / "first")
    info = first["calib"]["mixdq"]
    assert 3.96 - 1e-9 <= info["weight_bits_avg"] <= 4.0 + 1e-9 and info["content_layers"] > 0
    # FP inputs inside the activation budget: the reported average (skipped layers and FP-kept inputs
    # at 16 bits) is at most 8, so the other inputs were lowered below 8
    assert first["cost"]["effective_act_bits"] <= 8.0 + 1e-9
    assert first["cost"]["effective_act_bits"] == pytest.approx(info["act_bits_avg"])
    assert info["act_budget"]["quantized_inputs_max"] < 8.0
    assert all(len(v) == 1 for v in info["fp_inputs"].values())  # ceil(1% of each group)
    for what in ("weight", "act"):
        plans = info[f"{what}_plans"]
        assert plans and all(p["image_mse"] >= 0 for p in plans)
        assert info["chosen"][what] in [kb for p in plans for kb in p["k_budget"]]
        for g in (g for p in plans for g in p["programs"]):
            assert "Optimization terminated successfully" in g["status"]
            assert g["target"] - 0.04 - 1e-9 <= g["average"] <= g["target"] + 1e-9  # never over its target
    assert info["search"]["seed_stream"] == mixdq.SEARCH_STREAM and info["search"]["sqnr_calls"] == 2
    spec = (tmp_path / "first" / "spec.txt").read_text()
    assert "int2/channel" in spec or "int8/channel" in spec  # mixed widths, not uniform 4 bits
    assert "+bos fp" in spec
    assert (tmp_path / "first" / "mixdq_sensitivity.csv").exists()
    assert (tmp_path / "first" / "mixdq_sensitivity.png").exists()

    monkeypatch.setattr(mixdq, "measure", lambda *a, **k: pytest.fail("measured again instead of using the cache"))
    again = job.run(compose(*base), tmp_path / "again")
    assert again["calib"]["mixdq"]["act_plans"] == info["act_plans"]  # deterministic, from the cache
    assert again["fidelity"]["psnr"]["per_image"] == first["fidelity"]["psnr"]["per_image"]

    plan = tmp_path / "first" / "mixdq_plan.yaml"
    rules = yaml.safe_load(plan.read_text())["rules"]
    assert rules and all(len(r["names"]) == 1 for r in rules)
    reloaded = job.run(compose(*base, f"quant.mixdq.plan={plan}"), tmp_path / "reloaded")
    assert (tmp_path / "reloaded" / "spec.txt").read_text() == spec
    assert reloaded["fidelity"]["psnr"]["per_image"] == first["fidelity"]["psnr"]["per_image"]

    # the control: the same sensitivities (from the cache), exactly the plan's FP inputs, uniform widths
    control = job.run(compose(*base, "quant=mixdq_control_w4a8"), tmp_path / "control")["calib"]["mixdq"]
    assert control["control"] and control["fp_inputs"] == info["fp_inputs"]
    fp_rules = {r["names"][0] for r in rules if r.get("act") == {"format": "none"}}
    assert fp_rules == {n for names in info["fp_inputs"].values() for n in names}
    rows = [line.split() for line in (tmp_path / "control" / "spec.txt").read_text().splitlines()[2:]]
    quantized = [r for r in rows if r and r[-1] == "no"]
    assert quantized and all(r[4] == "int4/channel/sym" for r in quantized)
    fp_acts = {r[0] for r in quantized if r[5] == "float"}
    assert fp_acts == fp_rules
    assert all(r[5].startswith("uint8") for r in quantized if r[0] not in fp_rules)
    assert control["act_bits_avg"] > 8.0  # a control, not a budget row


def test_the_activation_budget_holds_with_fp_inputs_counted():
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(10):
        names = [f"l{i}" for i in range(60)]
        content = set(names[: 10 + trial % 40])
        counts = {n: int(rng.integers(100, 5000)) for n in [*names, "skipped_a", "skipped_b"]}
        sens = {n: {"weight": {}, "act": {4: float(rng.random() * (1 if n in content else 40)),
                                          8: float(1 + rng.random() * (1 if n in content else 40))}} for n in names}
        mc = {"act_bits_candidates": [4, 8], "fp_act_fraction": float(rng.choice([0.01, 0.1, 0.25])), "band": 0.02,
              "k_act": [0.94, 1.0, 1.09], "budget_offsets": [-0.3, -0.1, 0.0]}
        fp = mixdq.fp_inputs(sens, content, mc)
        for g, group in (("content", content), ("quality", set(names) - content)):  # each by its own metric
            assert len(fp[g]) == math.ceil(mc["fp_act_fraction"] * len(group) - 1e-9)
            worst = sorted(group, key=lambda n: (sens[n]["act"][4], n))
            assert fp[g] == worst[: len(fp[g])]
        fp_set = {n for v in fp.values() for n in v}
        act = [n for n in names if n not in fp_set]
        target = float(rng.uniform(6.5, 8.0))
        top = mixdq.rest_budget(counts, act, target)
        if top < 4.5:  # the narrowest width cannot meet it: the job stops with a ConfigError
            continue
        plans = mixdq.family("act", sens, act, content, counts, dict.fromkeys(mixdq.GROUPS, [4, 8]), top,
                             mc["k_act"], mc)
        for p in plans:
            assert mixdq.model_act_average(counts, {**p["bits"], **dict.fromkeys(fp_set)}) <= target + 1e-9
            checked += 1
    assert checked >= 10


def test_global_ssim_equals_a_whole_window_reference():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 3, 32, 32, generator=g)
    b = (a + 0.15 * torch.randn(1, 3, 32, 32, generator=g)).clamp(0, 1)
    x, y = a[0].double().numpy(), b[0].double().numpy()
    c1, c2, k, ref = 0.01**2, 0.03**2, 31, []
    for c in range(3):  # every 31 x 31 window inside the image (2 x 2 positions), sample statistics (skimage)
        for i in range(32 - k + 1):
            for j in range(32 - k + 1):
                u, v = x[c, i:i + k, j:j + k].ravel(), y[c, i:i + k, j:j + k].ravel()
                mu, mv = u.mean(), v.mean()
                cov = np.cov(u, v)  # ddof 1
                ref.append((2 * mu * mv + c1) * (2 * cov[0, 1] + c2)
                           / ((mu**2 + mv**2 + c1) * (cov[0, 0] + cov[1, 1] + c2)))
    assert float(ssim(a, b, window="global")) == pytest.approx(float(np.mean(ref)), abs=1e-6)
    assert abs(float(ssim(a, b, window="local")) - float(np.mean(ref))) > 1e-3  # the local window differs


def test_search_seeds_are_not_the_evaluations():
    assert not set(sample_seeds(0, 64, stream=mixdq.SEARCH_STREAM)) & set(sample_seeds(0, 4096))


def test_candidate_widths_the_format_cannot_take_stop_before_calibration(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "quantize", lambda *a, **k: pytest.fail("calibrated before failing"))
    cfg = compose(*TINY, f"paths.cache_dir={tmp_path / 'cache'}", "quant.mixdq.weight_bits_content=[1,4]")
    with pytest.raises(ConfigError, match=r"quant\.mixdq\.weight_bits_content=\[1, 4\]"):
        job.run(cfg, tmp_path / "run")


def test_bos_aware_beats_plain_on_a_text_encoder_with_clips_bos_outlier(compose, tmp_path):
    """A tiny CLIP whose first position is 60x the others, as real CLIP's BOS is; only the
    cross-attention K/V layers quantized (W8A8 per tensor), so the gap is the BOS rule's."""
    runs = {}
    for bos in (False, True):
        cfg = compose("model=tiny_sd15", "+model.tiny.bos_outlier=60", "quant=w8a8", "eval.grid=false",
                      "eval.prompts=[a photo of a red circle,a photo of two blue squares]", "eval.images_per_prompt=2",
                      "model.steps=4", "calib.num_prompts=2", "calib.num_steps=2", f"paths.cache_dir={tmp_path}",
                      f"quant.rules=[{{skip: true}}, {{roles: [cross_attn_kv], skip: false, bos: {str(bos).lower()}}}]")
        runs[bos] = job.run(cfg, tmp_path / str(bos))["fidelity"]["psnr"]["mean"]
    assert runs[True] > runs[False] + 10.0
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
