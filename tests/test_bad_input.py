"""Bad or unusual input to the CLI and the Python API: one early clear error that names the fix, a
pipeline left usable, nothing written over or lost."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException

import diffq
from diffq import job
from diffq.errors import CheckpointError, ConfigError
from diffq.export import export_quantized, load_quantized, read_metadata
from diffq.files import umask
from diffq.finetune.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
from diffq.finetune.stage import check_finetune
from diffq.layers import is_quant_layer
from diffq.models import denoiser_of
from diffq.quantize_stage import quantized_info
from diffq.sweep import main as report_main
from tests.helpers import outputs, pipeline_and_calib

TINY = ["model=tiny_sd15", "eval=none", "calib.num_prompts=2", "calib.num_steps=2"]
ROOT = Path(__file__).resolve().parents[1]


def _kwargs(family: str = "sd") -> list[dict]:
    return [s.kwargs for s in pipeline_and_calib(family)[1]]


def _fresh(family: str = "sd"):
    """A deep copy of the tiny pipeline (the session's cached one stays FP)."""
    return copy.deepcopy(pipeline_and_calib(family)[0])


def _no_pipeline_load(monkeypatch):
    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("the pipeline loaded before the check"))


# ----------------------------------------------------------------------------- CLI settings


def test_negative_finetune_steps_stop_and_zero_says_it_skips(compose, tmp_path, monkeypatch, caplog):
    _no_pipeline_load(monkeypatch)
    with pytest.raises(ConfigError, match=r"finetune.steps must be >= 0 \(got -5\): 0 skips finetuning"):
        job.run(compose(*TINY, "finetune=distill", "finetune.steps=-5"), tmp_path)
    ft = dict(compose(*TINY, "finetune=distill", "finetune.steps=0").finetune)
    with caplog.at_level(logging.INFO, logger="diffq"):
        check_finetune(ft, load=False, keep_fp_weights=True, world=None)
    assert "finetune=distill with finetune.steps=0: finetuning is skipped" in caplog.text


def test_a_bad_train_rule_names_finetune_train(compose, tmp_path, monkeypatch):
    import diffq.calib as calib_mod

    monkeypatch.setattr(calib_mod, "load_or_capture", lambda *a, **k: pytest.fail("calibration ran"))
    cfg = compose(*TINY, "finetune=distill", "finetune.steps=2",
                  "+finetune.train=[{roles: [bogus_role], kinds: [weight]}]")
    with pytest.raises(ConfigError, match=r"^finetune\.train\[0\]: unknown role\(s\) \['bogus_role'\]"):
        job.run(cfg, tmp_path)


def test_calibration_steps_beyond_the_sampler_name_a_fix_that_works(compose, caplog):
    # 11 shared groups on a 10-step sampler: raising calib.num_steps cannot help
    with pytest.raises(ConfigError, match=r"runs only 10 steps .*lower quant.act.timestep_groups to 10 or less, or "
                                          r"set calib.steps=11 calib.num_steps=11"):
        job.check_config(compose(*TINY, "quant.act.timestep_groups=11", "quant.act.timestep_init=shared",
                                 "calib.num_steps=11"))
    with pytest.raises(ConfigError, match=r"fix: set calib.num_steps=8 or lower"):  # reachable: say so
        job.check_config(compose(*TINY, "quant.act.timestep_groups=4", "calib.num_steps=4"))
    job.check_config(compose(*TINY, "quant.act.timestep_groups=11", "quant.act.timestep_init=shared",
                             "calib.num_steps=11", "calib.steps=11"))  # the fix it names works
    with caplog.at_level(logging.WARNING, logger="diffq"):
        job.check_config(compose(*TINY, "calib.num_steps=50"))
    assert "calib.num_steps=50 is more than the calibration sampler's 10 steps: all 10 are kept" in caplog.text


@pytest.mark.parametrize("text, match", [("rules: [a\n  b: {", "is not valid YAML"), ("", "has no list of rules"),
                                         ("steps: 3\n", "has no list of rules"),
                                         ("rules: [1, 2]\n", "has no list of rules")])
