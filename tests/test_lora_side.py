"""LoRA as a side branch kept at inference (finetune.lora.mode=side, 1.58-bit FLUX): the layer
computes ``Q(W) x + scale * B (A x)``; it starts at the PTQ model, the teacher ignores it, finishing
keeps it in the model dtype, exports reload it bit-exactly and the cost counts it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors import safe_open

from diffq import job
from diffq.errors import ConfigError
from diffq.eval.cost import LayerCounter, operations, resident_mb, weight_bits
from diffq.export import WEIGHTS_NAME, export_quantized, load_quantized, read_metadata
from diffq.finetune.lora import attach_side, check_lora, describe_side_branches, merge_adapter
from diffq.finetune.select import plan_selection, select_trainable
from diffq.layers import is_quant_layer, side_branches
from diffq.methods import rtn
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec
from tests.helpers import denoiser, outputs, pipeline_and_calib, quantized_copy

CPU = torch.device("cpu")
FP_LAYER = {"sd": "conv_out", "flux": "proj_out"}  # kept FP by ternary_w158: a branch converts it


def _ternary(compose, family: str, dtype: torch.dtype = torch.float32):
    """(FP denoiser, ternary_w158 copy in ``dtype``, specs, calib, the preset's finetune settings)."""
    cfg = compose("quant=ternary_w158", "finetune=ternary_distill_lora")
    assert cfg.finetune.name == "ternary_distill_lora"
    q = OmegaConf.to_container(cfg.quant, resolve=True)
    pipe, calib = pipeline_and_calib(family)
    model = copy.deepcopy(denoiser(pipe)).to(dtype)
    specs = resolve_spec(quantizable_layers(model, family), q["weight"], q["act"], q["rules"], ROLES)
    rtn.apply(model, specs, calib, q, device=CPU, dtype=dtype)
    return denoiser(pipe), model, specs, calib, OmegaConf.to_container(cfg.finetune, resolve=True)


def _side(model, specs, family: str, rules, rank: int = 4, alpha: float = 8.0):
    plan = plan_selection(quantizable_layers(model, family), specs, rules, ROLES)
    return select_trainable(model, plan, rank, alpha, seed=0, lora_mode="side")


@torch.no_grad()
def _randomize_b(model, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for branch in side_branches(model).values():
        branch.B.copy_(torch.randn(branch.B.shape, generator=gen) * 0.05)


@torch.no_grad()
def _outputs(model, calib, dtype):
    return [model(**s.to("cpu", dtype), return_dict=False)[0] for s in calib]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@torch.no_grad()
def test_side_branch_is_the_quantized_output_plus_scale_b_a_x_on_the_quantized_input():
    _, model, _, _ = quantized_copy("sd")  # W8A8: the inputs are quantized too
    quant = [m for m in model.modules() if is_quant_layer(m) and m.input_quantizer is not None]
    linear = next(m for m in quant if isinstance(m, torch.nn.Linear))
    conv = next(m for m in quant if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    gen = torch.Generator().manual_seed(0)
    x_lin = torch.randn(2, 5, linear.in_features, generator=gen)
    x_conv = torch.randn(2, conv.in_channels, 6, 6, generator=gen)
    base = {linear: linear(x_lin), conv: conv(x_conv)}
    for layer in (linear, conv):
        side = attach_side(layer, 3, 6.0, gen)
        out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        assert side.scale == 2.0 and sum(p.numel() for p in side.parameters()) == 3 * (fan_in + out)
        side.B.normal_(0, 0.05, generator=gen)
    xq, wq = linear.input_quantizer(x_lin), linear.quantized_weight()
    expected = F.linear(xq, wq, linear.bias) + 2.0 * ((xq @ linear.side.A.T) @ linear.side.B.T)
    got = linear(x_lin)
    assert torch.allclose(got, expected, atol=1e-5) and (got - base[linear]).abs().max() > 1e-2
    on_raw_input = F.linear(xq, wq, linear.bias) + 2.0 * ((x_lin @ linear.side.A.T) @ linear.side.B.T)
    assert not torch.allclose(got, on_raw_input, atol=1e-5)  # the branch sees the quantized input
    xq, wq, A, B = conv.input_quantizer(x_conv), conv.quantized_weight(), conv.side.A, conv.side.B
    geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}
    expected = F.conv2d(xq, wq, conv.bias, **geometry) + 2.0 * F.conv2d(F.conv2d(xq, A, **geometry), B)
    assert A.shape == (3, *conv.weight.shape[1:]) and B.shape == (conv.out_channels, 3, 1, 1)
    got = conv(x_conv)
    assert torch.allclose(got, expected, atol=1e-5) and (got - base[conv]).abs().max() > 1e-2
    for layer, x in ((linear, x_lin), (conv, x_conv)):
        with_branch = layer(x)
        merge_adapter(layer)  # a side branch is not an adapter: it stays
        assert layer.side is not None and torch.equal(layer(x), with_branch)
        layer.quant_enabled = False  # FP mode: the original layer, no branch
        fp_out = F.linear(x, layer.weight, layer.bias) if layer is linear else conv._conv_forward(x, conv.weight,
                                                                                                    conv.bias)
        assert torch.equal(layer(x), fp_out)


def test_training_starts_at_the_ptq_model_and_the_teacher_ignores_the_branch():
    fp, model, specs, calib = quantized_copy("sd")
    ptq = outputs(model, calib)
    sel = _side(model, specs, "sd", [{"kinds": ["weight", "lora"]}])
    assert {k: len(v) for k, v in sel.groups.items()}["lora"] == 2 * len(side_branches(model)) > 0
    assert all(p.dtype == torch.float32 and p.requires_grad for p in sel.groups["lora"])
    assert all(m.adapter is None for m in model.modules() if is_quant_layer(m))  # nothing merged into W
    assert _same(outputs(model, calib), ptq)  # B = 0: exactly the PTQ model
    _randomize_b(model)
    assert not _same(outputs(model, calib), ptq)
    with sel.teacher_mode():
        assert _same(outputs(model, calib), outputs(fp, calib))


@pytest.mark.parametrize("mode", ["side", "merge"])
def test_finish_keeps_a_side_branch_in_the_model_dtype_and_merges_an_adapter(compose, mode):
    _, model, specs, calib, ft = _ternary(compose, "sd", torch.bfloat16)
    rules = [*ft["train"], {"names": [FP_LAYER["sd"]], "kinds": ["lora"]}]
    plan = plan_selection(quantizable_layers(model, "sd"), specs, rules, ROLES)
    sel = select_trainable(model, plan, 4, 8.0, seed=0, lora_mode=mode)
    with torch.no_grad():
        for name, p in sel.named_trainable().items():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    sel.finish()
    fp_layer = model.get_submodule(FP_LAYER["sd"])
    if mode == "merge":
        assert not side_branches(model) and not is_quant_layer(fp_layer)
        assert all(m.adapter is None for m in model.modules() if is_quant_layer(m))
        return
    sides = side_branches(model)
    assert set(sides) == set(plan) and is_quant_layer(fp_layer) and fp_layer.weight_quantizer is None
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for s in sides.values() for p in s.parameters())
    assert all(s.B.abs().sum() > 0 for s in sides.values())
    out = _outputs(model, calib, torch.bfloat16)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in out)
    assert f"{len(sides)} layers" in describe_side_branches(model)


