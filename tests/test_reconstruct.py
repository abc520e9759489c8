"""Learned rounding and block reconstruction (BRECQ / EDA-DM FBR) on tiny models."""
from __future__ import annotations

import copy

import pytest
import torch

from diffq.errors import CalibrationError, ConfigError
from diffq.formats import FPFormat, IntFormat
from diffq.layers import is_quant_layer
from diffq.methods import reconstruct as recon_module
from diffq.methods.adaround import AdaRound, beta_schedule
from diffq.methods.blocks import find_units
from diffq.methods.recon_bank import Bank
from diffq.methods.reconstruct import reconstruct
from diffq.model_quant import float_mode
from diffq.quantizer import Quantizer
from tests.helpers import A8, pipeline_and_calib, quantized_copy

QUICK = {"iters": 40, "lr": 3e-3, "reg_weight": 0.01, "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2,
         "act_iters": 10, "act_lr": 4e-4, "fine_grained_weight": 1.0, "fbr_regularizer": False, "qdrop": 0.0, "seed": 0}
W4 = {"format": "int", "bits": 4, "granularity": "channel", "symmetric": True}


def _weight_quantizer(fmt, weight: torch.Tensor, symmetric: bool = True) -> Quantizer:
    q = Quantizer(fmt, kind="weight", granularity="channel", symmetric=symmetric)
    q.calibrate_weight(weight)
    return q


@pytest.mark.parametrize("fmt,symmetric", [(IntFormat(4), True), (IntFormat(3, signed=False), False),
                                           (FPFormat(2, 1), True), (FPFormat(4, 3), True), (FPFormat(3, 0), True)])
def test_rounding_starts_at_the_weight_and_ends_on_the_grid(fmt, symmetric):
    torch.manual_seed(0)
    w = torch.randn(16, 24) * torch.rand(16, 1)
    q = _weight_quantizer(fmt, w, symmetric)
    r = AdaRound(q, w)
    soft = r()
    lo, hi = r._dequant(r.down * 0 - 1e9), r._dequant(r.down * 0 + 1e9)  # the grid's range per channel
    # h(V0) = frac: the FP weight itself (clamped to the grid's range)
    wc = torch.minimum(torch.maximum(w, lo), hi)
    assert torch.allclose(soft, wc, atol=1e-5 * float(w.abs().max()))
    with torch.no_grad():
        r.V.normal_(0, 3)  # any learned state
    hard = r.hard()
    assert torch.equal(q(hard), hard)  # every value on the quantizer's grid
    down = r._dequant(r.down)
    up = r._dequant(r.down + r.step)
    assert torch.all((hard == down) | (hard == up))  # and one of the two neighbours of the weight
    assert torch.all(down <= wc + 1e-6) and torch.all(up >= wc - 1e-6)
    rtn = q(w)
    with torch.no_grad():  # V >= 0 exactly where RTN rounds up: hard rounding reproduces RTN
        r.V.copy_(torch.where(rtn > down, 1.0, -1.0).reshape(r.V.shape) if r.V.shape == rtn.shape
                  else torch.where(q.view(rtn) > q.view(down), 1.0, -1.0))
    assert torch.equal(r.hard(), rtn)


def test_regulariser_and_beta_schedule():
    w = torch.randn(4, 8)
    r = AdaRound(_weight_quantizer(IntFormat(4), w), w)
    with torch.no_grad():
        r.V.fill_(10.0)
    assert float(r.regularizer(2.0).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        r.V.fill_(float(torch.logit(torch.tensor(0.6 / 1.2))))  # h = 0.5: the maximum
    assert float(r.regularizer(2.0).detach()) == pytest.approx(32.0, rel=1e-4)
    assert beta_schedule(10, 100, 0.2, 20, 2) is None
    assert beta_schedule(20, 100, 0.2, 20, 2) == 20 and beta_schedule(100, 100, 0.2, 20, 2) == 2


def test_learned_rounding_refuses_formats_without_a_grid():
    from diffq.formats import TernaryFormat

    w = torch.randn(4, 8)
    q = Quantizer(TernaryFormat(), kind="weight", granularity="channel", observer="absmean")
    q.calibrate_weight(w)
    with pytest.raises(ConfigError, match="static int or fp"):
        AdaRound(q, w)


@pytest.mark.parametrize("family,expected", [
    ("sd", ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]),
    ("flux", ["transformer_blocks.0", "single_transformer_blocks.0"]),
    ("dit", ["transformer_blocks.0"]),
    ("sd3", ["transformer_blocks.0"]),
])
def test_blocks_are_found_in_execution_order(family, expected):
    _, model, _, calib = quantized_copy(family, weight=W4, act=A8)
    with float_mode(model):
        names = [u.name for u in find_units(model, "block", lambda: model(**calib[0].to("cpu"), return_dict=False))]
    assert names[: len(expected)] == expected and len(names) == len(set(names))
    layers = find_units(model, "layer", lambda: model(**calib[0].to("cpu"), return_dict=False))
    assert all(len(u.modules) == 1 and is_quant_layer(u.modules[0]) for u in layers)
    with pytest.raises(ConfigError, match="granularity 'stage'"):
        find_units(model, "stage", lambda: None)
    flat = torch.nn.Sequential(next(m for m in model.modules() if is_quant_layer(m)))  # a layer outside any block
    with pytest.raises(ConfigError, match="has no block-level units with quantized layers"):
        find_units(flat, "block", lambda: None)


