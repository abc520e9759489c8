"""Model adapters: configs, tiny pipelines, loading (tiny, local folder, hub id), generation, tokenizers."""
from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers read it

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerFast

from diffq.config import ModelConfig
from diffq.errors import CheckpointError, ConfigError
from diffq.models import (
    FAMILIES,
    PIPELINE_CLASSES,
    build_tiny_pipeline,
    build_word_tokenizer,
    denoiser_of,
    family_of_pipeline,
    generate_images,
    load_pipeline,
    sample_seeds,
    set_denoiser,
    text_encoders_of,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TINY = {
    "sd": "tiny_sd15", "sdxl": "tiny_sdxl", "dit": "tiny_dit", "pixart": "tiny_pixart", "sd3": "tiny_sd3",
    "flux": "tiny_flux",
}
REAL = {
    "sd15": "sd", "sdxl": "sdxl", "sdxl_turbo": "sdxl", "pixart_sigma": "pixart", "dit_xl2": "dit",
    "sd3_medium": "sd3", "flux_dev": "flux", "flux_schnell": "flux",
}
REAL_OF_FAMILY = {
    "sd": "sd15", "sdxl": "sdxl", "dit": "dit_xl2", "pixart": "pixart_sigma", "sd3": "sd3_medium", "flux": "flux_dev",
}


def model_cfg(name: str, **changes):
    """conf/model/<name>.yaml validated against the ModelConfig schema, with changes merged in."""
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / f"{name}.yaml"), changes)


def prompts_for(family: str) -> list[str]:
    return ["cat", "dog", "goldfish"] if family == "dit" else ["a red cat", "two blue squares", "a photo of a tree"]


def generate(pipe, cfg, n: int = 3, batch_size: int = 3) -> torch.Tensor:
    return generate_images(
        pipe, cfg.family, prompts_for(cfg.family)[:n], sample_seeds(7, n), steps=cfg.steps,
        guidance=cfg.guidance, resolution=cfg.resolution, batch_size=batch_size,
        call_kwargs=OmegaConf.to_container(cfg.call_kwargs), progress=False,
    )


@pytest.fixture(scope="module")
def tiny_pipes():
    """One tiny pipeline per family, loaded through the tiny configs."""
    return {family: load_pipeline(model_cfg(name)) for family, name in TINY.items()}


# ---- configs ---------------------------------------------------------------------------------

def test_every_model_yaml_matches_schema():
    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} >= set(TINY.values()) | set(REAL)
    for f in files:
        cfg = model_cfg(f.stem)
        assert cfg.name == f.stem
        assert cfg.family in FAMILIES
        assert cfg.source == ("tiny" if f.stem.startswith("tiny_") else "pretrained")


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_config_uses_the_pipeline_class_of_its_tiny_twin(name, tiny_pipes):
    cfg = model_cfg(name)
    assert cfg.family == REAL[name]
    assert cfg.pretrained and cfg.dtype in ("float16", "bfloat16")
    assert type(tiny_pipes[cfg.family]).__name__ == cfg.pipeline_class == PIPELINE_CLASSES[cfg.family]


# ---- tiny pipelines ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_parts(family, tiny_pipes):
    pipe = tiny_pipes[family]
    name, denoiser = denoiser_of(pipe)
    assert name == ("unet" if family in ("sd", "sdxl") else "transformer")
    assert family_of_pipeline(pipe) == family
    assert sum(p.numel() for p in denoiser.parameters()) < 2_000_000
    modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert all(not m.training for c in modules for m in c.modules())
    assert all(p.dtype == torch.float32 for c in modules for p in c.parameters())
    expected_encoders = {"sd": 1, "sdxl": 2, "dit": 0, "pixart": 1, "sd3": 3, "flux": 2}[family]
    assert len(text_encoders_of(pipe)) == expected_encoders


