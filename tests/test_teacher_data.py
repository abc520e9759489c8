"""The teacher's data and scale rules of finetuning: the trajectory pool is the FP model's whatever
ran before (captured in float mode, keyed by the FP model, locked), and BitNet's scale follows the
latent weight."""
from __future__ import annotations

import threading
import time

import torch
from filelock import FileLock

from diffq import calib as calibration
from diffq import job
from diffq.calib.select import load_pool_shard
from diffq.errors import ConfigError
from diffq.export import read_metadata
from diffq.finetune.select import plan_selection, select_trainable
from diffq.formats.ternary import TernaryFormat
from diffq.model_quant import float_mode
from diffq.models import sample_seeds
from diffq.quantizer import Quantizer
from diffq.roles import ROLES, quantizable_layers
from tests.helpers import A8, KEEP_FP, pipeline_and_calib, quantized_copy

POOL = {"prompts": ["a red circle", "two squares"], "seed": 0, "steps": 4, "guidance": 4.0, "resolution": 32,
        "batch_size": 2, "call_kwargs": {}}


def _pool_tensors(folder) -> list[torch.Tensor]:
    shard = load_pool_shard(folder / "batch_0000.safetensors")
    return [t for c in shard.calls for t in c.kwargs.values() if torch.is_tensor(t)] + [shard.final]


def test_a_quantized_pipeline_in_float_mode_captures_the_fp_models_trajectories(tmp_path):
    pipe, _ = pipeline_and_calib("sd")
    fp_folder = calibration.training_pool(pipe, "sd", model_key={"m": "fp"}, cache_dir=str(tmp_path / "a"), **POOL)
    fp_unet, quantized, _, _ = quantized_copy("sd", weight={"format": "int", "bits": 3, "granularity": "channel"},
                                              act=A8, rules=KEEP_FP)
    try:
        pipe.unet = quantized
        folder = calibration.training_pool(pipe, "sd", model_key={"m": "q"}, cache_dir=str(tmp_path / "b"), **POOL)
        with float_mode(quantized):
            fp_mode = calibration.training_pool(pipe, "sd", model_key={"m": "fq"}, cache_dir=str(tmp_path / "c"),
                                                **POOL)
    finally:
        pipe.unet = fp_unet
    ref, quant, floated = _pool_tensors(fp_folder), _pool_tensors(folder), _pool_tensors(fp_mode)
    assert all(torch.equal(a, b) for a, b in zip(ref, floated))  # bit for bit the FP model's
    assert not all(torch.equal(a, b) for a, b in zip(ref, quant))  # the quantized model's own differ


def test_the_pool_capture_waits_for_another_process_holding_its_lock(tmp_path):
    pipe, _ = pipeline_and_calib("sd")
    base = calibration.pool_base({"m": "lock"}, POOL["prompts"], sample_seeds(0, 2), 4, 4.0, 32, {})
    folder = calibration.pool_folder(str(tmp_path), base, "auto", 2)
    folder.mkdir(parents=True)
    held = FileLock(str(folder / "pool") + ".lock")
    held.acquire()
    worker = threading.Thread(target=calibration.training_pool, args=(pipe, "sd"),
                              kwargs={"model_key": {"m": "lock"}, "cache_dir": str(tmp_path), **POOL})
    worker.start()
    time.sleep(1.5)
    assert not list(folder.glob("batch_*.safetensors"))  # waiting, not capturing beside the holder
    held.release()
    worker.join(60)
    assert len(list(folder.glob("batch_*.safetensors"))) == 1


TINY = ["model=tiny_sd15", "eval=none", "calib.num_prompts=2", "calib.num_steps=2", "model.steps=3",
        "finetune=distill", "finetune.steps=4", "finetune.data.num_prompts=2", "finetune.batch_size=2",
        "finetune.eval_every=2", "export=true"]


def test_a_finetuned_model_does_not_depend_on_what_ran_before(compose, tmp_path):
    alone = job.run(compose(*TINY, "quant=w8a8", f"paths.cache_dir={tmp_path / 'one'}"), tmp_path / "alone")
    shared = f"paths.cache_dir={tmp_path / 'two'}"
    job.run(compose(*TINY, "quant=w4a8", shared), tmp_path / "first")
    after = job.run(compose(*TINY, "quant=w8a8", shared), tmp_path / "after")
    assert after["finetune"]["val_curve"] == alone["finetune"]["val_curve"]
    a = (tmp_path / "alone" / "model" / "diffusion_model.safetensors").read_bytes()
    b = (tmp_path / "after" / "model" / "diffusion_model.safetensors").read_bytes()
    assert a == b
    assert read_metadata(tmp_path / "after" / "model") is not None


def test_a_following_scale_is_the_calibrated_scale_of_the_current_weight():
    w = torch.randn(8, 16)
    q = Quantizer(TernaryFormat(), kind="weight", granularity="channel", observer="absmean",
                  storage_dtype=torch.float16)
    q.calibrate_weight(w)
    q.follow_weight()
    moved = (3.0 * w).requires_grad_(True)  # the latent weight drifted: the scale must come along
    out = q(moved)
    ref = Quantizer(TernaryFormat(), kind="weight", granularity="channel", observer="absmean",
                    storage_dtype=torch.float16)
    ref.calibrate_weight(moved.detach())
    assert torch.equal(out.detach(), ref(moved.detach()))
    assert torch.allclose(ref.scale.float().flatten(), (3.0 * w).abs().mean(1), rtol=1e-3)
    out.sum().backward()  # identity STE: the gradient reaches the latent weight, none goes to the scale
    assert torch.equal(moved.grad, torch.ones_like(w))
    assert not q.scale.requires_grad
    stale = q.scale.clone()
    q.follow_weight(False)
    assert not torch.equal(q(moved.detach()), out.detach())  # the stored scale is the calibration-time one
    assert torch.equal(q.scale, stale)


def test_follow_mode_trains_no_scale_and_stores_the_final_one(compose):
    _, model, specs, calib = quantized_copy("sd", weight={"format": "ternary", "granularity": "channel",
                                                          "observer": "absmean"}, act=None, rules=KEEP_FP)
    plan = plan_selection(quantizable_layers(model, "sd"), specs, [{"roles": ["ffn_up"],
                                                                     "kinds": ["weight", "weight_scale"]}], ROLES)
    sel = select_trainable(model, plan, weight_scale="follow")
    assert "weight_scale" not in sel.groups and len(sel.following) == len(plan)
    layer = sel.following[0]
    with torch.no_grad():
        layer.weight.mul_(2.0)  # what training does to the latent weight
    live = layer.quantized_weight().detach().clone()
    sel.finish()
    assert not layer.weight_quantizer.follows
    assert torch.equal(layer.quantized_weight(), live)  # the stored scale is the last forward's
    try:
        select_trainable(model, plan, weight_scale="nope")
    except ConfigError as e:
        assert "finetune.weight_scale" in str(e)
    else:
        raise AssertionError("an unknown weight_scale mode was accepted")
