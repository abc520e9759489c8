"""The job's stages: bad settings stop before any image is generated; loaded exports report their own preset."""
from __future__ import annotations

import json

import pytest

from diffq import job
from diffq.errors import CheckpointError, ConfigError

TINY = ["model=tiny_sd15", "eval.grid=false", "eval.prompts=[a photo of a red circle]", "calib.num_prompts=1",
        "calib.num_steps=2", "model.steps=2"]


@pytest.fixture
def no_sampling(monkeypatch):
    """Fail the test if the job starts generating evaluation images."""
    monkeypatch.setattr(job, "generate_samples", lambda *a, **k: pytest.fail("generated images before failing"))


@pytest.mark.parametrize("overrides,match", [
    (["quant.method=nope"], "unknown quant.method 'nope'"),
    (["quant.recon=nope"], "unknown quant.recon 'nope'"),
    (["calib.selection=nope"], "unknown calib.selection 'nope'"),
    (["quant.attn.enabled=true", "quant.attn.qkv.format=nope"], "quant.attn.qkv"),
    (["quant.attn.enabled=true", "quant.attn.softmax.format=fp", "quant.attn.softmax.bits=4",
      "quant.attn.softmax.exp=5", "quant.attn.softmax.man=3"], "quant.attn.softmax"),
])
def test_bad_settings_fail_before_the_pipeline_loads(compose, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline before failing"))
    cfg = compose(*TINY, f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
    with pytest.raises(ConfigError, match=match):
        job.run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_missing_checkpoint_fails_before_the_pipeline_loads(compose, tmp_path, monkeypatch):
    monkeypatch.setattr(job, "load_pipeline", lambda *a, **k: pytest.fail("loaded the pipeline before failing"))
    with pytest.raises(CheckpointError, match="does not exist"):
        job.run(compose(*TINY, f"load={tmp_path / 'nowhere'}"), tmp_path / "run")


def test_impossible_rule_fails_before_fp_samples(compose, tmp_path, no_sampling):
    cfg = compose(*TINY, f"paths.cache_dir={tmp_path / 'cache'}", "quant.strict=true",
                  "quant.rules=[{names: [no_such_layer*], skip: true}]")
    with pytest.raises(ConfigError, match=r"quant.rules\[0\].*matches no layer"):
        job.run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache" / "fp_samples").exists()


def test_loaded_export_reports_the_checkpoint_preset_and_attention(compose, tmp_path):
    exported = job.run(compose(*TINY, "quant.attn.enabled=true", "export=true"), tmp_path / "a")
    assert exported["quant"] == "w8a8" and exported["attn"]["enabled"]
    # the command line names another preset without attention quantization: the checkpoint wins
    loaded = job.run(compose(*TINY, "quant=fp_w4a8_rtn", f"load={tmp_path / 'a' / 'model'}"), tmp_path / "b")
    assert loaded["quant"] == "w8a8" and loaded["attn"] == exported["attn"]
    assert loaded["method"] == exported["method"] == "rtn"  # not the command line's fp_search
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["quant"] == "w8a8"
    assert "attention matmuls: q/k/v int8/tensor/sym" in (tmp_path / "b" / "spec.txt").read_text()
    assert loaded["fidelity"]["psnr"]["per_image"] == exported["fidelity"]["psnr"]["per_image"]