@pytest.mark.parametrize("family,dtype", [("sd", torch.float32), ("flux", torch.bfloat16)])
def test_export_and_reload_with_side_branches_is_bit_exact(compose, tmp_path, family, dtype):
    fp, model, specs, calib, ft = _ternary(compose, family, dtype)
    sel = _side(model, specs, family, [*ft["train"], {"names": [FP_LAYER[family]], "kinds": ["lora"]}])
    _randomize_b(model)
    sel.finish()
    ref = _outputs(model, calib, dtype)
    export_quantized(model, specs, tmp_path)
    sides = side_branches(model)
    meta = read_metadata(tmp_path)
    assert meta["side"] == {n: {"rank": 4, "scale": 2.0} for n in sides} and FP_LAYER[family] in meta["side"]
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        for n, s in sides.items():
            assert f.get_tensor(f"{n}.side.A").dtype == dtype and torch.equal(f.get_tensor(f"{n}.side.B"), s.B)
    fresh = copy.deepcopy(fp).to(dtype)
    for loaded in (load_quantized(tmp_path, fresh), load_quantized(tmp_path),
                   load_quantized(tmp_path, copy.deepcopy(fp).to(dtype), packed=True)):
        assert set(side_branches(loaded)) == set(sides)
        assert _same(_outputs(loaded.to(dtype), calib, dtype), ref)
    assert any(m.packed is not None for m in loaded.modules() if is_quant_layer(m))