def test_tiny_build_is_deterministic_from_seed():
    a, b, c = (build_tiny_pipeline("flux", seed=s).transformer.state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_overrides_change_sizes_and_keep_parts_consistent():
    flux = build_tiny_pipeline("flux", num_layers=2, num_single_layers=1)
    assert len(flux.transformer.transformer_blocks) == 2 and len(flux.transformer.single_transformer_blocks) == 1
    sdxl = build_tiny_pipeline("sdxl", cross_attention_dim=32, vae={"layers_per_block": 2})
    assert sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size == 32
    images = generate_images(sdxl, "sdxl", ["a cat"], [0], steps=2, guidance=5.0, resolution=32, progress=False)
    assert images.shape == (1, 3, 32, 32)


def test_tiny_errors_name_the_fix():
    with pytest.raises(ConfigError, match="sd, sdxl, dit, pixart, sd3, flux"):
        build_tiny_pipeline("sd4")
    with pytest.raises(ConfigError, match="num_blocks.*use vae, text_encoder, t5, words"):
        build_tiny_pipeline("flux", num_blocks=3)
    with pytest.raises(ConfigError, match="UNet2DConditionModel cannot be built.*model.tiny"):
        build_tiny_pipeline("sd", block_out_channels=(32, 64, 64))
    with pytest.raises(ConfigError, match="AutoencoderKL cannot be built.*model.tiny"):
        build_tiny_pipeline("sd", vae={"latent_size": 3})


# ---- loading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_saved_tiny_loads_through_from_pretrained(family, tiny_pipes, tmp_path):
    """The real from_pretrained path (with the real model's pipeline class) rebuilds the same classes."""
    tiny_cfg = model_cfg(TINY[family])
    pipe = tiny_pipes[family]
    pipe.save_pretrained(tmp_path)
    real = model_cfg(REAL_OF_FAMILY[family])
    loaded = load_pipeline(model_cfg(
        TINY[family], source="pretrained", pretrained=str(tmp_path), pipeline_class=real.pipeline_class
    ))
    assert type(loaded) is type(pipe)
    assert {k: type(v) for k, v in loaded.components.items()} == {k: type(v) for k, v in pipe.components.items()}
    assert all(not m.training for m in loaded.components.values() if isinstance(m, torch.nn.Module))
    torch.testing.assert_close(generate(loaded, tiny_cfg, n=2), generate(pipe, tiny_cfg, n=2), atol=1e-6, rtol=0)


def test_missing_local_folder_is_a_checkpoint_error(tmp_path):
    missing = tmp_path / "no_such_model"
    for path in (str(missing), "./no/such/model", "~/no-such-diffq-model"):
        with pytest.raises(CheckpointError, match=re.escape(path) + " does not exist.*hf download"):
            load_pipeline(model_cfg("sd15", pretrained=path))


def test_folder_without_model_index_or_a_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no model_index.json"):
        load_pipeline(model_cfg("sd15", pretrained=str(tmp_path)))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file"):
        load_pipeline(model_cfg("sd15", pretrained=str(weights)))


def test_folder_of_another_family_or_with_missing_weights_is_a_checkpoint_error(tiny_pipes, tmp_path):
    tiny_pipes["dit"].save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds a DiTPipeline .dit. but the config asks for PixArtSigmaPipeline"):
        load_pipeline(model_cfg("pixart_sigma", pretrained=str(tmp_path)))
    for weights in (tmp_path / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match="cannot load DiTPipeline from .*names DiTPipeline"):
        load_pipeline(model_cfg("dit_xl2", pretrained=str(tmp_path), variant=None))


def test_uncached_hub_id_offline_is_a_checkpoint_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="diffq-tests/no-such-model.*hf download"):
        load_pipeline(model_cfg("sd15", pretrained="diffq-tests/no-such-model"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"family": "sd4"}, "unknown model.family 'sd4'"),
    ({"pipeline_class": "StableDiffusion9Pipeline"}, "unknown model.pipeline_class"),
    ({"pipeline_class": "FluxPipeline"}, "does not match family 'sd'.*StableDiffusionPipeline"),
    ({"source": "civitai"}, "unknown model.source"),
    ({"dtype": "float8"}, "unknown model.dtype"),
    ({"source": "pretrained", "pretrained": None}, "no model.pretrained"),
])
def test_bad_model_configs_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(model_cfg("tiny_sd15", **changes))