@pytest.mark.parametrize("mode,family", [("block", "sd"), ("fbr", "sd"), ("layer", "flux"), ("block", "flux")])
def test_reconstruction_lowers_every_unit_output_error(mode, family):
    _, model, _, calib = quantized_copy(family, weight=W4, act=A8)
    rc = {**QUICK, "qdrop": 0.5 if mode == "fbr" else 0.0}
    stats = reconstruct(model, calib, rc, mode, device=torch.device("cpu"), dtype=torch.float32)
    losses = stats["recon_loss"]
    assert stats["recon_units"] == len(losses) > 0
    improved = [v["recon"] < v["rtn"] for v in losses.values()]
    assert sum(improved) >= 0.8 * len(improved), losses
    layers = [m for m in model.modules() if is_quant_layer(m) and m.weight_quantizer is not None]
    rounded = [m for m in layers if m.learned_rounding]
    assert rounded and all(m.rounding is None for m in layers)
    for m in rounded:  # the frozen weights are on the grid
        assert torch.equal(m.weight_quantizer(m.weight_fq), m.weight_fq)


def test_a_unit_learned_worse_than_rtn_keeps_its_rtn_weights(monkeypatch):
    _, model, _, calib = quantized_copy("sd", weight=W4, act=A8)
    rtn = {n: m.weight_fq.clone() for n, m in model.named_modules()
           if is_quant_layer(m) and m.weight_quantizer is not None}

    def scramble(model, trainee, *args, **kwargs):  # a rounding that lands on the opposite neighbour of RTN
        for r in trainee.roundings.values():
            with torch.no_grad():
                r.V.copy_(-r.V.sign())
        return 0.0

    monkeypatch.setattr(recon_module, "_optimise", scramble)
    stats = reconstruct(model, calib, QUICK, "block", device=torch.device("cpu"), dtype=torch.float32)
    assert all(v["kept"] == "rtn" and v["recon"] > v["rtn"] for v in stats["recon_loss"].values())
    for n, m in model.named_modules():
        if n in rtn:
            assert not m.learned_rounding and torch.equal(m.weight_fq, rtn[n])


def test_nan_during_reconstruction_names_the_unit_and_keeps_finished_units(monkeypatch):
    _, model, _, calib = quantized_copy("sd", weight=W4, act=A8)
    calls = {"n": 0}
    original = recon_module._recon_loss

    def failing(out, target):
        calls["n"] += 1
        value = original(out, target)
        return value * float("nan") if calls["n"] > 150 else value

    monkeypatch.setattr(recon_module, "_recon_loss", failing)
    unit = r"(down_blocks|mid_block|up_blocks)\S*"
    with pytest.raises(CalibrationError, match=rf"reconstruction of {unit} hit a NaN/Inf loss at step \d+"):
        reconstruct(model, calib, QUICK, "block", device=torch.device("cpu"), dtype=torch.float32)
    down0 = [m for n, m in model.named_modules() if n.startswith("down_blocks.0") and is_quant_layer(m)]
    assert down0 and all(m.learned_rounding for m in down0 if m.weight_quantizer is not None)
    assert all(m.rounding is None for m in model.modules() if is_quant_layer(m))


def test_reconstructed_model_exports_and_reloads_bit_exact(tmp_path):
    from diffq.export import export_quantized, load_quantized

    _, model, specs, calib = quantized_copy("sd", weight=W4, act=A8)
    reconstruct(model, calib, {**QUICK, "iters": 20, "act_iters": 5}, "block", device=torch.device("cpu"),
                dtype=torch.float32)
    with torch.no_grad():
        expected = model(**calib[0].to("cpu"), return_dict=False)[0]
    path = export_quantized(model, specs, tmp_path / "m", {})
    fresh = copy.deepcopy(pipeline_and_calib("sd")[0].unet)  # the cached pipeline stays FP
    load_quantized(path.parent, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**calib[0].to("cpu"), return_dict=False)[0], expected)


