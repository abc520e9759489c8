"""1.58-bit ternary: coverage, sub-byte packing, the packed inference backend, distillation."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from diffq import calib as calibration
from diffq import job
from diffq.errors import ConfigError
from diffq.eval.cost import resident_mb
from diffq.export import export_quantized, load_quantized, pack_base3, pack_bits, unpack_base3, unpack_bits
from diffq.finetune import engine
from diffq.finetune.data import Pool, TrajectoryData
from diffq.finetune.select import plan_selection, select_trainable
from diffq.methods import rtn
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec
from tests.helpers import denoiser, outputs, pipeline_and_calib

CPU = torch.device("cpu")


@pytest.mark.parametrize("count", [1, 4, 5, 7, 1001])
def test_two_bit_and_base3_packing_round_trip_on_odd_sizes(count):
    codes = torch.randint(0, 3, (count,), generator=torch.Generator().manual_seed(count), dtype=torch.uint8)
    two, three = pack_bits(codes, 2), pack_base3(codes)
    assert two.numel() == -(-count // 4) and three.numel() == -(-count // 5)
    assert torch.equal(unpack_bits(two, 2, count), codes) and torch.equal(unpack_base3(three, count), codes)
    assert int(pack_base3(torch.full((5,), 2, dtype=torch.uint8))) == 242


def _ternary(compose, family: str, preset: str = "ternary_w158"):
    q = OmegaConf.to_container(compose(f"quant={preset}").quant, resolve=True)
    pipe, calib = pipeline_and_calib(family)
    model = copy.deepcopy(denoiser(pipe))
    specs = resolve_spec(quantizable_layers(model, family), q["weight"], q["act"], q["rules"], ROLES)
    rtn.apply(model, specs, calib, q, device=CPU, dtype=torch.float32)
    return denoiser(pipe), model, specs, calib


def test_coverage_is_every_block_linear_in_transformers_and_attention_ffn_convs_in_unets(compose):
    _, flux, specs, _ = _ternary(compose, "flux")
    covered = {s.name for s in specs if s.quantized}
    blocks = {s.name for s in specs if s.name.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert covered == blocks and "transformer_blocks.0.norm1.linear" in covered  # adaLN modulation included
    assert not covered & {"x_embedder", "context_embedder", "proj_out", "norm_out.linear"}
    _, _, unet_specs, _ = _ternary(compose, "sd")
    roles = {s.role for s in unet_specs if s.quantized}
    assert roles == {"attn_qkv", "attn_out", "cross_attn_q", "cross_attn_kv", "ffn_up", "ffn_down", "resnet_conv"}


def test_packed_backend_equals_the_fake_quant_model_and_holds_less(compose, tmp_path):
    fp, model, specs, calib = _ternary(compose, "flux")
    ref = outputs(model, calib)
    for codec in (None, "base3"):
        folder = tmp_path / str(codec)
        export_quantized(model, specs, folder, codec=codec)
        unpacked = load_quantized(folder, copy.deepcopy(fp))
        packed = load_quantized(folder, copy.deepcopy(fp), packed=True)
        assert all(torch.equal(a, b) for a, b in zip(ref, outputs(unpacked, calib)))
        assert all(torch.equal(a, b) for a, b in zip(ref, outputs(packed, calib)))
        assert resident_mb(packed) < 0.5 * resident_mb(unpacked)
    sizes = {c: (tmp_path / str(c) / "diffusion_model.safetensors").stat().st_size for c in (None, "base3")}
    assert sizes["base3"] < sizes[None]


def test_distillation_lowers_the_teacher_student_loss(compose, tmp_path):
    _, model, specs, _ = _ternary(compose, "sd")
    pipe, _ = pipeline_and_calib("sd")
    folder = calibration.training_pool(pipe, "sd", model_key={"tiny": "sd"}, prompts=["a red circle", "two squares"],
                                       seed=0, steps=4, guidance=4.0, resolution=32, batch_size=2, call_kwargs={},
                                       cache_dir=str(tmp_path))
    data = TrajectoryData(Pool(folder))
    ft = OmegaConf.to_container(compose("quant=ternary_w158").finetune, resolve=True)
    sel = select_trainable(model, plan_selection(quantizable_layers(model, "sd"), specs, ft["train"], ROLES))
    held = data.draw(16, torch.Generator().manual_seed(1))

    def loss() -> float:
        with torch.no_grad():
            with sel.teacher_mode():
                t = model(**held.kwargs, return_dict=False)[0]
            return float(torch.nn.functional.mse_loss(model(**held.kwargs, return_dict=False)[0], t))

    before = loss()
    cfg = {**ft, "steps": 30, "batch_size": 4, "optim": {**ft["optim"], "lr": 1e-3, "weight_scale_lr": 1e-3}}
    engine.train(model, sel, data, cfg, device=CPU, dtype=torch.float32)
    assert loss() < 0.8 * before


TINY = ["model=tiny_flux", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3"]


def test_job_exports_base3_and_evaluates_the_packed_model(compose, tmp_path):
    cache = f"paths.cache_dir={tmp_path / 'cache'}"
    m = job.run(compose(*TINY, cache, "quant=ternary_w158", "finetune=none", "export=true", "export_codec=base3"),
                tmp_path / "t")
    loaded = job.run(compose(*TINY, cache, f"load={tmp_path / 't' / 'model'}", "packed=true"), tmp_path / "p")
    assert loaded["fidelity"]["psnr"]["per_image"] == m["fidelity"]["psnr"]["per_image"]
    assert loaded["cost"]["resident_mb"] < m["cost"]["resident_mb"]
    assert loaded["cost"]["effective_weight_bits"] == pytest.approx(m["cost"]["effective_weight_bits"])
    with pytest.raises(ConfigError, match="add load="):
        job.run(compose(*TINY, cache, "packed=true"), tmp_path / "bad")
    with pytest.raises(ConfigError, match="unknown export codec"):
        job.run(compose(*TINY, cache, "export_codec=nope"), tmp_path / "bad2")