def test_cost_counts_the_branch_bits_bytes_memory_and_operations(compose, tmp_path):
    _, model, specs, calib, ft = _ternary(compose, "flux", torch.float16)
    sample = calib[0].to("cpu", torch.float16)

    def measure(folder):
        counter = LayerCounter(model, [s.name for s in specs])
        with torch.no_grad():
            model(**sample, return_dict=False)
        path = export_quantized(model, specs, folder)
        return {**weight_bits(model), **operations(model, counter.macs, specs), "resident_mb": resident_mb(model),
                "file": path.stat().st_size, "counts": counter.counts}

    before = measure(tmp_path / "ptq")
    assert before["side_branch_params"] == 0 and before["ops_side_g"] == 0
    _side(model, specs, "flux", ft["train"], rank=4).finish()
    after = measure(tmp_path / "side")
    sides = side_branches(model)
    n = sum(s.rank * (s.A.shape[1] + s.B.shape[0]) for s in sides.values())
    assert after["side_branch_params"] == n > 0 and all(s.A.dtype == torch.float16 for s in sides.values())
    layer_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert after["effective_weight_bits"] - before["effective_weight_bits"] == pytest.approx(16 * n / layer_weights)
    assert (after["size_quant_mb"] - before["size_quant_mb"]) * 2**20 == pytest.approx(2 * n)
    assert after["side_branch_mb"] * 2**20 == 2 * n and after["size_fp_mb"] == before["size_fp_mb"]
    assert (after["resident_mb"] - before["resident_mb"]) * 2**20 == pytest.approx(2 * n)
    assert 2 * n <= after["file"] - before["file"] < 2 * n + 400 * len(sides)  # + their header entries
    tokens = {name: after["counts"][name] // s.A.shape[1] for name, s in sides.items()}  # all Linear
    side_macs = sum(tokens[name] * s.rank * (s.A.shape[1] + s.B.shape[0]) for name, s in sides.items())
    assert after["ops_side_g"] * 1e9 == pytest.approx(side_macs)
    assert (after["ops_quant_g"] - before["ops_quant_g"]) * 1e9 == pytest.approx(side_macs)
    assert after["ops_fp_g"] == before["ops_fp_g"] and after["ops_ratio"] < before["ops_ratio"]


def test_lora_modes_and_presets(compose):
    check_lora({"mode": "side"})
    with pytest.raises(ConfigError, match="finetune.lora.mode"):
        check_lora({"mode": "sidecar"})
    with pytest.raises(ConfigError, match="finetune.lora.mode"):
        select_trainable(torch.nn.Linear(2, 2), {}, lora_mode="x")
    side = compose("finetune=ternary_distill_lora").finetune
    merged = compose("finetune=ternary_distill_lora_merged").finetune
    assert (side.lora.mode, side.lora.rank, side.lora.alpha) == ("side", 64, 64.0)
    assert (merged.lora.mode, merged.lora.rank, merged.lora.alpha) == ("merge", 16, 16.0)
    assert OmegaConf.to_container(side.train) == OmegaConf.to_container(merged.train)


# Job level: needs stage.py to pass lora_mode=ft["lora"]["mode"] to select_trainable and call
# check_lora in check_finetune, and job.py to append describe_side_branches(denoiser) to spec.txt.
TINY = ["model=tiny_flux", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3"]


def test_job_trains_exports_and_reloads_the_side_branch(compose, tmp_path):
    base = [*TINY, f"paths.cache_dir={tmp_path / 'cache'}"]
    ft = ["quant=ternary_w158", "finetune=ternary_distill_lora", "finetune.steps=2", "finetune.data.num_prompts=2",
          "finetune.batch_size=2", "finetune.lora.rank=4", "finetune.lora.alpha=4"]
    m = job.run(compose(*base, *ft, "export=true"), tmp_path / "side")
    assert m["cost"]["side_branch_params"] > 0 and m["finetune"]["params_by_kind"]["lora"] == m["cost"][
        "side_branch_params"]
    assert "side branches" in (tmp_path / "side" / "spec.txt").read_text()
    loaded = job.run(compose(*base, f"load={tmp_path / 'side' / 'model'}", "packed=true"), tmp_path / "loaded")
    assert loaded["fidelity"]["psnr"]["per_image"] == m["fidelity"]["psnr"]["per_image"]
    assert loaded["cost"]["side_branch_params"] == m["cost"]["side_branch_params"]
    with pytest.raises(ConfigError, match="finetune.lora.mode"):
        job.run(compose(*base, *ft, "finetune.lora.mode=sidecar"), tmp_path / "bad")