def test_a_malformed_plan_file_is_one_clear_error(compose, tmp_path, text, match):
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    with pytest.raises(ConfigError, match=f"quant.mixdq.plan {plan} {match}.*point quant.mixdq.plan at a run's"):
        job.check_config(compose(*TINY, "quant=mixdq_w8a8", f"quant.mixdq.plan={plan}"))


def test_report_refuses_a_folder_without_jobs_and_writes_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main([str(empty)]) == 2
    assert "no job folders found" in capsys.readouterr().err and not list(empty.iterdir())
    run = tmp_path / "run"  # a single run's folder
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"status": "ok"}))
    assert report_main([str(run)]) == 2
    assert "a single run's folder" in capsys.readouterr().err and [p.name for p in run.iterdir()] == ["metrics.json"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Exports of the tiny SD denoiser: W8A8 and W4A8 (float32), and W4A8 from a bfloat16 copy."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, preset, dtype in (("int8", "w8a8", torch.float32), ("int4", "w4a8", torch.float32),
                                ("int4_bf16", "w4a8", torch.bfloat16)):
        model = copy.deepcopy(denoiser_of(pipeline_and_calib("sd")[0])[1]).to(dtype)
        calib = [s.to("cpu", dtype) for s in pipeline_and_calib("sd")[1]]
        diffq.quantize(model, preset, calib=calib)
        info = quantized_info(model)
        export_quantized(model, info.specs, root / name, info.attn)
        out[name] = root / name
    return out


def test_packed_on_an_export_with_nothing_to_pack_is_refused(compose, exports, monkeypatch, tmp_path):
    _no_pipeline_load(monkeypatch)
    with pytest.raises(ConfigError, match="stores every layer at 8 bits or more, so nothing would pack: drop packed"):
        job.run(compose(*TINY, f"load={exports['int8']}", "packed=true"), tmp_path)
    job.check_config(compose(*TINY, f"load={exports['int4']}", "packed=true"))
    model = copy.deepcopy(denoiser_of(pipeline_and_calib("sd")[0])[1])
    info = job.load_export(str(exports["int4"]), model, packed=True)
    assert info["packed"] and info["packed_layers"] == len(read_metadata(exports["int4"])["packed"]) > 0


