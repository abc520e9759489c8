"""Validation during finetuning: the held-out loss, the best state kept, probes, exact resume, checks, plot."""
from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from diffq import calib as calibration
from diffq import job
from diffq.cache import save_tensors
from diffq.errors import CheckpointError, ConfigError
from diffq.finetune import engine
from diffq.finetune.checkpoint import STATE_FILE, load_checkpoint
from diffq.finetune.data import Pool, TrajectoryData, collate
from diffq.finetune.select import plan_selection, select_trainable
from diffq.finetune.stage import check_finetune, finetune_denoiser, validation_prompts
from diffq.layers import is_quant_layer
from diffq.methods import rtn
from diffq.models import Sampling
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec
from diffq.worlds import get_world
from tests.helpers import A8, KEEP_FP, denoiser, interrupt_training, pipeline_and_calib

W4 = {"format": "int", "bits": 4, "granularity": "channel", "symmetric": True}
CPU = torch.device("cpu")
RULES = [{"kinds": ["weight", "bias"]}]
MID_LR, HIGH_LR = 3e-4, 1e-2  # tiny DiT, W4A8: val loss falls then wobbles / rises from the first step


def _cfg(steps: int, lr: float, keep: str = "best", eval_every: int | None = 2, **kw) -> dict:
    optim = {"name": "adam", "lr": lr, "act_scale_lr": 1e-3, "weight_scale_lr": 1e-4, "lora_lr": 1e-3,
             "weight_decay": 0.0, "betas": [0.9, 0.999], "schedule": "constant", "warmup": 0.0, "clip_grad": 1.0}
    return {"steps": steps, "batch_size": 4, "checkpoint_every": 50, "resume": True, "seed": 0, "distill_weight": 1.0,
            "data_weight": 0.0, "autocast": True, "grad_checkpointing": False, "optim": optim,
            "eval_every": eval_every, "keep": keep, **kw}


def _pool(prompts: list[str], seed: int, cache: str) -> Pool:
    pipe, _ = pipeline_and_calib("dit")
    return Pool(calibration.training_pool(pipe, "dit", model_key={"tiny": "dit"}, prompts=prompts, seed=seed, steps=4,
                                          guidance=4.0, resolution=32, batch_size=2, call_kwargs={}, cache_dir=cache))


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """Training and held-out trajectory pools of the tiny DiT (2 prompts x 4 steps each, other seeds)."""
    cache = str(tmp_path_factory.mktemp("pools"))
    return _pool(["cat", "dog"], 0, cache), _pool(["dog", "cat"], 8765, cache)


def _student():
    """(an FP deep copy made before quantizing, the W4A8 student, its selection)."""
    pipe, calib = pipeline_and_calib("dit")
    fp = copy.deepcopy(denoiser(pipe))
    model = copy.deepcopy(fp)
    specs = resolve_spec(quantizable_layers(model, "dit"), W4, A8, KEEP_FP, ROLES)
    rtn.apply(model, specs, calib, {"attn": None}, device=CPU, dtype=torch.float32)
    sel = select_trainable(model, plan_selection(quantizable_layers(model, "dit"), specs, RULES, ROLES))
    return fp, model, sel


@torch.no_grad()
def _val_loss(model, sel, pool: Pool) -> float:
    """The validation loss recomputed independently: every item of the pool in one call each way."""
    kwargs = collate([pool.kwargs(it) for it in pool.items])
    with sel.teacher_mode():
        teacher = model(**kwargs, return_dict=False)[0]
    return float(torch.nn.functional.mse_loss(model(**kwargs, return_dict=False)[0], teacher))


@torch.no_grad()
def _weight_stats(sel) -> tuple[float, float]:
    """zero_fraction and latent_to_scale recomputed from the quantizers' forward and stored scales."""
    layers = [m for n, m in sel.model.named_modules()
              if n in sel.plan and is_quant_layer(m) and m.weight_quantizer is not None]
    codes = [m.weight_quantizer(m.weight) for m in layers]
    zeros = sum(int((w == 0).sum()) for w in codes) / sum(w.numel() for w in codes)
    ratios = [float(m.weight.abs().mean() / m.weight_quantizer.params()["scale"].mean()) for m in layers]
    return zeros, sum(ratios) / len(ratios)


