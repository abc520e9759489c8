"""BinaryDM: the multi-basis layout from resolution levels, LRM, progressive initialisation, cost."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffq import job
from diffq.errors import ConfigError
from diffq.eval.cost import layer_macs, operations
from diffq.finetune.losses import build_extra_losses
from diffq.finetune.stage import plan_stages
from diffq.levels import high_resolution_layers, middle_out_groups, unet_levels
from diffq.model_quant import partial_quant
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import LayerSpec, TensorQuant
from tests.helpers import A8, denoiser, outputs, pipeline_and_calib, quantized_copy, rel_error

B1 = {"format": "binary", "bits": 1, "granularity": "channel"}
NO_ATTN = {"enabled": False}


def test_high_resolution_layers_are_the_upper_unet_levels_and_the_edge_blocks():
    pipe, _ = pipeline_and_calib("sd")  # two levels: 0 (input resolution) and 1 (half, the middle block's)
    unet = denoiser(pipe)
    levels = unet_levels(unet)
    assert levels["down_blocks.0.resnets.0.conv1"] == 0 and levels["up_blocks.1.resnets.0.conv1"] == 0
    assert levels["mid_block.resnets.0.conv1"] == 1 and levels["down_blocks.1.resnets.0.conv1"] == 1
    assert levels["conv_in"] is None
    high = high_resolution_layers(unet, 0.5)
    assert high and set(high) == {n for n, lv in levels.items() if lv == 0}  # never the lowest level
    dit = denoiser(pipeline_and_calib("flux")[0])  # 1 double + 2 single blocks
    edges = high_resolution_layers(dit, edge_blocks=1)
    assert any(n.startswith("transformer_blocks.0.") for n in edges)
    assert any(n.startswith("single_transformer_blocks.1.") for n in edges)
    assert not any(n.startswith("single_transformer_blocks.0.") for n in edges)


def test_middle_out_groups_start_at_the_lowest_level_and_end_with_the_outer_layers():
    unet = denoiser(pipeline_and_calib("sd")[0])
    groups = middle_out_groups(unet)
    assert len(groups) == 2 and "mid_block.resnets.0.conv1" in groups[0]
    assert "down_blocks.0.resnets.0.conv1" in groups[1] and "conv_in" in groups[1]
    flux = denoiser(pipeline_and_calib("flux")[0])
    fg = middle_out_groups(flux)
    assert any(n.startswith("single_transformer_blocks.0.") for n in fg[0])  # the middle of 3 blocks
    assert sorted(n for g in fg for n in g) == sorted(quantizable_layers(flux))


def test_lrm_projection_is_fixed_after_the_first_batch_and_zero_for_identical_features():
    block = nn.Conv2d(8, 8, 1)
    (lrm,) = build_extra_losses([{"name": "lrm", "weight": 1e-4, "names": ["blk"]}], {}, ROLES,
                                nn.ModuleDict({"blk": block}))
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 8, 4, 4, generator=gen), torch.randn(2, 8, 4, 4, generator=gen) * 3
    for x in (x1, x2):
        lrm.begin("teacher")
        block(x)
        lrm.begin("student")
        block(x)
        assert float(lrm.term().detach()) == 0.0  # identical features
        if x is x1:
            mean, basis = (t.clone() for t in lrm.projections["blk"])
    assert basis.shape == (8, 2)  # channels / 4 components over the channel axis
    assert torch.equal(lrm.projections["blk"][0], mean) and torch.equal(lrm.projections["blk"][1], basis)
    lrm.begin("teacher")
    t = block(x1)
    lrm.begin("student")
    block(x1 + 0.5)
    expected = torch.nn.functional.mse_loss(((block(x1 + 0.5) - t).movedim(1, -1).reshape(-1, 8)) @ basis,
                                            torch.zeros(32, 2))
    assert float(lrm.term().detach()) == pytest.approx(float(expected), rel=1e-5)
    restored = build_extra_losses([{"name": "lrm", "weight": 1e-4, "names": ["blk"]}], {}, ROLES,
                                  nn.ModuleDict({"blk": block}))[0]
    restored.load_state(lrm.state())
    assert torch.equal(restored.projections["blk"][1], basis)
    with pytest.raises(ConfigError, match="hooks modules by name"):
        build_extra_losses([{"name": "lrm", "roles": ["ffn_up"]}], {}, ROLES, block)


def test_progressive_stages_binarise_from_the_middle_outwards_then_turn_activations_on(compose):
    ft = OmegaConf.to_container(compose("quant=binarydm_w1a4", "finetune.steps=30").finetune, resolve=True)
    fp, model, specs, calib = quantized_copy("sd", weight=B1, act={**A8, "symmetric": True, "bits": 4})
    stages, _ = plan_stages(model, "sd", specs, ft, NO_ATTN)
    assert [s.name for s in stages] == ["progressive0", "progressive1", "qat"]
    assert [s.settings["steps"] for s in stages] == [5, 5, 20] and [s.acts for s in stages] == [False, False, True]
    groups = middle_out_groups(model)
    quantized = {s.name for s in specs if s.quantized}
    assert set(stages[0].quantized) == set(groups[0]) & quantized and stages[-1].quantized is None
    assert set(stages[1].quantized) == (set(groups[0]) | set(groups[1])) & quantized
    ref, full = outputs(fp, calib), outputs(model, calib)
    with partial_quant(model, stages[0].quantized, acts=False):
        middle_only = outputs(model, calib)
    with partial_quant(model, [], acts=False):
        assert rel_error(ref, outputs(model, calib)) < 1e-5  # nothing quantized: the FP model
    assert 0 < rel_error(ref, middle_only) < rel_error(ref, full)
    no_prog = {**ft, "binarydm": {**ft["binarydm"], "progressive": False}}
    assert [s.name for s in plan_stages(model, "sd", specs, no_prog, NO_ATTN)[0]] == ["qat"]


def test_operations_count_bops_over_64_for_quantized_weights_and_inputs():
    lin, conv = nn.Linear(16, 8), nn.Conv2d(4, 6, 3, padding=1)
    assert layer_macs(lin, lin(torch.zeros(5, 16))) == 5 * 8 * 16
    assert layer_macs(conv, conv(torch.zeros(1, 4, 7, 7))) == 6 * 49 * 4 * 9
    w1 = TensorQuant.from_mapping(B1, "w")
    a4 = TensorQuant.from_mapping({**A8, "bits": 4}, "a")
    specs = [LayerSpec("a", "other", "linear", w1, a4), LayerSpec("b", "other", "linear", w1, None),
             LayerSpec("c", "other", "linear", None, None, skip=True)]
    ops = operations(nn.Module(), {"a": 6400, "b": 640, "c": 64}, specs)
    assert ops["ops_ratio"] == pytest.approx((6400 + 640 + 64) / (6400 * 4 / 64 + 640 + 64))


TINY = ["model=tiny_sd15", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3", "finetune.steps=14", "finetune.data.num_prompts=2",
        "finetune.batch_size=2", "finetune.data.source=trajectory", "finetune.data.prompts=calib",
        "finetune.data_weight=0"]


def test_job_trains_binarydm_reports_cost_and_reloads_bit_exactly(compose, tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    m = job.run(compose(*TINY, cache, "quant=binarydm_w1a4", "export=true"), tmp_path / "b")
    f = m["finetune"]
    assert [s["name"] for s in f["stages"]] == ["progressive0", "progressive1", "qat"] and f["steps"] == 14
    assert m["calib"]["multi_basis_layers"] > 0 and 0 < m["calib"]["multi_basis_param_fraction"] < 1
    spec = (tmp_path / "b" / "spec.txt").read_text()
    assert "binary2/channel" in spec and "binary1/channel" in spec and "int8/channel/sym" in spec
    cost = m["cost"]
    assert cost["storage_ratio_fp32"] > 8 and cost["ops_ratio"] > 2
    base = [c for c in TINY if not c.startswith("finetune.")]
    loaded = job.run(compose(*base, cache, f"load={tmp_path / 'b' / 'model'}"), tmp_path / "loaded")
    assert loaded["fidelity"]["psnr"]["per_image"] == m["fidelity"]["psnr"]["per_image"]
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["cost"]["ops_ratio"] == cost["ops_ratio"]


def test_naive_baseline_is_one_basis_everywhere(compose):
    cfg = compose("quant=binary_naive_w1a4")
    assert cfg.quant.method == "rtn" and cfg.quant.weight.bits == 1 and cfg.finetune.recipe == "plain"
    assert cfg.finetune.steps == compose("quant=binarydm_w1a4").finetune.steps  # the same budget
    assert not cfg.finetune.extra_losses