def test_cli_reconstruction_beats_rtn_and_checks_its_config(compose, tmp_path):
    from diffq.job import run

    base = ["model=tiny_sd15", "quant=w4a8", "eval.grid=false", "calib.num_prompts=4", "calib.num_steps=2",
            "model.steps=4"]
    rtn = run(compose(*base), tmp_path / "rtn")
    brecq = run(compose(*base, "quant.recon=block", "recon=quick", "recon.iters=40", "recon.act_iters=10"),
                tmp_path / "brecq")
    assert brecq["calib"]["recon"] == "block" and brecq["calib"]["recon_units"] == 5
    assert brecq["fidelity"]["psnr"]["mean"] > rtn["fidelity"]["psnr"]["mean"]
    with pytest.raises(ConfigError, match="unknown quant.recon 'blocks'"):
        run(compose(*base, "quant.recon=blocks"), tmp_path / "x")
    with pytest.raises(ConfigError, match="keep_fp_weights=true"):
        run(compose(*base, "quant.recon=fbr", "quant.keep_fp_weights=false"), tmp_path / "y")


def test_pair_units_are_resnet_transformer_pairs_in_execution_order():
    _, model, _, calib = quantized_copy("sd", weight=W4, act=A8)
    with float_mode(model):
        units = find_units(model, "pair", lambda: model(**calib[0].to("cpu"), return_dict=False))
    names = [u.name for u in units]
    assert "down_blocks.1.resnets.0+attentions.0" in names and "mid_block.resnets.0+attentions.0" in names
    assert "mid_block.resnets.1" in names and "down_blocks.0.resnets.0" in names
    assert names.index("down_blocks.0.resnets.0") < names.index("mid_block.resnets.0+attentions.0")
    pair = units[names.index("down_blocks.1.resnets.0+attentions.0")]
    assert [type(m).__name__ for m in pair.modules] == ["ResnetBlock2D", "Transformer2DModel"]


def test_pair_reconstruction_with_mixed_batches_lowers_the_error():
    _, model, _, calib = quantized_copy("sd", weight=W4, act=A8)
    stats = reconstruct(model, calib, {**QUICK, "unit": "pair", "batch_size": 3}, "block", device=torch.device("cpu"),
                        dtype=torch.float32)
    assert stats["recon_unit"] == "pair" and any("+attentions" in n for n in stats["recon_loss"])
    improved = [v["recon"] < v["rtn"] for v in stats["recon_loss"].values()]
    assert sum(improved) >= 0.8 * len(improved), stats["recon_loss"]


def test_training_batches_mix_calibration_calls():
    import numpy as np

    bank = Bank([], [], {}, [slice(i * 4, i * 4 + 4) for i in range(4)], set())
    rng = np.random.default_rng(0)
    calls = [set((recon_module._batch_index(bank, 4, rng) // 4).tolist()) for _ in range(20)]
    assert sum(len(c) > 1 for c in calls) > 15  # rows from several calls (timesteps) in one batch
    one = recon_module._batch_index(bank, None, rng)
    assert isinstance(one, slice) and one.stop - one.start == 4


def test_loss_sums_over_the_feature_axis():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert recon_module.feature_loss(a, b).item() == 3.0  # 3 channels summed, the rest averaged
    assert recon_module.feature_loss(torch.zeros(2, 5, 7), torch.ones(2, 5, 7)).item() == 7.0  # tokens x features


def test_mixed_batches_with_a_broadcast_negative_prompt():
    """True-CFG samplers (FLUX) call the unconditional branch with one negative-prompt embedding for
    all rows: batches that mix such calls with conditional ones expand it row by row."""
    from diffq.calib import CalibSample

    _, model, _, calib = quantized_copy("flux", weight=W4, act=A8)
    uncond = [CalibSample({**s.kwargs, "encoder_hidden_states": s.kwargs["encoder_hidden_states"][:1],
                           "pooled_projections": s.kwargs["pooled_projections"][:1]}, s.step) for s in calib]
    mixed = [x for pair in zip(calib, uncond) for x in pair]
    stats = reconstruct(model, mixed, {**QUICK, "batch_size": 3}, "block", device=torch.device("cpu"),
                        dtype=torch.float32)
    improved = [v["recon"] < v["rtn"] for v in stats["recon_loss"].values()]
    assert stats["recon_units"] > 0 and sum(improved) >= 0.8 * len(improved), stats["recon_loss"]
