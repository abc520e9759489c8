"""The Python API: one call to quantize, a pipeline folder to save and load, the same result as the CLI."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import diffq
from diffq import job
from diffq.errors import ConfigError
from diffq.export import load_quantized
from diffq.models import denoiser_of, load_pipeline, sample_seeds
from tests.helpers import outputs, pipeline_and_calib

TINY = ["model=tiny_sd15", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2",
        "calib.num_steps=2", "model.steps=3"]


def test_api_quantizes_exactly_as_the_cli_job(compose, tmp_path):
    cfg = compose(*TINY, "quant=w4a8", f"paths.cache_dir={tmp_path / 'cache'}", "export=true")
    job.run(cfg, tmp_path / "cli")
    pipe = load_pipeline(cfg.model)
    _, fp = denoiser_of(pipe)
    fresh = copy.deepcopy(fp)
    diffq.quantize(pipe, "w4a8", overrides={"calib.num_prompts": 2, "calib.num_steps": 2}, steps=3,
                   guidance=cfg.model.guidance, resolution=cfg.model.resolution)
    report = pipe.diffq_report
    assert report.preset == "w4a8" and report.cost["effective_weight_bits"] > 4 and "layer" in report.table
    cli = load_quantized(tmp_path / "cli" / "model", fresh)
    _, calib = pipeline_and_calib("sd")
    api_out, cli_out = outputs(denoiser_of(pipe)[1], calib), outputs(cli, calib)
    assert all(torch.equal(a, b) for a, b in zip(api_out, cli_out))


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_save_and_load_a_pipeline_folder_generates_the_same_images(family, tmp_path):
    pipe, calib = pipeline_and_calib(family)
    pipe = copy.deepcopy(pipe)
    diffq.quantize(pipe, "w8a8", calib=[s.kwargs for s in calib])
    kwargs = {"max_sequence_length": 16} if family == "flux" else {}
    seeds = sample_seeds(0, 1)

    def image(p):
        gen = torch.Generator().manual_seed(seeds[0])
        return p("a photo of a red circle", num_inference_steps=3, height=32, width=32, generator=gen,
                 output_type="pt", **kwargs).images

    before = image(pipe)
    diffq.save_quantized(pipe, tmp_path / "saved")
    loaded = diffq.load_pipeline(tmp_path / "saved")
    assert type(loaded) is type(pipe)
    assert torch.equal(image(loaded), before)


def test_forward_loop_calibration_and_bad_input_fail_early():
    pipe, calib = pipeline_and_calib("sd")
    model = copy.deepcopy(denoiser_of(pipe)[1])
    diffq.quantize(model, "w8a8", calib=lambda m: [m(**s.kwargs) for s in calib])
    assert model.diffq_report.cost["effective_act_bits"] == pytest.approx(8, abs=0.5)
    with pytest.raises(ConfigError, match="unknown preset 'w3a3'; available: .*w4a8"):
        diffq.quantize(copy.deepcopy(model), "w3a3")
    bad = [{**calib[0].kwargs, "sample": calib[0].kwargs["sample"][:, :2]}]
    with pytest.raises(ConfigError, match="channels"):
        diffq.quantize(copy.deepcopy(denoiser_of(pipe)[1]), "w8a8", calib=bad)
    with pytest.raises(ConfigError, match="dict of UNet2DConditionModel keyword arguments"):
        diffq.quantize(copy.deepcopy(denoiser_of(pipe)[1]), "w8a8", calib=[torch.zeros(1)])
    with pytest.raises(ConfigError, match="override quant.weight.nope"):
        diffq.quantize(copy.deepcopy(denoiser_of(pipe)[1]), "w8a8", calib=[s.kwargs for s in calib],
                       quant__weight__nope=1)


def test_presets_and_evaluate(tmp_path):
    names = diffq.presets()
    assert {"w4a8", "quest_w4a4", "binarydm_w1a4"} <= set(names) and all(names.values())
    pipe, calib = pipeline_and_calib("sd")
    q = copy.deepcopy(pipe)
    diffq.quantize(q, "w4a8", calib=[s.kwargs for s in calib])
    res = diffq.evaluate(q, pipe, ["a photo of a red circle"], metrics=["psnr"], steps=3, resolution=32,
                         cache_dir=str(tmp_path))
    same = diffq.evaluate(pipe, pipe, ["a photo of a red circle"], metrics=["psnr"], steps=3, resolution=32,
                          cache_dir=str(tmp_path))
    assert 5 < res["psnr"]["quant"] < same["psnr"]["quant"]


def test_the_readme_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "out" / "w4a8" / "diffq_pipeline.json").exists()
    assert scope["image"].size == (32, 32)
