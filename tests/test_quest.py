"""QuEST: its stages, selection by roles or by measured activation sensitivity, and what trains."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from diffq import job
from diffq.errors import ConfigError
from diffq.export import export_quantized, load_quantized
from diffq.finetune.engine import MasterWeights, make_optimizer
from diffq.finetune.select import select_trainable
from diffq.finetune.sensitivity import activation_sensitivity, most_sensitive
from diffq.finetune.stage import finetune_denoiser, plan_stages
from diffq.layers import layer_table
from diffq.methods import rtn
from diffq.models import Sampling
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec
from tests.helpers import A8, KEEP_FP, denoiser, outputs, pipeline_and_calib, quantized_copy

W4 = {"format": "int", "bits": 4, "granularity": "channel", "symmetric": True}
NO_ATTN = {"enabled": False}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quest(compose):
    """The finetuning settings the quest_w4a4 preset picks."""
    return OmegaConf.to_container(compose("quant=quest_w4a4").finetune, resolve=True)


def _with(ft: dict, **quest) -> dict:
    return {**ft, "quest": {**ft["quest"], **quest}}


def _roles(model, family: str, roles: set[str]) -> set[str]:
    return {n for n, (r, _) in quantizable_layers(model, family).items() if r in roles}


@pytest.mark.parametrize("family,temporal", [("sd", {"time_proj"}), ("dit", {"adanorm"})])
def test_the_released_selection_follows_roles_and_is_deterministic(quest, family, temporal):
    _, model, specs, _ = quantized_copy(family, weight=W4)
    stages, _ = plan_stages(model, family, specs, quest, NO_ATTN)
    assert [s.name for s in stages] == ["tla", "cma"]
    tla, cma = (s.plan for s in stages)
    assert set(tla) == _roles(model, family, temporal) and set(tla.values()) == {("weight", "bias", "act_scale")}
    ffn = _roles(model, family, {"ffn_up", "ffn_down"})
    assert ffn and {n for n, k in cma.items() if "weight" in k} == ffn
    static_inputs = {s.name for s in specs if s.quantized and s.act is not None}
    assert {n for n, k in cma.items() if k == ("act_scale",)} == static_inputs - ffn  # the other step sizes
    assert not any("weight_scale" in k for s in stages for k in s.plan.values())  # weight quantizers frozen
    again, _ = plan_stages(model, family, specs, quest, NO_ATTN)
    assert [s.plan for s in again] == [s.plan for s in stages]


def test_stage_order_learning_rates_and_losses_are_the_presets(compose, quest):
    cfg = compose("quant=quest_w4a4")
    assert cfg.quant.recon == "block" and cfg.recon.name == "quick" and cfg.finetune.recipe == "quest"
    _, model, specs, _ = quantized_copy("sd", weight=W4)
    tla, cma = plan_stages(model, "sd", specs, quest, NO_ATTN)[0]
    steps = quest["steps"]
    tla_steps = round(0.89 * steps)  # the code's TLA share
    assert (tla.settings["steps"], cma.settings["steps"]) == (tla_steps, steps - tla_steps)
    assert (tla.settings["optim"]["lr"], tla.settings["optim"]["act_scale_lr"]) == (1e-5, 1e-5)
    assert (cma.settings["optim"]["lr"], cma.settings["optim"]["act_scale_lr"]) == (1e-5, 1e-4)
    assert tla.settings["distill_weight"] == cma.settings["distill_weight"] == 2.0  # 2 L_G
    def losses(stage):
        return [(e["name"], e["weight"], tuple(e.get("roles", ()))) for e in stage.settings["extra_losses"]]

    assert losses(tla) == [("layer_mse", 1.0, ("time_proj", "adanorm"))]  # each stage over its own layers
    assert losses(cma) == [("layer_mse", 1.0, ("ffn_up", "ffn_down"))]
    sel = select_trainable(model, cma.plan)
    lrs = {g["kind"]: g["lr"] for g in make_optimizer(sel, cma.settings["optim"], MasterWeights(sel.parameters))
           .param_groups}
    sel.finish()
    assert lrs == {"weight": 1e-5, "bias": 1e-5, "act_scale": 1e-4}


@pytest.mark.parametrize("select,names,steps", [("temporal", ["tla"], [200]), ("sensitive", ["cma"], [200]),
                                                ("all", ["tla", "cma"], [178, 22])])
def test_selection_variants(quest, select, names, steps):
    _, model, specs, _ = quantized_copy("sd", weight=W4)
    stages, _ = plan_stages(model, "sd", specs, {**_with(quest, select=select), "steps": 200}, NO_ATTN)
    assert [s.name for s in stages] == names and [s.settings["steps"] for s in stages] == steps
    if select == "all":
        quantized = {s.name for s in specs if s.quantized}
        assert quantized <= {n for n, k in stages[1].plan.items() if "weight" in k}


def test_activation_sensitivity_falls_with_bits_and_picks_the_least_robust_layers(quest):
    pipe, calib = pipeline_and_calib("sd")
    _, model, specs, _ = quantized_copy("sd", weight=W4)
    names = [s.name for s in specs if s.quantized and s.act is not None and s.role != "time_proj"][:12]
    scores = activation_sensitivity(model, specs, names, [8, 4], calib[:2], CPU, torch.float32)
    assert all(scores[n][8] > scores[n][4] + 6 for n in names)  # about 6 dB a bit
    chosen = most_sensitive(scores, 0.25)
    assert len(chosen) == 3 and chosen == sorted(names, key=lambda n: scores[n][4])[:3]

    calls = []

    def measure(candidates, bits, n):
        calls.append((len(candidates), bits, n))
        return {c: {4: float(i), 8: 50.0} for i, c in enumerate(candidates)}

    ft = _with(quest, sensitive="measured", fraction=0.1)
    stages, info = plan_stages(model, "sd", specs, ft, NO_ATTN, measure)
    cma = stages[1].plan
    assert calls == [(calls[0][0], [8, 6, 4], 8)] and len(info["sensitivity"]["chosen"]) == -(-calls[0][0] // 10)
    assert {n for n, k in cma.items() if "weight" in k} == set(info["sensitivity"]["chosen"])
    assert not set(info["sensitivity"]["chosen"]) & _roles(model, "sd", {"time_proj", "adanorm"})


def test_only_the_selection_trains_and_weight_quantizers_stay_frozen(quest, tmp_path):
    pipe, calib = pipeline_and_calib("sd")
    pipe = copy.deepcopy(pipe)
    model = denoiser(pipe)
    specs = resolve_spec(quantizable_layers(model, "sd"), W4, A8, KEEP_FP, ROLES)
    rtn.apply(model, specs, calib, {}, device=CPU, dtype=torch.float32)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # no validation, keep=last: at this lr the best validated state can be the PTQ start, undoing the training checked
    ft = {**quest, "steps": 6, "batch_size": 2, "eval_every": 0, "keep": "last",
          "data": {**quest["data"], "num_prompts": 2, "batch_size": 2},
          "optim": {**quest["optim"], "lr": 1e-2, "act_scale_lr": 1e-2}, "quest": {**quest["quest"],
                                                                                  "tla_act_scale_lr": 1e-2}}
    stats = finetune_denoiser(pipe, "sd", specs, ft, NO_ATTN, calib=calib, calib_prompts=["a red circle"],
                              smp=Sampling(4, 4.0, 32, 2, {}), model_key={"tiny": "sd"}, cache_dir=str(tmp_path),
                              state_key={"test": 1}, device=CPU)
    after = model.state_dict()
    assert [s["name"] for s in stats["stages"]] == ["tla", "cma"] and stats["steps"] == 6
    trained_weights = {n for n, k in stats["layers"].items() if "weight" in k}
    assert trained_weights == _roles(model, "sd", {"time_proj", "ffn_up", "ffn_down"})
    for key, old in before.items():
        layer = key.rsplit(".", 1)[0]
        if "weight_quantizer" in key or key.endswith("zero_point"):
            assert torch.equal(old, after[key]), f"{key}: weight quantizers and zero points are frozen"
        elif key.endswith((".weight", ".bias")) and layer not in trained_weights:
            assert torch.equal(old, after[key]), f"{key} changed without being selected"
        elif key.endswith(".weight") and layer in trained_weights:
            assert not torch.equal(old, after[key]), f"{key} was selected but did not change"
    assert 0 < stats["fraction"] < 0.5 and stats["params"] == sum(stats["params_by_kind"].values())


BASE = ["model=tiny_sd15", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3"]
TINY = [*BASE, "recon.iters=5", "recon.act_iters=2", "finetune.steps=6", "finetune.data.num_prompts=2",
        "finetune.batch_size=2"]


def test_job_runs_quest_with_timestep_groups_reports_exports_and_reloads(compose, tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    m = job.run(compose(*TINY, cache, "quant=quest_w4a4", "quant.act.timestep_groups=2",
                      "quant.act.timestep_init=shared", "export=true"), tmp_path / "q")
    f = m["finetune"]
    assert f["name"] == "quest" and [s["name"] for s in f["stages"]] == ["tla", "cma"]
    assert len(f["loss_curve"]) == 6 and 0 < f["fraction"] < 1
    spec = (tmp_path / "q" / "spec.txt").read_text()
    assert "stage tla: 5 steps, lr 1e-05, step-size lr 1e-05" in spec and "stage cma: 1 steps" in spec
    assert "uint4/channel/asym/t2s" in spec and "int8/channel/sym" in spec  # groups; 8-bit first/last layers
    saved = json.loads((tmp_path / "q" / "metrics.json").read_text())["finetune"]
    assert saved["stages"][1]["act_scale_lr"] == 1e-4
    loaded = job.run(compose(*BASE, cache, f"load={tmp_path / 'q' / 'model'}"), tmp_path / "loaded")
    assert loaded["fidelity"]["psnr"]["per_image"] == m["fidelity"]["psnr"]["per_image"]


@pytest.mark.parametrize("overrides,match", [
    (["finetune.quest.select=nope"], "unknown finetune.quest.select"),
    (["finetune.quest.sensitive=nope"], "unknown finetune.quest.sensitive"),
    (["finetune.quest.temporal_roles=[nope]"], "unknown role"),
    (["quant.weight.timestep_groups=2"], "static activation quantizers"),
    (["quant.act.timestep_groups=2"], "calib.num_steps=4"),  # 2 steps: each group's range would be one step's
    (["quant.act.timestep_groups=3", "quant.act.timestep_init=shared"], "calib.num_steps=3"),
])
def test_bad_quest_settings_fail_before_the_pipeline_loads(compose, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline before failing"))
    with pytest.raises(ConfigError, match=match):
        job.run(compose(*TINY, "quant=quest_w4a4", *overrides), tmp_path / "run")


def test_per_input_channel_activation_scales_calibrate_and_export(tmp_path):
    """quest_w4a4's 4-bit inputs: one min-max range per input channel, exported and reloaded bit-exactly."""
    a4 = {"format": "int", "bits": 4, "granularity": "channel", "symmetric": False}
    fp, model, specs, calib = quantized_copy("sd", weight=W4, act=a4)
    name, layer = next((n, m) for n, m in layer_table(model).items() if isinstance(m, torch.nn.Conv2d)
                       and m.input_quantizer is not None)
    seen = []
    hook = dict(fp.named_modules())[name].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    outputs(fp, calib)
    hook.remove()
    x = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in seen], dim=1)  # [C, everything]
    lo, hi = x.amin(1).clamp(max=0), x.amax(1).clamp(min=0)
    scale = layer.input_quantizer.params()["scale"].reshape(-1)
    assert scale.numel() == layer.in_channels
    assert torch.allclose(scale, (hi - lo) / 15, rtol=1e-5)  # uint4: 15 steps over each channel's range
    export_quantized(model, specs, tmp_path / "model")
    reloaded = load_quantized(tmp_path / "model", copy.deepcopy(fp))
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, calib), outputs(reloaded, calib)))
