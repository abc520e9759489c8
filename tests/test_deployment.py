"""Deployment (diffq.deploy): real low-bit layers built from diffq's own codes and scales compute what
the fake-quant model computes, every quantized layer is listed as kernel or simulated, and a deployed
denoiser saves as a folder plain diffusers with torchao loads."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import diffq
from diffq.deployment import deploy, deployment_of, load_deployed, save_deployed
from diffq.deployment.lowerings.ternary import TernaryLinear
from diffq.deployment.memory import resident_bytes
from diffq.errors import CheckpointError, ConfigError
from diffq.eval.fidelity import sqnr
from diffq.layers import layer_table
from diffq.models.generate import generate_images
from diffq.models.tiny import build_tiny_pipeline
from diffq.quantize_stage import quantized_info

pytest.importorskip("torchao")

PROMPT = "a photo of a red circle"


def _quantized(family: str, preset: str, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny pipeline quantized with ``preset`` and one captured denoiser call (args, kwargs)."""
    pipe = build_tiny_pipeline(family, seed=0).to(dtype)
    diffq.quantize(pipe, preset, calib=[PROMPT], steps=2, resolution=32, finetune__steps=0, **overrides)
    den = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    captured = {}
    hook = den.register_forward_pre_hook(lambda m, a, k: captured.setdefault("call", (a, k)), with_kwargs=True)
    generate_images(pipe, family, [PROMPT], [0], steps=2, guidance=4.0, resolution=32, progress=False)
    hook.remove()
    return pipe, den, captured["call"]


@torch.no_grad()
def _out(den, call) -> torch.Tensor:
    return den(*call[0], **call[1])[0].float()


@pytest.mark.parametrize("preset", ["w8a8", "w4a16", "ternary_w158"])
def test_deployed_transformer_equals_fake_quant_float32(preset):
    """Every layer of the tiny PixArt runs a kernel (int8 x int8 with the calibrated static input range,
    int8-held int4 weights, the 2-bit ternary kernel) and the output equals the fake-quant one to float32
    rounding (measured: 5e-7 of a max of 2.2)."""
    pipe, den, call = _quantized("pixart", preset)
    names = set(layer_table(den))
    ref = _out(den, call)
    report = deploy(pipe)
    assert {r.layer for r in report.rows} == names
    kernels = [r for r in report.rows if r.compute == "kernel"]
    assert len(kernels) == len(names)
    out = _out(den, call)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not layer_table(den)  # no diffq layer left


def test_bf16_deployment_is_as_close_to_the_exact_model_as_bf16_fake_quant():
    """bf16: torchao scales the int32 product once per output, diffq rounds each weight to bf16. Measured
    against the float32 quantized model, the deployed bf16 model is as close as bf16 fake-quant is (on
    the tiny UNet both ~26.6 dB: the gap is bf16's own rounding, not the kernel's)."""
    _, den32, _ = _quantized("sd", "w8a8")
    pipe, den, call = _quantized("sd", "w8a8", torch.bfloat16)
    exact = _out(den32, _float32(call))
    fake = _out(den, call)
    deploy(pipe)
    assert float(sqnr(exact, _out(den, call))) >= float(sqnr(exact, fake)) - 1.0


def _float32(call):
    cast = lambda v: v.float() if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return tuple(cast(v) for v in call[0]), {k: cast(v) for k, v in call[1].items()}


def test_coverage_table_lists_every_layer_and_why_convs_stay_simulated():
    """A UNet's convolutions with quantized inputs have no torchao kernel: they stay diffq's fake-quant,
    say so, and hold their weight as int8 codes; the output is unchanged for them (exact in float32)."""
    pipe, den, call = _quantized("sd", "w8a8")
    names = set(layer_table(den))
    fp_bytes = resident_bytes(den)
    ref = _out(den, call)
    conv1_before = copy.deepcopy(den.down_blocks[0].resnets[0].conv1)
    report = deploy(pipe)
    table = report.table()
    assert {r.layer for r in report.rows} == names and all(n in table for n in names)
    convs = [r for r in report.rows if r.op == "Conv2d"]
    assert convs and all(r.compute == "simulated" and "no quantized-input kernel" in r.how
                         and "held as int8 codes" in r.how for r in convs)
    assert f"{report.count('kernel')} kernel" in table.splitlines()[0]
    assert report.count("kernel") + report.count("simulated") == len(names)
    x = torch.randn(2, den.conv_in.out_channels, 8, 8)
    assert torch.equal(den.down_blocks[0].resnets[0].conv1(x), conv1_before(x))  # the held weight decodes exactly
    # the int8 kernels' float32 sums round differently; a later static input grid may flip a rounding
    assert float(sqnr(ref, _out(den, call))) > 30
    assert resident_bytes(den) < 0.5 * fp_bytes  # int8 codes for float32 weights (plus what stays float)
    assert deployment_of(den) is report


