"""BinaryDM: the multi-basis layout from resolution levels, LRM, progressive initialisation, cost."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffq import job
from diffq.errors import ConfigError
from diffq.eval.cost import layer_macs, operations
from diffq.finetune.data import TrainBatch
from diffq.finetune.engine import MasterWeights, make_optimizer, train_step
from diffq.finetune.losses import build_extra_losses
from diffq.finetune.select import select_trainable
from diffq.finetune.stage import plan_stages
from diffq.formats import IntFormat
from diffq.levels import high_resolution_layers, middle_out_groups, unet_levels
from diffq.model_quant import partial_quant
from diffq.quantizer import Quantizer
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import LayerSpec, TensorQuant
from tests.helpers import A8, denoiser, outputs, pipeline_and_calib, quantized_copy, rel_error

B1 = {"format": "binary", "bits": 1, "granularity": "channel"}
A4_LSQ = {"format": "int", "bits": 4, "granularity": "tensor", "symmetric": True, "observer": "lsq"}
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


def test_middle_out_groups_start_at_the_middle_block_then_go_level_by_level_to_the_outer_layers():
    unet = denoiser(pipeline_and_calib("sd")[0])  # two levels: the code's groups are mid, level 1, level 0
    groups = middle_out_groups(unet)
    assert len(groups) == 3 and groups[0] and all(n.startswith("mid_block.") for n in groups[0])
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in groups[1]} == {"down_blocks.1", "up_blocks.0"}
    assert "down_blocks.0.resnets.0.conv1" in groups[2] and "up_blocks.1.resnets.0.conv1" in groups[2]
    assert "conv_in" in groups[2] and "time_embedding.linear_1" in groups[2]
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


def test_progressive_stages_binarise_one_group_a_step_with_activations_on_and_train_everything(compose):
    ft = OmegaConf.to_container(compose("quant=binarydm_w1a4", "finetune.steps=30").finetune, resolve=True)
    fp, model, specs, calib = quantized_copy("sd", weight=B1, act=A4_LSQ)
    stages, _ = plan_stages(model, "sd", specs, ft, NO_ATTN)
    assert [s.name for s in stages] == ["progressive0", "progressive1", "progressive2", "qat"]
    assert [s.settings["steps"] for s in stages] == [1, 1, 1, 27] and all(s.acts for s in stages)
    assert all(s.plan == stages[-1].plan for s in stages)  # the code's optimiser holds every parameter throughout
    assert all(s.settings["eval_every"] == 0 and s.settings["keep"] == "last" for s in stages[:-1])
    groups = middle_out_groups(model)
    quantized = {s.name for s in specs if s.quantized}
    assert set(stages[0].quantized) == set(groups[0]) & quantized and stages[-1].quantized is None
    assert set(stages[1].quantized) == (set(groups[0]) | set(groups[1])) & quantized
    assert set(stages[2].quantized) == quantized
    five = {**ft, "binarydm": {**ft["binarydm"], "progressive_steps": 5}}
    assert [s.settings["steps"] for s in plan_stages(model, "sd", specs, five, NO_ATTN)[0]] == [5, 5, 5, 15]
    ref, full = outputs(fp, calib), outputs(model, calib)
    with partial_quant(model, stages[0].quantized, acts=stages[0].acts):
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
        "finetune.data_weight=0", "finetune.distill_weight=1", "finetune.eval_every=5"]


def test_job_trains_binarydm_reports_cost_and_reloads_bit_exactly(compose, tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    m = job.run(compose(*TINY, cache, "quant=binarydm_w1a4", "export=true"), tmp_path / "b")
    f = m["finetune"]
    assert [s["name"] for s in f["stages"]] == ["progressive0", "progressive1", "progressive2", "qat"]
    assert f["steps"] == 14 and f["params_by_kind"]["other"] > 0  # the norms trained too
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


def test_naive_baseline_is_one_basis_everywhere_with_the_same_training(compose):
    cfg = compose("quant=binary_naive_w1a4")
    assert cfg.quant.method == "rtn" and cfg.quant.weight.bits == 1 and cfg.finetune.recipe == "plain"
    assert cfg.quant.act.observer == compose("quant=binarydm_w1a4").quant.act.observer == "lsq"  # the same start
    dm = compose("quant=binarydm_w1a4").finetune
    for key in ("steps", "batch_size", "train", "data", "optim", "distill_weight", "data_weight"):
        assert cfg.finetune[key] == dm[key], key  # the same data, budget, optimiser and trained parameters
    assert not cfg.finetune.extra_losses and dm.extra_losses[0].name == "lrm"


def test_lsq_observer_sets_the_step_to_2_mean_abs_over_sqrt_qp_averaged_over_batches():
    x1 = torch.tensor([[1.0, -2.0, 3.0, -4.0]])  # mean |x| 2.5
    x2 = torch.tensor([[0.5, -0.5, 0.5, -0.5]])  # mean |x| 0.5
    for bits, qp in ((4, 7), (8, 127)):
        q = Quantizer(IntFormat(bits), kind="act", granularity="tensor", symmetric=True, observer="lsq")
        q.begin_calibration()
        q(x1)
        q(x2)
        q.end_calibration()
        expected = (2 * 2.5 / math.sqrt(qp) + 2 * 0.5 / math.sqrt(qp)) / 2  # each batch's step, averaged
        assert float(q.scale) == pytest.approx(expected, rel=1e-6)
    dyn = Quantizer(IntFormat(4), kind="act", granularity="tensor", symmetric=True, observer="lsq", dynamic=True)
    step = 2 * 2.5 / math.sqrt(7)  # the released _ActQ: this call's own step
    assert torch.allclose(dyn(x1), (x1 / step).round().clamp(-7, 7) * step)
    x = x1.clone().requires_grad_(True)
    dyn(x).sum().backward()  # straight through inside the grid, nothing through the statistic
    assert torch.equal(x.grad, torch.ones_like(x1))


def test_binarydm_presets_start_activations_from_lsq(compose):
    for bits in (4, 8):
        assert compose(f"quant=binarydm_w1a{bits}").quant.act.observer == "lsq"
    tq = TensorQuant.from_mapping(A4_LSQ, "act")
    assert tq.build_quantizer("act").observer_name == "lsq"


def _lrm_blocks(unet: nn.Module, ft) -> set[str]:
    """Names of the modules the preset's LRM records on one forward of ``unet``."""
    (lrm,) = build_extra_losses(ft.extra_losses, {}, ROLES, unet)
    c = unet.config
    try:
        lrm.begin("teacher")
        with torch.no_grad():
            unet(torch.randn(1, c.in_channels, 8, 8), 10, torch.randn(1, 4, c.cross_attention_dim), return_dict=False)
    finally:
        lrm.remove()
    return set(lrm.outputs["teacher"])