@pytest.fixture(scope="module")
def runs(pools):
    """Finetuning runs by name: stats, the recomputed final validation loss and what the test needs."""
    train_pool, val_pool = pools
    settings = {"mid": _cfg(12, MID_LR), "mid_short": _cfg(10, MID_LR), "high": _cfg(8, HIGH_LR),
                "high_last": _cfg(8, HIGH_LR, keep="last")}
    done: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in done:
            fp, model, sel = _student()
            start = {n: p.detach().clone() for n, p in sel.named_trainable().items()}
            stats = engine.train(model, sel, TrajectoryData(train_pool), settings[name], device=CPU,
                                 dtype=torch.float32, val=val_pool)
            batch = collate([val_pool.kwargs(it) for it in val_pool.items[:3]])
            with torch.no_grad(), sel.teacher_mode():
                teacher = model(**batch, return_dict=False)[0]
            with torch.no_grad():
                reference = fp(**batch, return_dict=False)[0]
            done[name] = {"stats": stats, "final": _val_loss(model, sel, val_pool), "weights": _weight_stats(sel),
                          "teacher_is_fp": torch.equal(teacher, reference),
                          "unchanged": all(torch.equal(start[n], p) for n, p in sel.named_trainable().items())}
        return done[name]

    return run


def test_keep_best_ends_at_the_lowest_validation_loss(runs):
    r = runs("mid")
    s = r["stats"]
    steps, values = map(list, zip(*s["val_curve"]))
    assert steps == [0, 2, 4, 6, 8, 10, 12] and s["eval_every"] == 2 and s["keep"] == "best" and s["val_items"] == 8
    best = min(values)
    assert s["best_val_loss"] == best and s["best_step"] == steps[values.index(best)]
    assert 0 < s["best_step"] < 12 and values[-1] > 1.05 * best  # the last state is not the best: restoring matters
    assert r["final"] == pytest.approx(best, rel=1e-5)
    assert all(abs(v - r["final"]) > 1e-3 * best for v in values if v != best)  # not some other validated state
    assert s["lr_curve"] == [MID_LR] * 12 and len(s["loss_curve"]) == 12


def test_too_high_a_learning_rate_keeps_the_start_and_keep_last_keeps_the_end(runs):
    high, last = runs("high"), runs("high_last")
    values = [v for _, v in high["stats"]["val_curve"]]
    assert all(v > 10 * values[0] for v in values[1:])  # the loss rises from the PTQ start
    assert high["stats"]["best_step"] == 0 and high["final"] <= values[0] * (1 + 1e-5)
    assert high["unchanged"]  # the restored state is the PTQ start, bit for bit
    assert last["stats"]["val_curve"] == high["stats"]["val_curve"]  # keep does not change the training
    assert last["stats"]["keep"] == "last" and last["stats"]["best_step"] == 0 and not last["unchanged"]
    assert last["final"] == pytest.approx(values[-1], rel=1e-5)


def test_a_longer_run_ends_no_worse_than_a_shorter_runs_best(runs):
    short, long = runs("mid_short"), runs("mid")
    assert long["stats"]["val_curve"][:6] == short["stats"]["val_curve"]  # same start, same steps
    assert long["stats"]["val_curve"][-1][1] > short["stats"]["best_val_loss"]  # its last state is worse
    assert long["final"] <= short["stats"]["best_val_loss"] * (1 + 1e-5)
    assert short["final"] == pytest.approx(short["stats"]["best_val_loss"], rel=1e-5)


def test_the_teacher_never_drifts_and_stays_the_fp_model(runs):
    for name in ("mid", "high"):
        r = runs(name)
        assert [p["teacher_drift"] for p in r["stats"]["probes"]] == [0.0] * len(r["stats"]["val_curve"])
        assert r["teacher_is_fp"]


def test_probes_are_the_quantized_weights_statistics(runs):
    last = runs("high_last")
    probes = last["stats"]["probes"]
    assert [p["step"] for p in probes] == [s for s, _ in last["stats"]["val_curve"]]
    zeros, ratio = last["weights"]  # the final state is the last probe's
    assert probes[-1]["zero_fraction"] == pytest.approx(zeros, rel=1e-6) and 0 < zeros < 0.5
    assert probes[-1]["latent_to_scale"] == pytest.approx(ratio, rel=1e-5) and ratio > 1
    assert probes[0]["zero_fraction"] != probes[-1]["zero_fraction"]  # the weights moved


