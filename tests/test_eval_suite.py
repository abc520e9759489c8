"""The evaluation suite: CLIP score (transformers 5 adapter), LPIPS offline, config checks, job wiring."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffq.errors import CheckpointError, ConfigError
from diffq.eval import lpips as lpips_mod
from diffq.eval.clip_score import CLIPFeatureAdapter, clip_score, load_clip
from diffq.eval.suite import check_eval
from diffq.job import run
from diffq.testbed.assets import asset_path
from diffq.testbed.groundtruth import render_entry
from diffq.testbed.prompts import evaluation_metadata


@pytest.fixture(scope="module")
def testbed_clip():
    return load_clip(asset_path("clip"))


def _renders(n: int) -> tuple[torch.Tensor, list[str]]:
    rng = np.random.default_rng(0)
    entries = list(evaluation_metadata())[::8][:n]
    images = np.stack([render_entry(e, rng) for e in entries])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [e["prompt"] for e in entries]


def test_clip_score_is_100_cosine_and_prefers_the_right_prompt(testbed_clip):
    images, prompts = _renders(16)
    matched = clip_score(images, prompts, testbed_clip)
    shuffled = clip_score(images, prompts[3:] + prompts[:3], testbed_clip)
    assert matched["n"] == 16 and matched["mean"] > shuffled["mean"] + 5
    model, processor = testbed_clip
    with torch.no_grad():
        img = model.get_image_features(processor(images=list(images), return_tensors="pt")["pixel_values"])
        txt = model.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
    expected = (100 * torch.nn.functional.cosine_similarity(img, txt)).clamp_min(0).mean()
    assert matched["mean"] == pytest.approx(float(expected), rel=1e-4)


def test_clip_loads_a_same_class_model_from_a_folder_and_names_what_is_missing(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    clip_dir = asset_path("clip")
    config = CLIPConfig.from_pretrained(clip_dir)
    CLIPModel(config).save_pretrained(tmp_path / "random_clip")  # untrained, same class as ViT-L/14
    CLIPProcessor.from_pretrained(clip_dir).save_pretrained(tmp_path / "random_clip")
    model, _ = load_clip(tmp_path / "random_clip")
    assert isinstance(model, CLIPFeatureAdapter)
    images, prompts = _renders(2)
    assert np.isfinite(clip_score(images, prompts, (model, _))["mean"])
    CLIPModel(config).save_pretrained(tmp_path / "no_processor")
    with pytest.raises(CheckpointError, match="no image processor config"):
        load_clip(tmp_path / "no_processor")
    with pytest.raises(CheckpointError, match="eval.clip_model"):
        load_clip("openai/clip-vit-large-patch14")  # offline in tests


def test_lpips_offline_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric, reason = lpips_mod.load_lpips("alex")
    assert metric is None and "alexnet" in reason and str(tmp_path) in reason
    with pytest.raises(ConfigError, match="LPIPS network 'resnet'"):
        lpips_mod.load_lpips("resnet")


def test_lpips_pairs_batches_per_image_values():
    def squared_error(a, b):
        return (a - b).pow(2).flatten(1).mean(1)

    a = torch.rand(5, 3, 8, 8)
    b = a.clone()
    b[2] += 0.5
    out = lpips_mod.lpips_pairs(a, b.clamp(0, 1), squared_error, batch_size=2)
    assert len(out["per_image"]) == 5 and out["per_image"][2] > 0 and out["per_image"][0] == 0


def test_lpips_network_orders_distortions_offline():
    """LPIPS' own linear heads on an untrained backbone (no download): what can be checked offline is
    that identical images are at distance 0 and more noise is farther; the values of the ImageNet
    backbone need its weights (the job records "skipped" without them)."""
    torch.manual_seed(0)
    metric = lpips_mod.PairedLPIPS("alex", random_backbone=True)
    images = _renders(4)[0].float() / 255
    noise = torch.randn_like(images)
    out = {s: lpips_mod.lpips_pairs(images, images + s * noise, metric, batch_size=3)["per_image"]
           for s in (0, 0.05, 0.3)}
    assert out[0] == [0.0] * 4
    assert all(0 < low < high for low, high in zip(out[0.05], out[0.3]))
    with pytest.raises(ConfigError, match="eval.lpips_net"):
        lpips_mod.PairedLPIPS("resnet", random_backbone=True)


@pytest.mark.parametrize("overrides,match", [
    (["eval.metrics=[psnr,fid]"], "eval.fid.reference"),
    (["eval.metrics=[clip_score]"], "eval.clip_model"),
    (["eval.metrics=[psnr,sharpness]"], "sharpness"),
    (["eval.metrics=[fid_fp]", "eval.fid.backend=tf"], "backend 'tf'"),
    (["eval.metrics=[psnr,lpips]", "eval.lpips_net=resnet"], "eval.lpips_net"),
])
def test_metrics_that_cannot_run_stop_before_generation(compose, overrides, match):
    cfg = compose("model=tiny_sd15", *overrides)
    with pytest.raises(ConfigError, match=match):
        check_eval(cfg.eval)


def test_testbed_job_reports_every_cheap_metric_with_settings(compose, tmp_path, monkeypatch):
    # offline the ImageNet backbone is absent: the job's LPIPS wiring runs on the untrained one
    monkeypatch.setattr(lpips_mod, "load_lpips", lambda net: (lpips_mod.PairedLPIPS(net, random_backbone=True), None))
    cfg = compose("eval.geneval.images_per_task=4", "eval.metrics=[psnr,ssim,lpips,clip_score]", "eval.grid=false",
                  "calib.num_prompts=2", "calib.num_steps=2")
    m = run(cfg, tmp_path)["metrics"]
    assert set(m) == {"psnr", "ssim", "lpips", "clip_score", "geneval"}
    assert m["clip_score"]["fp"] > 10 and abs(m["clip_score"]["quant"] - m["clip_score"]["fp"]) < 5
    assert m["clip_score"]["settings"]["model"].endswith("clip") and m["clip_score"]["settings"]["n"] == 24
    assert 0 < m["lpips"]["quant"] < 1
    assert m["lpips"]["settings"]["net"] == "alex" and m["lpips"]["settings"]["pairs"] == 24
    assert all(v["seconds"] >= 0 for v in m.values())


@pytest.mark.slow
def test_testbed_job_fid_against_world_and_fp(compose, tmp_path):
    cfg = compose("eval.geneval.images_per_task=4", "eval.metrics=[fid,fid_fp]", "eval.fid.num_reference=64",
                  "eval.grid=false", "calib.num_prompts=2", "calib.num_steps=2")
    m = run(cfg, tmp_path)["metrics"]
    assert m["fid"]["settings"]["reference"] == "shapes" and m["fid"]["settings"]["n_reference"] == 64
    assert 0 < m["fid"]["fp"]["fid"] < 400 and 0 < m["fid"]["quant"]["fid"] < 400
    assert 0 <= m["fid_fp"]["quant"]["fid"] < m["fid"]["quant"]["fid"]  # W8A8 stays closer to FP than to real images


def test_fp_inception_features_are_cached_across_jobs_of_a_sweep(compose, tmp_path, monkeypatch):
    from diffq.eval import fid as fid_mod
    from diffq.eval.suite import evaluate

    ev = compose("model=tiny_sd15", "eval.metrics=[fid_fp]").eval
    fp, _ = _renders(8)
    quant = (fp.float() + 12 * torch.randn(fp.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    fp, quant = fp.float() / 255, quant / 255
    sides = []
    extract = fid_mod.extract_features
    monkeypatch.setattr(fid_mod, "extract_features", lambda images, *a, **k: sides.append(k["desc"]) or
                        extract(images, *a, **k))
    # a cheap stand-in for the 2048-d FID (seconds of sqrtm): the distance of the feature means
    monkeypatch.setattr(fid_mod, "fid_kid", lambda real, fake, *a: SimpleNamespace(
        fid=float((real.double().mean(0) - fake.double().mean(0)).pow(2).sum()), kid_mean=0.0, kid_std=0.0,
        n_real=len(real)))
    first = evaluate(ev, fp, quant, [], None, str(tmp_path), fp_key="fp-setting")["fid_fp"]
    second = evaluate(ev, fp, quant, [], None, str(tmp_path), fp_key="fp-setting")["fid_fp"]
    assert sides == ["inception features (fp)", "inception features (quant)", "inception features (quant)"]
    assert not first["settings"]["fp_features_cache_hit"] and second["settings"]["fp_features_cache_hit"]
    assert second["quant"] == first["quant"] and first["quant"]["fid"] > 0
    evaluate(ev, fp, quant, [], None, str(tmp_path), fp_key="other FP images")  # another key: computed again
    assert sides.count("inception features (fp)") == 2