def test_a_format_without_a_kernel_stays_simulated_and_says_so():
    """FP8 has torchao kernels on CUDA only: on the CPU each layer stays simulated with the reason, and
    the output is exactly the fake-quant one."""
    pipe, den, call = _quantized("pixart", "w8a8_fp8")
    ref = _out(den, call)
    report = deploy(pipe)
    assert report.count("simulated") == len(report.rows) > 0
    assert all("fp8" in r.how.lower() and "cuda" in r.how.lower() for r in report.rows)
    assert torch.equal(_out(den, call), ref)


def test_ternary_layers_hold_two_bits_per_weight():
    pipe, den, call = _quantized("pixart", "ternary_w158")
    deploy(pipe)
    layers = [m for m in den.modules() if isinstance(m, TernaryLinear)]
    assert layers
    for m in layers:
        assert m.packed.dtype == torch.uint8 and m.packed.numel() * 4 >= m.in_features * m.out_features
        assert m.packed.numel() * 4 < m.in_features * m.out_features + 4 * m.out_features


def test_save_load_with_plain_diffusers_and_with_diffq(tmp_path):
    """The saved folder loads with plain diffusers (torchao tensors, no diffq layers) and computes what
    the deployed model computes; load_deployed packs ternary layers again."""
    import diffusers
    from torchao.quantization import Int8Tensor

    pipe, den, call = _quantized("pixart", "w8a8")
    deploy(pipe)
    out = _out(den, call)
    save_deployed(pipe, tmp_path / "dep")
    config = json.loads((tmp_path / "dep" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    plain = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "dep", torch_dtype=torch.float32)
    assert isinstance(plain.transformer_blocks[0].attn1.to_q.weight, Int8Tensor)
    assert torch.equal(_out(plain, call), out)
    assert not any("Quant" in type(m).__name__ for m in plain.modules())

    pipe, den, call = _quantized("pixart", "ternary_w158")
    deploy(pipe)
    out = _out(den, call)
    save_deployed(den, tmp_path / "ternary")
    loaded = load_deployed(tmp_path / "ternary")
    assert any(isinstance(m, TernaryLinear) for m in loaded.modules())
    assert (_out(loaded, call) - out).abs().max() <= 1e-5 * out.abs().max()
    assert deployment_of(loaded).count("kernel") == deployment_of(den).count("kernel")


def test_bad_input_stops_before_anything_changes(tmp_path, monkeypatch):
    from diffq.deployment import lowering

    pipe, den, _ = _quantized("pixart", "w8a8")
    with pytest.raises(ConfigError, match="unknown deploy backend 'tensorrt'"):
        deploy(pipe, backend="tensorrt")
    with pytest.raises(CheckpointError, match="not deployed"):
        save_deployed(pipe, tmp_path / "x")
    with pytest.raises(CheckpointError, match="holds no deployed model"):
        load_deployed(tmp_path)
    monkeypatch.setattr(lowering.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[deploy\]'"):
        deploy(pipe)
    assert len(layer_table(den)) == 23  # nothing lowered
    monkeypatch.undo()
    deploy(pipe)
    with pytest.raises(ConfigError, match="no quantized layers"):
        deploy(pipe)


def test_quantized_attention_matmuls_are_listed_as_simulated():
    pipe, _, _ = _quantized("pixart", "w8a8", quant__attn__enabled=True)
    report = deploy(pipe)
    assert report.notes and "attention matmuls of 4 modules: simulated" in report.table()


def test_static_range_needs_the_inputs_rank(tmp_path):
    """A loaded export has never seen an input: deploying asks for one denoiser call first, before it
    changes any layer."""
    pipe, den, call = _quantized("pixart", "w8a8")
    specs = quantized_info(den).specs
    diffq.save_denoiser(den, specs, tmp_path)
    fresh = build_tiny_pipeline("pixart", seed=0)
    diffq.load_denoiser(tmp_path, fresh.transformer)
    with pytest.raises(ConfigError, match="run the denoiser once"):
        deploy(fresh)
    assert len(layer_table(fresh.transformer)) == 23
    _out(fresh.transformer, call)
    ref = _out(fresh.transformer, call)
    deploy(fresh)
    assert (_out(fresh.transformer, call) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fp8_weights_are_built_from_diffqs_codes():
    """The Float8Tensor a CUDA deployment builds holds diffq's e4m3 grid values and scales: decoding it
    gives the fake-quant weight bit for bit (built here on the CPU, where torchao runs no fp8 matmul)."""
    from diffq.deployment.grid import act_range, weight_grid
    from diffq.deployment.lowerings.torchao_float8 import build

    _, den, _ = _quantized("pixart", "w8a8_fp8")
    layer = den.transformer_blocks[0].attn1.to_q
    expected = layer.quantized_weight().detach().clone()
    build(layer, weight_grid(layer), act_range(layer))
    assert torch.equal(layer.weight.dequantize(torch.float32), expected)
    assert layer.weight.qdata.dtype == torch.float8_e4m3fn


def test_job_deploys_a_loaded_export_and_lists_coverage(compose, tmp_path):
    """``load=<export> deploy=torchao``: the job counts one call (the static ranges learn their input's
    rank), lowers, samples with the deployed model and writes the coverage table and the deployed folder."""
    from diffq.job import run

    quick = ["eval.prompts=[a photo of a red circle]", "calib.num_prompts=2", "calib.num_steps=2", "model.steps=4",
             "eval.grid=false", "eval.metrics=[psnr]"]
    run(compose("model=tiny_sd15", "export=true", *quick), tmp_path / "q")
    m = run(compose("model=tiny_sd15", f"load={tmp_path / 'q' / 'model'}", "deploy=torchao", "export=true", *quick),
            tmp_path / "d")
    spec = (tmp_path / "d" / "spec.txt").read_text()
    assert "deployment: backend torchao on cpu" in spec
    assert m["deployment"]["kernel"] > 0 and m["deployment"]["kernel"] + m["deployment"]["simulated"] == len(
        json.loads((tmp_path / "d" / "model" / "diffq_deployment.json").read_text())["layers"])
    assert m["fidelity"]["psnr"]["mean"] > 25
    assert m["cost"]["layers_quantized"] > 0  # taken on the quantized layers, before lowering


def test_job_rejects_bad_deploy_settings_before_loading(compose):
    from diffq.job import check_config

    with pytest.raises(ConfigError, match="unknown deploy backend 'trt'"):
        check_config(compose("model=tiny_sd15", "deploy=trt"))
    with pytest.raises(ConfigError, match="drop packed=true"):
        check_config(compose("model=tiny_sd15", "deploy=torchao", "packed=true", "load=/nonexistent"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torchao's fp8 and int4 kernels run on CUDA")
@pytest.mark.parametrize("preset", ["w8a8_fp8", "w4a16"])
def test_gpu_kernels_match_fake_quant(preset):
    pipe, den, call = _quantized("pixart", preset, torch.bfloat16)
    pipe.to("cuda")
    call = tuple(v.cuda() if torch.is_tensor(v) else v for v in call[0]), {
        k: v.cuda() if torch.is_tensor(v) else v for k, v in call[1].items()}
    ref = _out(den, call)
    report = deploy(pipe)
    assert report.count("kernel") == len(report.rows)
    assert float(sqnr(ref, _out(den, call))) > 25


@pytest.mark.parametrize("preset", ["nvfp4_w4a4", "mxfp4_w4a4"])
def test_fp4_weights_are_built_from_diffqs_codes(preset):
    """The NVFP4Tensor / MXTensor a Blackwell deployment builds decodes to diffq's fake-quant weight bit
    for bit (built on the CPU); on the CPU the layers stay simulated and say which GPU they need."""
    from diffq.deployment.grid import act_range
    from diffq.deployment.lowerings.torchao_fp4 import build_mxfp4, build_nvfp4

    pipe, den, _ = _quantized("pixart", preset)
    layer = den.transformer_blocks[0].attn1.to_q
    expected = layer.quantized_weight().detach().clone()
    (build_nvfp4 if preset.startswith("nv") else build_mxfp4)(layer, None, act_range(layer))
    assert torch.equal(layer.weight.dequantize(torch.float32), expected)
    report = deploy(pipe)
    assert report.count("simulated") == len(report.rows) and all("sm100" in r.how for r in report.rows)