def test_ternary_probes_start_at_the_absmean_scale(compose):
    q = OmegaConf.to_container(compose("quant=ternary_w158").quant, resolve=True)
    pipe, calib = pipeline_and_calib("dit")
    model = copy.deepcopy(denoiser(pipe))
    specs = resolve_spec(quantizable_layers(model, "dit"), q["weight"], q["act"], q["rules"], ROLES)
    rtn.apply(model, specs, calib, q, device=CPU, dtype=torch.float32)
    sel = select_trainable(model, plan_selection(quantizable_layers(model, "dit"), specs, RULES, ROLES))
    stats = engine.weight_stats(sel)
    assert stats["latent_to_scale"] == pytest.approx(1.0, abs=0.01)  # BitNet's scale is mean|W|
    assert 0.1 < stats["zero_fraction"] < 0.5  # |W| below half the scale rounds to 0


def test_resume_with_validation_ends_bit_identical(pools, tmp_path, monkeypatch):
    train_pool, val_pool = pools
    cfg = _cfg(8, MID_LR, checkpoint_every=3)

    def run(state_dir):
        _, model, sel = _student()
        stats = engine.train(model, sel, TrajectoryData(train_pool), cfg, device=CPU, dtype=torch.float32,
                             state_dir=state_dir, val=val_pool)
        sel.finish()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, stats

    whole, whole_stats = run(tmp_path / "whole")
    # killed after the checkpoint at step 3 (validated at 0 and 2), before step 5
    interrupt_training(monkeypatch, engine, run, tmp_path / "resumed", 4)
    resumed, stats = run(tmp_path / "resumed")
    assert stats["resumed_from"] == 3 and whole_stats["best_step"] not in (None, 8)
    for key in ("loss_curve", "val_curve", "probes", "lr_curve", "best_step", "best_val_loss"):
        assert stats[key] == whole_stats[key], key
    assert set(resumed) == set(whole) and all(torch.equal(whole[k], resumed[k]) for k in whole)
    again, stats = run(tmp_path / "resumed")  # complete: the checkpoint's best state is restored again
    assert stats["resumed_from"] == 8 and stats["val_curve"] == whole_stats["val_curve"]
    assert all(torch.equal(whole[k], again[k]) for k in whole)