def test_lrm_hooks_every_part_of_the_codes_unet_blocks(compose):
    from diffusers import UNet2DConditionModel

    from diffq.testbed.assets import asset_path

    ft = compose("quant=binarydm_w1a4").finetune
    code_blocks = {  # the released code's TimestepEmbedSequential outputs, in diffusers names
        "conv_in", "down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0", "down_blocks.1.attentions.0",
        "mid_block", "up_blocks.0.attentions.0", "up_blocks.0.upsamplers.0", "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1"}
    parts = code_blocks | {"down_blocks.1.resnets.0", "up_blocks.0.resnets.0", "up_blocks.0.resnets.1",
                           "up_blocks.0.attentions.1"}
    testbed = UNet2DConditionModel.from_pretrained(asset_path("unet_pipeline"), subfolder="unet").eval()
    for unet in (denoiser(pipeline_and_calib("sd")[0]), testbed):
        assert _lrm_blocks(unet, ft) == parts


def test_preset_trains_norms_with_weight_decay_and_lrm_without_distillation(compose):
    cfg = OmegaConf.to_container(compose("quant=binarydm_w1a4").finetune, resolve=True)
    fp, model, specs, calib = quantized_copy("sd", weight=B1, act=A4_LSQ)
    (stage, *_), _ = plan_stages(model, "sd", specs, cfg, NO_ATTN)
    norms = {n for n, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    assert norms and norms == {n for n, k in stage.plan.items() if k == ("other",)}
    sel = select_trainable(model, stage.plan)
    norm = model.get_submodule("mid_block.resnets.0.norm1")
    assert any(p is norm.weight for p in sel.groups["other"]) and norm.weight in sel.teacher  # + its FP copy
    masters = MasterWeights(sel.parameters)
    optimizer = make_optimizer(sel, cfg["optim"], masters)
    decay = {g["kind"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay["other"] == decay["weight"] == decay["bias"] == 0.01 and decay["act_scale"] == 0.0
    assert cfg["distill_weight"] == 0 and cfg["data_weight"] == 1
    extra = build_extra_losses(cfg["extra_losses"], {}, ROLES, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    kwargs = calib[0].to("cpu")
    batch = TrainBatch(kwargs, torch.randn(fp(**kwargs, return_dict=False)[0].shape, generator=torch.Generator()))
    before, idle = norm.weight.detach().clone(), model.get_submodule("conv_norm_out").weight
    idle_before = idle.detach().clone()
    idle.register_hook(lambda g: torch.zeros_like(g))  # no gradient: only the decay moves it
    try:
        loss = train_step(model, model, sel, masters, batch, extra, cfg, optimizer, scheduler,
                          torch.device("cpu"), torch.float32, 0)
    finally:
        for e in extra:
            e.remove()
    assert extra[0].outputs["teacher"] and math.isfinite(loss)  # LRM's teacher pass ran without distillation
    assert not torch.equal(norm.weight, before)
    assert not torch.equal(idle, idle_before)  # decoupled decay: p (1 - lr 0.01), Adam's step is 0 at a 0 gradient
    assert torch.allclose(idle.detach(), idle_before * (1 - cfg["optim"]["lr"] * 0.01), rtol=1e-7, atol=0)


def test_bad_binarydm_settings_stop_before_calibration(compose):
    with pytest.raises(ConfigError, match="observer lsq is symmetric only"):
        job.check_config(compose("quant=binarydm_w1a4", "quant.act.symmetric=false"))  # lsq is symmetric only
    with pytest.raises(ConfigError, match="unknown observer"):
        job.check_config(compose("quant=binarydm_w1a4", "quant.act.observer=lsqq"))
    with pytest.raises(ConfigError, match="progressive_steps"):
        job.check_config(compose("quant=binarydm_w1a4", "finetune.binarydm.progressive_steps=0"))
    with pytest.raises(ConfigError, match="no loss"):  # the preset's loss is the data's: data-free needs distillation
        job.check_config(compose("quant=binarydm_w1a4", "finetune.data.source=trajectory", "finetune.data_weight=0"))
    ft = OmegaConf.to_container(compose("quant=binarydm_w1a4").finetune, resolve=True)
    _, model, specs, _ = quantized_copy("sd", weight=B1, act=A4_LSQ)
    roles_other = {**ft, "train": [{"roles": ["ffn_up"], "kinds": ["other"]}]}
    with pytest.raises(ConfigError, match="kind other .* not roles"):
        plan_stages(model, "sd", specs, roles_other, NO_ATTN)
    with pytest.raises(ConfigError, match="raise finetune.steps"):
        plan_stages(model, "sd", specs, {**ft, "steps": 3}, NO_ATTN)  # 3 groups x 1 step leave nothing
