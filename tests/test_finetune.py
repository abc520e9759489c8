"""The finetuning engine: what trains, how, and that a run can stop and resume exactly."""
from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from diffq import calib as calibration
from diffq import job
from diffq.calib.schedule import StepRecorder, noise_coefficients
from diffq.errors import ConfigError, TrainingError
from diffq.finetune import engine
from diffq.finetune.checkpoint import STATE_FILE
from diffq.finetune.data import NoisedData, Pool, TrajectoryData, collate
from diffq.finetune.lora import attach_adapter, merge_adapter
from diffq.finetune.select import plan_selection, select_trainable
from diffq.layers import is_quant_layer
from diffq.roles import ROLES, quantizable_layers
from tests.helpers import A8, KEEP_FP, interrupt_training, pipeline_and_calib, quantized_copy

W4 = {"format": "int", "bits": 4, "granularity": "channel", "symmetric": True}
OPTIM = {"name": "adam", "lr": 1e-4, "act_scale_lr": 1e-3, "weight_scale_lr": 1e-4, "lora_lr": 1e-3,
         "weight_decay": 0.0, "betas": [0.9, 0.999], "schedule": "cosine", "warmup": 0.1, "clip_grad": 1.0}
CPU = torch.device("cpu")


def _cfg(steps: int, **kw) -> dict:
    return {"steps": steps, "batch_size": 4, "checkpoint_every": 4, "resume": True, "seed": 0, "distill_weight": 1.0,
            "data_weight": 0.0, "autocast": True, "grad_checkpointing": False, "optim": dict(OPTIM), **kw}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A trajectory pool of the tiny SD pipeline (2 prompts x 4 steps, CFG)."""
    pipe, _ = pipeline_and_calib("sd")
    folder = calibration.training_pool(pipe, "sd", model_key={"tiny": "sd"}, prompts=["a red circle", "two squares"],
                                       seed=0, steps=4, guidance=4.0, resolution=32, batch_size=2, call_kwargs={},
                                       cache_dir=str(tmp_path_factory.mktemp("pool")))
    return Pool(folder)


def _student(weight=W4):
    fp, model, specs, _ = quantized_copy("sd", weight=weight, act=A8, rules=KEEP_FP)
    return fp, model, specs


def _plan(model, specs, rules):
    return plan_selection(quantizable_layers(model, "sd"), specs, rules, ROLES)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_only_the_selected_parameters_change(pool):
    _, model, specs = _student()
    rules = [{"roles": ["ffn_up"], "kinds": ["weight", "bias"]}, {"names": ["*attn1.to_q"], "kinds": ["act_scale"]}]
    plan = _plan(model, specs, rules)
    assert set(plan) == {n for n, (r, _) in quantizable_layers(model, "sd").items() if r == "ffn_up"
                         or n.endswith("attn1.to_q")}
    before = _snapshot(model)
    sel = select_trainable(model, plan)
    trained = set(sel.named_trainable())
    ffn = {n for n in plan if not n.endswith("to_q")}
    assert trained == {f"{n}.{p}" for n in ffn for p in ("weight", "bias")} | {
        f"{n}.input_quantizer.scale" for n in plan if n.endswith("attn1.to_q")}
    engine.train(model, sel, TrajectoryData(pool), _cfg(4), device=CPU, dtype=torch.float32)
    sel.finish()
    after = _snapshot(model)
    assert set(after) == set(before)
    for k in before:
        if k in trained:
            assert not torch.equal(before[k], after[k]), f"{k} was selected but did not change"
        else:
            assert torch.equal(before[k], after[k]), f"{k} changed without being selected"
    assert not any(p.requires_grad for p in model.parameters())


def _fixed_loss(model, sel, batch) -> float:
    with torch.no_grad():
        with sel.teacher_mode():
            t = model(**batch.kwargs, return_dict=False)[0]
        s = model(**batch.kwargs, return_dict=False)[0]
    return float(torch.nn.functional.mse_loss(s, t))


@pytest.mark.parametrize("kinds", [["weight", "bias", "weight_scale", "act_scale"], ["lora", "act_scale"]])
def test_distillation_loss_falls(pool, kinds):
    _, model, specs = _student()
    sel = select_trainable(model, _plan(model, specs, [{"kinds": kinds}]))
    held_out = TrajectoryData(pool).draw(16, torch.Generator().manual_seed(123))
    before = _fixed_loss(model, sel, held_out)
    stats = engine.train(model, sel, TrajectoryData(pool), _cfg(30), device=CPU, dtype=torch.float32)
    after = _fixed_loss(model, sel, held_out)
    assert after < 0.7 * before, (before, after)
    assert len(stats["loss_curve"]) == 30  # per-step losses are too noisy (mixed timesteps) to compare


def test_resume_after_an_interruption_ends_bit_identical(pool, tmp_path, monkeypatch):
    rules = [{"kinds": ["weight", "act_scale", "lora"]}]

    def run(state_dir):
        _, model, specs = _student()
        sel = select_trainable(model, _plan(model, specs, rules), lora_rank=2)
        stats = engine.train(model, sel, NoisedData(pool), _cfg(10), device=CPU, dtype=torch.float32,
                             state_dir=state_dir)
        sel.finish()
        return _snapshot(model), stats

    whole, whole_stats = run(tmp_path / "whole")
    # killed after the checkpoint at step 4, before step 7
    interrupt_training(monkeypatch, engine, run, tmp_path / "resumed", 6)
    resumed, stats = run(tmp_path / "resumed")
    assert stats["resumed_from"] == 4
    assert stats["loss_curve"] == whole_stats["loss_curve"]
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    again, stats = run(tmp_path / "resumed")  # complete: nothing left to train
    assert stats["resumed_from"] == 10 and all(torch.equal(whole[k], again[k]) for k in whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_merged_equals_unmerged(dtype):
    _, model, specs = _student()
    model = model.to(dtype)
    layer = next(m for m in model.modules() if is_quant_layer(m) and m.weight_quantizer is not None)
    layer.weight_fq = None  # quantize live, as during training
    lora = attach_adapter(layer, 3, 6.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        lora.B.normal_(0, 0.05)
    n_in = layer.weight.shape[1]
    x = torch.randn(2, n_in, 4, 4, dtype=dtype) if layer.weight.dim() == 4 else torch.randn(5, n_in, dtype=dtype)
    unmerged = layer(x)
    adapter, layer.adapter = layer.adapter, None
    assert not torch.equal(unmerged, layer(x))  # the adapter does change the quantized weight
    layer.adapter = adapter
    merge_adapter(layer)
    assert layer.adapter is None
    assert torch.equal(layer(x), unmerged)


def test_a_selection_that_matches_nothing_is_one_clear_error():
    _, model, specs = _student()
    with pytest.raises(ConfigError, match="selects nothing to train"):
        _plan(model, specs, [{"roles": ["adanorm"], "kinds": ["weight"]}])  # no adaLN in a UNet
    with pytest.raises(ConfigError, match="selects nothing to train"):
        _plan(model, specs, [{"roles": ["conv_in"], "kinds": ["act_scale"]}])  # conv_in stays FP: no step size
    with pytest.raises(ConfigError, match="unknown kind"):
        _plan(model, specs, [{"kinds": ["weights"]}])


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(pool, tmp_path, monkeypatch):
    _, model, specs = _student()
    sel = select_trainable(model, _plan(model, specs, [{"kinds": ["act_scale"]}]))
    data = TrajectoryData(pool)
    real_draw, calls = data.draw, []

    def poisoned(n, gen):
        batch = real_draw(n, gen)
        calls.append(1)
        if len(calls) == 6:
            latent = next(iter(batch.kwargs))
            batch.kwargs[latent] = torch.full_like(batch.kwargs[latent], float("nan"))
        return batch

    monkeypatch.setattr(data, "draw", poisoned)
    with pytest.raises(TrainingError, match="at step 6"):
        engine.train(model, sel, data, _cfg(10), device=CPU, dtype=torch.float32, state_dir=tmp_path)
    from diffq.cache import load_meta

    assert load_meta(tmp_path / STATE_FILE)["step"] == 4


def test_noised_items_are_the_final_latent_at_the_schedules_noise_level(pool):
    data = NoisedData(pool)
    item = pool.items[5]
    gen = torch.Generator().manual_seed(0)
    kwargs, _ = data.item(item, gen)
    noise = torch.randn(pool.final(item).shape, generator=torch.Generator().manual_seed(0))
    a, b = pool.coefficients(item)
    expected = a * pool.final(item) + b * noise
    latent = kwargs[pool.latent_key]
    assert latent.shape[0] == 2  # both CFG branches see the same noisy latent
    assert torch.allclose(latent[0], expected[0]) and torch.equal(latent[0], latent[1])
    pipe, _ = pipeline_and_calib("sd")
    steps = [pool.coefficients(it) for it in pool.items[:4]]  # DDIM: variance preserving, noise falls
    ab = pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps]
    assert [a for a, _ in steps] == pytest.approx(ab.sqrt().tolist())
    assert [b for _, b in steps] == pytest.approx((1 - ab).sqrt().tolist())


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler])
def test_noise_coefficients_match_each_scheduler_family(cls):
    sched = cls()
    sched.set_timesteps(5)
    x0 = torch.randn(1, 4, 8, 8)
    with StepRecorder(sched) as rec:
        for t in sched.timesteps[:3]:
            sched.step(torch.zeros_like(x0), t, x0.clone())
    assert len(rec.coefficients) == 3 and rec.final is not None
    for i, (a, b) in enumerate(rec.coefficients):
        t = sched.timesteps[i]
        if cls is FlowMatchEulerDiscreteScheduler:
            s = float(sched.sigmas[i])
            assert (a, b) == pytest.approx((1 - s, s))
        else:
            ab = float(sched.alphas_cumprod[int(t)])
            assert (a, b) == pytest.approx((ab ** 0.5, (1 - ab) ** 0.5), rel=2e-2)
    assert noise_coefficients(object(), 0) is None
    assert "step" not in vars(sched)  # the recorder's wrapper is gone


def test_collate_mixes_steps_with_one_timestep_per_row():
    a = {"sample": torch.zeros(2, 4), "timestep": torch.tensor(900), "encoder_hidden_states": torch.ones(2, 3, 5),
         "txt_ids": torch.zeros(2, 3)}
    b = {"sample": torch.ones(2, 4), "timestep": torch.tensor(100), "encoder_hidden_states": torch.ones(2, 3, 5),
         "txt_ids": torch.zeros(2, 3)}
    out = collate([a, b])
    assert out["sample"].shape == (4, 4) and out["timestep"].tolist() == [900, 900, 100, 100]
    assert out["txt_ids"].shape == (2, 3)  # position ids have no batch axis


TINY = ["model=tiny_sd15", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3", "quant=w4a8"]


def test_job_finetunes_reports_and_resumes_and_none_changes_nothing(compose, tmp_path):
    base = [*TINY, f"paths.cache_dir={tmp_path / 'cache'}"]
    plain = job.run(compose(*base), tmp_path / "plain")
    none = job.run(compose(*base, "finetune=none"), tmp_path / "none")
    assert plain["finetune"] is None and none["fidelity"]["psnr"]["per_image"] == plain["fidelity"]["psnr"]["per_image"]
    assert "finetuned" not in (tmp_path / "none" / "spec.txt").read_text()
    assert not (tmp_path / "none" / "finetune_loss.png").exists()

    ft = ["finetune=distill", "finetune.steps=6", "finetune.data.num_prompts=2", "finetune.batch_size=2"]
    tuned = job.run(compose(*base, *ft, "export=true"), tmp_path / "tuned")
    f = tuned["finetune"]
    assert f["name"] == "distill" and f["steps"] == 6 and len(f["loss_curve"]) == 6 and f["resumed_from"] == 0
    assert f["train_state_mb"] > 0 and f["teacher_copy_mb"] > 0
    assert 0.9 < f["fraction"] <= 1.0 and f["params"] == sum(f["params_by_kind"].values())
    assert tuned["fidelity"]["psnr"]["per_image"] != plain["fidelity"]["psnr"]["per_image"]
    spec = (tmp_path / "tuned" / "spec.txt").read_text()
    assert "finetuned:" in spec and "weight bias weight_scale act_scale" in spec
    assert (tmp_path / "tuned" / "finetune_loss.png").exists()
    saved = json.loads((tmp_path / "tuned" / "metrics.json").read_text())["finetune"]
    assert saved["loss_curve"] == f["loss_curve"]
    again = job.run(compose(*base, *ft), tmp_path / "again")  # the same command: the cached state, no training
    assert again["finetune"]["resumed_from"] == 6
    assert again["fidelity"]["psnr"]["per_image"] == tuned["fidelity"]["psnr"]["per_image"]
    loaded = job.run(compose(*base, f"load={tmp_path / 'tuned' / 'model'}"), tmp_path / "loaded")
    assert loaded["fidelity"]["psnr"]["per_image"] == tuned["fidelity"]["psnr"]["per_image"]  # exported as trained


@pytest.mark.parametrize("overrides,match", [
    (["finetune=distill", "load=somewhere"], "not to a loaded export"),
    (["finetune=distill", "quant.keep_fp_weights=false"], "keep_fp_weights"),
    (["finetune=distill", "finetune.data.source=nope"], "unknown finetune.data.source"),
    (["finetune=distill", "finetune.data.prompts=world"], "testbed models only"),
    (["finetune=distill", "finetune.optim.name=sgd"], "unknown finetune.optim.name"),
    (["finetune=distill", "finetune.distill_weight=0"], "no loss"),
    (["finetune=distill", "finetune.extra_losses=[{name: nope}]"], "unknown loss 'nope'"),
])
def test_bad_finetune_settings_fail_before_the_pipeline_loads(compose, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline before failing"))
    monkeypatch.setattr(job, "read_metadata", lambda *a, **k: pytest.fail("read a checkpoint before failing"))
    with pytest.raises(ConfigError, match=match):
        job.run(compose(*TINY, *overrides), tmp_path / "run")


def test_empty_selection_fails_before_calibration(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "quantize", lambda *a, **k: pytest.fail("quantized before failing"))
    cfg = compose(*TINY, f"paths.cache_dir={tmp_path / 'cache'}", "finetune=distill",
                  "finetune.train=[{roles: [adanorm], kinds: [weight]}]")
    with pytest.raises(ConfigError, match="selects nothing"):
        job.run(cfg, tmp_path / "run")


def test_layer_output_loss_trains_toward_the_fp_layers(pool):
    from diffq.finetune.losses import build_extra_losses

    _, model, specs = _student()
    layers = quantizable_layers(model, "sd")
    sel = select_trainable(model, _plan(model, specs, [{"roles": ["ffn_up", "ffn_down"], "kinds": ["weight"]}]))
    (extra,) = build_extra_losses([{"name": "layer_mse", "weight": 1.0, "roles": ["ffn_down"]}], layers, ROLES)
    batch = TrajectoryData(pool).draw(4, torch.Generator().manual_seed(0))
    with torch.no_grad(), sel.teacher_mode():
        extra.begin("teacher")
        model(**batch.kwargs, return_dict=False)
    extra.begin("student")
    model(**batch.kwargs, return_dict=False)
    term = extra.term()
    assert term > 0 and term.requires_grad
    assert set(extra.outputs["student"]) == {n for n, (r, _) in layers.items() if r == "ffn_down"}
    extra.remove()
    with pytest.raises(ConfigError, match="match no layer"):
        build_extra_losses([{"name": "layer_mse", "roles": ["adanorm"]}], layers, ROLES)


def test_teacher_mode_is_the_fp_model_even_with_trained_weights(pool):
    fp, model, specs = _student()
    sel = select_trainable(model, _plan(model, specs, [{"kinds": ["weight", "bias", "lora"]}]))
    engine.train(model, sel, TrajectoryData(pool), _cfg(3), device=CPU, dtype=torch.float32)
    batch = TrajectoryData(pool).draw(2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        with sel.teacher_mode():
            teacher = model(**batch.kwargs, return_dict=False)[0]
        reference = fp(**batch.kwargs, return_dict=False)[0]
    assert torch.equal(teacher, reference)


@pytest.mark.slow
def test_two_processes_train_data_parallel(tmp_path):
    """``torchrun --nproc_per_node 2 -m diffq ... finetune=distill`` (DDP over gloo on CPU): both
    processes end with the same parameters (checked inside the engine) and the job completes."""
    import os
    import shutil
    import subprocess

    args = [*TINY, "finetune=distill", "finetune.steps=4", "finetune.data.num_prompts=2", "finetune.batch_size=2",
            "eval.images_per_prompt=2", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFQ_CACHE_DIR": str(tmp_path / "cache")}
    torchrun = [shutil.which("torchrun") or "torchrun", "--nproc_per_node", "2"]
    res = subprocess.run([*torchrun, "-m", "diffq", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["finetune"]["processes"] == 2 and len(metrics["finetune"]["loss_curve"]) == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_finetune(pool, dtype):
    _, model, specs = _student()
    model = model.to(dtype)
    sel = select_trainable(model, _plan(model, specs, [{"kinds": ["weight", "act_scale", "lora"]}]))
    before = {n: p.detach().clone() for n, p in sel.named_trainable().items()}
    stats = engine.train(model, sel, TrajectoryData(pool), _cfg(3), device=CPU, dtype=dtype)
    assert all(map(math.isfinite, stats["loss_curve"]))
    changed = [n for n, p in sel.named_trainable().items() if not torch.equal(before[n], p)]
    assert any(n.endswith(".weight") for n in changed) and any(n.endswith(".B") for n in changed)
    sel.finish()
    assert all(p.dtype == dtype for n, p in model.named_parameters() if n.endswith("weight"))


def test_gradient_checkpointing_trains_the_same(pool, monkeypatch):
    import torch.utils.checkpoint as ckpt

    calls, real = [], ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(checkpointing: bool) -> dict[str, torch.Tensor]:
        _, model, specs = _student()
        sel = select_trainable(model, _plan(model, specs, [{"kinds": ["weight", "act_scale"]}]))
        engine.train(model, sel, TrajectoryData(pool), _cfg(2, grad_checkpointing=checkpointing), device=CPU,
                     dtype=torch.float32)
        assert not model.is_gradient_checkpointing  # switched off again
        return {n: p.detach().clone() for n, p in sel.named_trainable().items()}

    plain = run(False)
    assert not calls
    checkpointed = run(True)
    assert calls  # the blocks really recomputed their activations
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