def test_set_denoiser_swaps_the_module(tiny_pipes):
    pipe = build_tiny_pipeline("dit")
    other = tiny_pipes["dit"].transformer
    set_denoiser(pipe, other)
    assert denoiser_of(pipe) == ("transformer", other)


# ---- generation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_generation_does_not_depend_on_batching(family, tiny_pipes):
    cfg = model_cfg(TINY[family])
    together = generate(tiny_pipes[family], cfg, batch_size=3)
    alone = generate(tiny_pipes[family], cfg, batch_size=1)
    assert together.shape == (3, 3, 32, 32) and together.dtype == torch.float32
    assert 0 <= together.min() and together.max() <= 1
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert not torch.equal(together[0], together[1])  # different seeds, different images


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_works_without_call_kwargs(family, tiny_pipes):
    """Pipeline defaults (e.g. PixArt's max_sequence_length 300 and aspect-ratio binning) are handled."""
    images = generate_images(tiny_pipes[family], family, prompts_for(family)[:1], [0], steps=2, guidance=4.0,
                             resolution=32, progress=False)
    assert images.shape == (1, 3, 32, 32)


def test_generation_input_errors(tiny_pipes):
    with pytest.raises(ConfigError, match="unknown DiT class label.*'zebra'.*balloon, banana, cat"):
        generate_images(tiny_pipes["dit"], "dit", ["cat", "zebra"], [0, 1], steps=2, guidance=4.0, resolution=32)
    with pytest.raises(ConfigError, match="native resolution 32"):
        generate_images(tiny_pipes["dit"], "dit", ["cat"], [0], steps=2, guidance=4.0, resolution=64)
    with pytest.raises(ConfigError, match="2 prompts but 1 seeds"):
        generate_images(tiny_pipes["sd"], "sd", ["a", "b"], [0], steps=2, guidance=4.0, resolution=32)
    with pytest.raises(ConfigError, match="diffq sets itself"):
        generate_images(tiny_pipes["sd"], "sd", ["a"], [0], steps=2, guidance=4.0, resolution=32,
                        call_kwargs={"num_inference_steps": 3})


def test_sample_seeds_are_stable_and_distinct():
    seeds = sample_seeds(0, 1000)
    assert seeds == sample_seeds(0, 1000) and len(set(seeds)) == 1000
    assert sample_seeds(0, 3) == seeds[:3]  # a prefix does not depend on n
    assert sample_seeds(1, 3) != seeds[:3]
    assert seeds[:2] == [1054945697, 2544276186]  # same in every process (no Python hash salt)
    assert all(0 <= s < 2**32 for s in seeds)


# ---- tokenizers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["clip", "t5"])
def test_word_tokenizer_pads_truncates_decodes_and_round_trips(style, tmp_path):
    tok = build_word_tokenizer(["Red", "cat", "a photo of", "square"], max_length=8, style=style)
    assert isinstance(tok, PreTrainedTokenizerFast)
    out = tok(["A RED cat, zebra", "a photo of " * 9], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt")
    ids = out.input_ids
    assert ids.shape == (2, 8)
    assert ids[0, -1] == tok.pad_token_id and (ids[1] == tok.eos_token_id).sum() == 1
    if style == "clip":
        assert (ids[:, 0] == tok.bos_token_id).all() and ids[1, -1] == tok.eos_token_id
    assert tok.unk_token_id in ids[0].tolist()  # "," and "zebra" are not in the vocabulary
    assert tok.batch_decode(ids, skip_special_tokens=True)[0] == "a red cat"
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again.model_max_length == 8 and again("a red square").input_ids == tok("a red square").input_ids


def test_word_tokenizer_errors():
    with pytest.raises(ConfigError, match="style 'bpe'"):
        build_word_tokenizer(["a"], 8, "bpe")
    with pytest.raises(ConfigError, match="max_length 2"):
        build_word_tokenizer(["a"], 2, "clip")
