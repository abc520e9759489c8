"""Testbed integration: asset checks and vocabulary errors (no trained generator needed)."""
from __future__ import annotations

import json
import shutil

import pytest

from diffq.errors import CheckpointError, ConfigError
from diffq.job import check_vocabulary
from diffq.models import build_word_tokenizer, unknown_words
from diffq.testbed import assets
from diffq.testbed.prompts import evaluation_metadata, vocabulary


def test_evaluation_prompts_are_in_vocabulary():
    tok = build_word_tokenizer(vocabulary(), max_length=16)
    assert unknown_words(tok, [m["prompt"] for m in evaluation_metadata()]) == {}


def test_out_of_vocabulary_prompt_is_a_clear_error():
    class Pipe:
        tokenizer = build_word_tokenizer(vocabulary(), max_length=16)

    check_vocabulary(Pipe(), ["a photo of two red circles"])
    with pytest.raises(ConfigError, match=r"\['dog'\].*circle"):
        check_vocabulary(Pipe(), ["a photo of a red circle", "a photo of a dog"])


def test_missing_and_partial_asset_folders_name_the_file_and_the_script(tmp_path, monkeypatch):
    vae_src = assets.ASSETS_DIR / "vae"
    root = tmp_path / "assets" / "testbed"
    monkeypatch.setattr(assets, "ASSETS_DIR", root)
    with pytest.raises(CheckpointError, match=r"unet_pipeline is missing.*train_testbed.py --stage unet"):
        assets.check_asset_folder(root / "unet_pipeline")
    folder = root / "unet_pipeline"
    (folder / "vae").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "vae": ["diffusers", "AutoencoderKL"],
                                                         "scheduler": ["diffusers", "DDIMScheduler"]}))
    with pytest.raises(CheckpointError, match=r"vae has no weights file.*--stage unet"):
        assets.check_asset_folder(folder)
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(vae_src / f, folder / "vae" / f)
    with pytest.raises(CheckpointError, match=r"scheduler_config.json is missing"):
        assets.check_asset_folder(folder)


def test_shipped_vae_reconstructs_world_images():
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from diffq.eval.fidelity import psnr
    from diffq.testbed.prompts import training_example
    from diffq.testbed.world import render

    vae = AutoencoderKL.from_pretrained(assets.asset_path("vae")).eval()
    rng = np.random.default_rng(99)
    images = np.stack([render(training_example(rng).scene) for _ in range(64)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert float(psnr((x + 1) / 2, ((rec + 1) / 2).clamp(0, 1)).mean()) >= 28.0
