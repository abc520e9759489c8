"""The testbed training script runs every stage end to end (a few steps) and resumes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_testbed.py"


def _train(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), "--threads", "1", "--data", "600", "--vae-steps", "3", "--clip-steps", "3",
            "--unet-steps", "3", "--flux-steps", "3", "--batch", "8", "--clip-batch", "16",
            "--assets", str(tmp / "assets"), "--cache", str(tmp / "cache"), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def test_all_stages_write_loadable_models_and_skip_when_done(tmp_path):
    from diffusers import FluxPipeline, StableDiffusionPipeline

    from diffq.models import generate_images

    res = _train(tmp_path, "--stage", "all")
    assert res.returncode == 0, res.stderr[-3000:]
    assets = tmp_path / "assets"
    for name in ("vae", "clip", "unet_pipeline", "flux_pipeline"):
        log = json.loads((assets / name / "train_log.json").read_text())
        assert log["steps"] == 3 and log["seconds"] > 0
    sd = StableDiffusionPipeline.from_pretrained(assets / "unet_pipeline")
    img = generate_images(sd, "sd", ["a photo of a red circle"], [0], steps=2, guidance=3.0, resolution=32, progress=False)
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    flux = FluxPipeline.from_pretrained(assets / "flux_pipeline")
    assert type(flux.text_encoder_2).__name__ == "T5EncoderModel"
    again = _train(tmp_path, "--stage", "vae")
    assert again.returncode == 0 and "already trained" in again.stdout
