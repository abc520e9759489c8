"""The testbed training script runs every stage end to end (a few steps) and resumes."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_testbed.py"


def _train(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), "--threads", "1", "--data", "600", "--vae-steps", "3", "--clip-steps", "3",
            "--unet-steps", "3", "--flux-steps", "3", "--batch", "8", "--clip-batch", "16",
            "--assets", str(tmp / "assets"), "--cache", str(tmp / "cache"), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # about 90 s: every stage of the training script, tiny
def test_all_stages_write_loadable_models_and_skip_when_done(tmp_path):
    from diffusers import FluxPipeline, StableDiffusionPipeline

    from diffq.models import generate_images

    res = _train(tmp_path, "--stage", "all", "--eval-per-task", "2")  # cards score 12 GenEval-shapes prompts
    assert res.returncode == 0, res.stderr[-3000:]
    assets = tmp_path / "assets"
    for name in ("vae", "clip", "unet_pipeline", "flux_pipeline"):
        log = json.loads((assets / name / "train_log.json").read_text())
        assert log["steps"] == 3 and log["seconds"] > 0
        assert (assets / name / "README.md").read_text().startswith(f"# testbed `{name}`")
    assert 0 <= json.loads((assets / "clip" / "train_log.json").read_text())["text_to_image_top1_100"] <= 1
    for name in ("unet_pipeline", "flux_pipeline"):
        log = json.loads((assets / name / "train_log.json").read_text())
        assert log["geneval_prompts"] == 12 and 0 <= log["geneval_overall"] <= 1 and len(log["geneval_tasks"]) == 6
    sd = StableDiffusionPipeline.from_pretrained(assets / "unet_pipeline")
    img = generate_images(sd, "sd", ["a photo of a red circle"], [0], steps=2, guidance=3.0, resolution=32,
                          progress=False)
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    flux = FluxPipeline.from_pretrained(assets / "flux_pipeline")
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"
    again = _train(tmp_path, "--stage", "vae")
    assert again.returncode == 0 and "already trained" in again.stdout
    rescored = _train(tmp_path, "--stage", "cards", "--eval-per-task", "3")  # another prompt set: scored again
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    log = json.loads((assets / "unet_pipeline" / "train_log.json").read_text())
    assert log["geneval_prompts"] == 17  # 3 of each task, and single_object has only 2
    _check_conditioning(sd, flux)
    _check_latent_space(sd, assets / "vae")


def _check_conditioning(sd, flux) -> None:
    """The text features each pipeline computes at inference are the ones its denoiser was trained
    on (FluxPipeline pools CLIPTextModel's pooler_output; SD uses the last hidden states)."""
    spec = importlib.util.spec_from_file_location("train_testbed", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    prompts = ["a photo of a red circle", "a photo of two blue squares"]
    hidden, _, index = script.text_table(sd.text_encoder, sd.tokenizer, prompts)
    with torch.no_grad():
        embeds, _ = sd.encode_prompt(prompts, "cpu", 1, False)
        _, pooled, _ = flux.encode_prompt(prompts, prompts, max_sequence_length=16)
    torch.testing.assert_close(embeds, hidden[index[:-1]])
    _, train_pooled, index = script.text_table(flux.text_encoder, flux.tokenizer, prompts)
    torch.testing.assert_close(pooled, train_pooled[index[:-1]])


def _check_latent_space(sd, vae_folder: Path) -> None:
    """StableDiffusionPipeline decodes latents / scale, ignoring shift_factor: its VAE carries the shift,
    so it decodes (and encodes) the (mean - shift) * scale latents the UNet was trained on."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    assert sd.vae.config.shift_factor is None and shift != 0
    z, x = torch.randn(2, 4, 16, 16), torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(sd.vae.decode(z / scale).sample, vae.decode(z / scale + shift).sample,
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sd.vae.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean - shift,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_cards_score_the_generators_on_every_geneval_prompt(tmp_path):
    res = _train(tmp_path, "--stage", "all")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("unet_pipeline", "flux_pipeline"):
        log = json.loads((tmp_path / "assets" / name / "train_log.json").read_text())
        assert log["geneval_prompts"] == 201 and len(log["geneval_tasks"]) == 6
        assert set(log["chance_tasks"]) == set(log["geneval_tasks"])