TINY = ["model=tiny_sd15", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3", "quant=w4a8", "finetune=distill", "finetune.steps=20"]


@pytest.mark.parametrize("overrides,match", [
    (["finetune.keep=first"], "unknown finetune.keep 'first'"),
    (["finetune.eval_every=-1"], "eval_every must be >= 0"),
    (["finetune.eval_every=21"], "eval_every=21 is more than finetune.steps=20"),
    (["finetune.eval_every=0"], "set keep=last or eval_every>0"),
    (["finetune.data.val_prompts=0"], "val_prompts must be at least 1 while validating"),
])
def test_bad_validation_settings_fail_before_calibration(compose, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline before failing"))
    monkeypatch.setattr(job, "quantize", lambda *a, **k: pytest.fail("calibrated before failing"))
    with pytest.raises(ConfigError, match=match):
        job.run(compose(*TINY, *overrides), tmp_path / "run")


def test_validation_off_with_keep_last_is_a_valid_setting(compose):
    ft = OmegaConf.to_container(compose(*TINY, "finetune.eval_every=0", "finetune.keep=last",
                                        "finetune.data.val_prompts=0").finetune, resolve=True)
    check_finetune(ft, load=False, keep_fp_weights=True, world=None)
    assert engine.eval_interval(ft["eval_every"], 20) == 0 and engine.eval_interval(None, 20) == 2
    assert engine.eval_interval(None, 7) == 1


def test_validation_prompts_are_held_out(compose):
    ft = OmegaConf.to_container(compose(*TINY, "finetune.data.num_prompts=3", "finetune.data.val_prompts=3")
                                .finetune, resolve=True)
    assert validation_prompts(ft, ["a", "b", "c", "d"], ["a", "b", "c"]) == ["d", "a", "b"]  # cycled on
    world = {**ft, "data": {**ft["data"], "prompts": "world", "val_prompts": 8}}
    train = get_world("shapes").training_examples(300, ft["data"]["seed"])[0]
    drawn = get_world("shapes").training_examples(8, ft["data"]["val_seed"])[0]
    held = validation_prompts(world, [], train, "shapes")
    assert held == [c for c in drawn if c not in set(train)] and 0 < len(held) < 8  # the shared ones dropped


def test_stages_keep_their_own_best_and_the_report_offsets_their_curves(compose, tmp_path):
    pipe, calib = pipeline_and_calib("dit")
    pipe = copy.deepcopy(pipe)
    model = denoiser(pipe)
    specs = resolve_spec(quantizable_layers(model, "dit"), W4, A8, KEEP_FP, ROLES)
    rtn.apply(model, specs, calib, {}, device=CPU, dtype=torch.float32)
    ft = OmegaConf.to_container(compose("quant=quest_w4a4").finetune, resolve=True)
    ft = {**ft, "steps": 5, "batch_size": 2, "eval_every": None, "keep": "best",
          "quest": {**ft["quest"], "tla_fraction": 0.4},  # 2 + 3 steps
          "data": {**ft["data"], "num_prompts": 2, "val_prompts": 2, "batch_size": 2},
          "optim": {**ft["optim"], "lr": 1e-3, "act_scale_lr": 1e-3}}
    stats = finetune_denoiser(pipe, "dit", specs, ft, {"enabled": False}, calib=calib, calib_prompts=["cat", "dog"],
                              smp=Sampling(4, 4.0, 32, 2, {}), model_key={"tiny": "dit"}, cache_dir=str(tmp_path),
                              state_key={"test": 1}, device=CPU)
    tla, cma = stats["stages"]
    assert (tla["steps"], cma["steps"]) == (2, 3) and tla["eval_every"] == cma["eval_every"] == 1
    for stage in (tla, cma):
        values = [v for _, v in stage["val_curve"]]
        assert [s for s, _ in stage["val_curve"]] == list(range(stage["steps"] + 1))
        assert stage["best_val_loss"] == min(values) and stage["val_items"] == 8
    assert stats["val_curve"] == tla["val_curve"] + [[2 + s, v] for s, v in cma["val_curve"]]
    assert [p["step"] for p in stats["probes"]] == [s for s, _ in stats["val_curve"]]
    assert stats["best_step"] == 2 + cma["best_step"] and stats["best_val_loss"] == cma["best_val_loss"]
    assert len(stats["lr_curve"]) == 5 and stats["data"]["val_prompts"] == 2
    assert cma["val_curve"][0][1] == pytest.approx(tla["best_val_loss"], rel=1e-6)  # starts from the kept state

    finetuned = {"name": "quest", **stats}
    text = job.spec_text(specs, {"enabled": False}, finetuned)
    assert text.count("validation: best val loss") == 2
    assert f"at step {cma['best_step']} of 3 (kept; 4 validations on 8 held-out items)" in text
    fig = job.loss_plot(finetuned, tmp_path / "finetune_loss.png")
    kept = [line for line in fig.axes[0].get_lines() if line.get_label().startswith("kept")]
    assert [line.get_xdata()[0] for line in kept] == [tla["best_step"], 2 + cma["best_step"]]


def test_the_plot_draws_the_validation_curve_the_kept_step_and_the_learning_rate(runs, tmp_path):
    stats = runs("mid")["stats"]
    path = tmp_path / "finetune_loss.png"
    fig = job.loss_plot({**stats, "stages": None}, path)
    assert path.stat().st_size > 10_000
    ax, lr_ax = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["training loss"].get_ydata()) == stats["loss_curve"] and ax.get_yscale() == "log"
    val = lines["validation loss"]
    assert [list(val.get_xdata()), list(val.get_ydata())] == [list(x) for x in zip(*stats["val_curve"])]
    assert val.get_marker() == "o"
    kept = lines[f"kept: step {stats['best_step']}"]
    assert list(kept.get_xdata()) == [stats["best_step"]] * 2
    (lr,) = lr_ax.get_lines()
    assert list(lr.get_ydata()) == stats["lr_curve"]
    last = job.loss_plot({**runs("high_last")["stats"], "stages": None}, tmp_path / "last.png")
    assert not [line for line in last.axes[0].get_lines() if line.get_label().startswith("kept")]


def test_a_checkpoint_without_a_validation_record_is_one_clear_error(tmp_path):
    p = torch.nn.Parameter(torch.zeros(2))
    save_tensors(tmp_path / STATE_FILE, {"param/p": torch.ones(2)}, {"step": 3, "names": ["p"], "losses": [1.0]})
    opt = torch.optim.Adam([p])
    with pytest.raises(CheckpointError, match="older diffq"):
        load_checkpoint(tmp_path, params={"p": p}, optimizer=opt,
                        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), generator=torch.Generator())
    assert torch.equal(p.detach(), torch.zeros(2))  # nothing was loaded