def test_an_export_loads_into_a_model_of_another_dtype(exports):
    fp = denoiser_of(pipeline_and_calib("sd")[0])[1]
    ref = load_quantized(exports["int4"], copy.deepcopy(fp))
    into_bf16 = load_quantized(exports["int4"], copy.deepcopy(fp).to(torch.bfloat16))
    assert {p.dtype for p in into_bf16.parameters()} == {torch.bfloat16}
    for (name, a), b in zip(ref.named_parameters(), into_bf16.parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name  # the float32 load, rounded once
    calib = pipeline_and_calib("sd")[1]
    out = into_bf16(**calib[0].to("cpu", torch.bfloat16), return_dict=False)[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # the reverse: a bfloat16 export into a float32 model holds the grid values (codes x scales) that
    # the bfloat16 model holds rounded to bfloat16
    native = load_quantized(exports["int4_bf16"], copy.deepcopy(fp).to(torch.bfloat16))
    into_fp32 = load_quantized(exports["int4_bf16"], copy.deepcopy(fp))
    assert {p.dtype for p in into_fp32.parameters()} == {torch.float32}
    assert all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(native.parameters(), into_fp32.parameters()))


def _cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffq", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)


def test_a_failed_run_writes_metrics_with_its_error_and_keeps_an_earlier_result(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"status": "ok", "fidelity": {"psnr": 30.0}}))
    res = _cli([f"hydra.run.dir={run}", *TINY, "finetune=distill", "finetune.steps=-5"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "failed" and "finetune.steps must be >= 0" in m["error"]
    assert "finetune.steps=-5" in m["overrides"]
    assert json.loads((run / "metrics.previous.json").read_text())["fidelity"] == {"psnr": 30.0}


def test_exports_are_byte_identical_across_processes_with_the_umask_mode(tmp_path):
    script = ("import copy, sys, diffq\nfrom diffq.export import export_quantized\n"
              "from diffq.quantize_stage import quantized_info\nfrom diffq.models import "
              "denoiser_of\nfrom tests.helpers import pipeline_and_calib\npipe, calib = pipeline_and_calib('sd')\n"
              "m = copy.deepcopy(denoiser_of(pipe)[1])\ndiffq.quantize(m, 'w8a8', calib=[s.kwargs for s in calib])\n"
              "print(export_quantized(m, quantized_info(m).specs, sys.argv[1]))\n")
    files = []
    for seed in ("1", "2"):  # set orders differ between hash seeds
        res = subprocess.run([sys.executable, "-c", script, str(tmp_path / seed)], cwd=ROOT, capture_output=True,
                             text=True, env={**os.environ, "PYTHONHASHSEED": seed}, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        files.append(Path(res.stdout.strip().splitlines()[-1]))
    assert files[0].read_bytes() == files[1].read_bytes()
    assert files[0].stat().st_mode & 0o777 == 0o666 & ~umask()


def test_a_truncated_checkpoint_says_once_what_happens(tmp_path, caplog):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, step=2, params={"p": p}, optimizer=opt, scheduler=sched, generator=torch.Generator(),
                    losses=[1.0, 0.5], complete=False, record={}, best={"params": {}, "extra": {}})
    state = tmp_path / STATE_FILE
    state.write_bytes(state.read_bytes()[:-40])
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match=r"is unreadable \(.*\): delete it "
                                                                                r"to train from the start"):
        load_checkpoint(tmp_path, params={"p": p}, optimizer=opt, scheduler=sched, generator=torch.Generator())
    assert "recomputing" not in caplog.text and state.exists()


def test_hydra_lists_no_schema_option(compose):
    with pytest.raises(MissingConfigException) as e:
        compose("finetune=bogus")
    options = str(e.value).split("Available options")[1].split("Config search path")[0].split()
    assert "distill" in options and "schema" not in options


# ----------------------------------------------------------------------------- Python API


def test_a_calibration_string_is_one_prompt(monkeypatch):
    import diffq.calib as calib_mod

    seen = {}
    real = calib_mod.load_or_capture

    def spy(*args, **kwargs):
        seen["prompts"] = kwargs["prompts"]
        return real(*args, **kwargs)

    monkeypatch.setattr(calib_mod, "load_or_capture", spy)
    diffq.quantize(_fresh(), "w8a8", calib="a photo of a red circle", steps=3, resolution=32)
    assert seen["prompts"] == ["a photo of a red circle"]


@pytest.mark.parametrize("calib, match", [
    ([], "calib is empty: pass prompts, denoiser keyword dicts or a forward_loop, or leave it out"),
    ("mixed", r"calib mixes 1 prompts \(str\) with 1 other items: pass only prompts"),
    (3, "calib must be a list of prompts, a list of denoiser keyword dicts or a forward_loop"),
])
def test_bad_calibration_input_is_refused_before_any_work(calib, match):
    pipe = _fresh()
    calib = ["a photo", _kwargs()[0]] if calib == "mixed" else calib
    with pytest.raises(ConfigError, match=match):
        diffq.quantize(pipe, "w8a8", calib=calib)
    assert not any(is_quant_layer(m) for m in denoiser_of(pipe)[1].modules())


def test_what_quantize_accepts():
    with pytest.raises(ConfigError, match="takes a diffusers pipeline .* or its denoiser .*, got Linear"):
        diffq.quantize(torch.nn.Linear(4, 4), "w8a8")
    with pytest.raises(ConfigError, match="got str"):
        diffq.quantize("runwayml/stable-diffusion-v1-5", "w8a8")
    model = denoiser_of(_fresh())[1]
    diffq.quantize(model, "w8a8", calib=_kwargs())
    with pytest.raises(ConfigError, match="already quantized by diffq"):
        diffq.quantize(model, "w8a8", calib=_kwargs())


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_sampler_steps_below_one_are_refused(steps):
    with pytest.raises(ConfigError, match=r"the sampler needs at least 1 step"):
        diffq.quantize(_fresh(), "w8a8", calib=["a photo of a red circle"], steps=steps)


def test_a_failed_quantize_leaves_the_pipeline_as_it_was(monkeypatch):
    pipe = _fresh()
    model = denoiser_of(pipe)[1]
    calib = pipeline_and_calib("sd")[1]
    before = outputs(model, calib)
    hook = model.register_forward_hook(lambda *a: None)  # the user's own hook survives
    # checked before the model is touched
    with pytest.raises(ConfigError, match="timestep_groups=50 .* lower quant.act.timestep_groups to 10"):
        diffq.quantize(pipe, "w8a8", calib=["a photo"], steps=20, overrides={"quant.act.timestep_groups": 50})

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(diffq.api, "model_cost", broken)  # fails after calibration and quantization
    with pytest.raises(RuntimeError, match="disk full"):
        diffq.quantize(pipe, "w4a8", calib=_kwargs())
    assert not any(is_quant_layer(m) for m in model.modules()) and "_diffq" not in model.__dict__
    assert all(torch.equal(a, b) for a, b in zip(before, outputs(model, calib)))
    assert len(model._forward_hooks) == 1
    hook.remove()
    assert not model._forward_hooks
    monkeypatch.undo()
    diffq.quantize(pipe, "w4a8", calib=_kwargs())  # a retry works
    assert any(is_quant_layer(m) for m in model.modules())


def test_a_failure_after_weights_changed_in_place_says_to_reload(monkeypatch):
    pipe = _fresh()

    def broken(model, *args, **kwargs):
        model.conv_in.weight.data.mul_(2)  # as an in-place training step or an overwriting freeze would
        raise ConfigError("cost failed")

    monkeypatch.setattr(diffq.api, "model_cost", broken)
    with pytest.raises(ConfigError, match=r"cost failed; .* but 1 of its tensors were changed in place "
                                          r"\(conv_in.weight\): reload the model"):
        diffq.quantize(pipe, "w4a8", calib=_kwargs())
    assert not any(is_quant_layer(m) for m in denoiser_of(pipe)[1].modules())


def test_save_refuses_a_non_empty_folder_and_overwrite_replaces_it_whole(tmp_path):
    sd = _fresh()
    diffq.quantize(sd, "w8a8", calib=_kwargs())
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty: pass overwrite=True"):
        diffq.save_quantized(sd, folder)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    diffq.save_quantized(sd, folder, overwrite=True)
    assert (folder / "unet").is_dir() and not (folder / "notes.txt").exists()
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask()
    dit = _fresh("dit")
    diffq.quantize(dit, "w8a8", calib=_kwargs("dit"))
    diffq.save_quantized(dit, folder, overwrite=True)
    assert not any((folder / n).exists() for n in ("unet", "text_encoder", "tokenizer"))
    assert type(diffq.load_pipeline(folder)) is type(dit)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_evaluate_refuses_empty_prompts():
    pipe = pipeline_and_calib("sd")[0]
    with pytest.raises(ConfigError, match="non-empty list of prompts"):
        diffq.evaluate(pipe, pipe, [], metrics=["psnr"])
    with pytest.raises(ConfigError, match="got 2 seeds for 1 prompts"):
        diffq.evaluate(pipe, pipe, ["a photo"], metrics=["psnr"], seeds=[0, 1])


def test_a_preset_that_needs_the_pipeline_says_so_before_any_work():
    model = denoiser_of(_fresh())[1]
    with pytest.raises(ConfigError, match="preset mixdq_w8a8: quant.method=mixdq generates images .* pass the "
                                          "pipeline"):
        diffq.quantize(model, "mixdq_w8a8", calib=_kwargs())
    assert not any(is_quant_layer(m) for m in model.modules())


def test_small_api_messages(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope'} does not exist"):
        diffq.load_pipeline(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"resolution=64: DiT generates only at its native resolution 32: pass "
                                          r"resolution=32"):
        diffq.quantize(_fresh("dit"), "w8a8", calib=["cat"], resolution=64)
