"""Tiny random-weight pipelines of the six architecture families, built offline in memory.

Each pipeline uses the real diffusers/transformers classes of its family with test-sized
configs (like diffusers' own test dummies), so every real code path runs in a few seconds on
CPU. Sample resolution 32 works for all of them (a two-block VAE downsamples by 2).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from diffq.errors import ConfigError
from diffq.models.tokenizers import DEFAULT_WORDS, build_word_tokenizer

__all__ = ["FAMILIES", "PIPELINE_CLASSES", "DIT_TINY_LABELS", "build_tiny_pipeline"]

PIPELINE_CLASSES: dict[str, str] = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "dit": "DiTPipeline",
    "pixart": "PixArtSigmaPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
FAMILIES: tuple[str, ...] = tuple(PIPELINE_CLASSES)

# A few ImageNet ids with short names; DiTPipeline hard-codes 1000 as the null class, so the
# tiny DiT keeps the 1000-class label table and names only these.
DIT_TINY_LABELS: dict[int, str] = {
    1: "goldfish",
    207: "dog, golden retriever",
    281: "cat, tabby cat",
    417: "balloon",
    954: "banana",
    980: "volcano",
}

_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 512  # like the real T5 tokenizers; pipelines pass max_sequence_length
_COMPONENT_KEYS = ("vae", "text_encoder", "t5", "words", "bos_outlier")


class _Factory:
    """Builds the components of one tiny pipeline: seeded, eval mode, float32."""

    def __init__(self, family: str, seed: int, overrides: Mapping[str, Any]) -> None:
        self.family = family
        self.seed = seed
        self.count = 0
        self.overrides = dict(overrides)
        words = self.overrides.get("words") or DEFAULT_WORDS
        self.clip_tokenizer = build_word_tokenizer(words, _CLIP_MAX_LENGTH, "clip")
        self.t5_tokenizer = build_word_tokenizer(words, _T5_MAX_LENGTH, "t5")

    def seeded(self, cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
        """``cls(*args, **kwargs)`` in eval mode, built right after seeding torch with the next
        component seed; a size override that does not fit becomes a ConfigError."""
        torch.manual_seed(self.seed + self.count)
        self.count += 1
        try:
            return cls(*args, **kwargs).eval()
        except (ValueError, TypeError, AssertionError, RuntimeError) as err:
            raise ConfigError(
                f"tiny {self.family} {cls.__name__} cannot be built: {err}; fix the model.tiny overrides"
            ) from err

    def denoiser(self, cls: type[nn.Module], defaults: dict[str, Any]) -> nn.Module:
        """The denoiser from ``defaults`` updated with the user's size overrides."""
        return self.seeded(cls, **{**defaults, **self.denoiser_overrides(cls)})

    def denoiser_overrides(self, cls: type) -> dict[str, Any]:
        """Overrides that are not component keys; each must be an argument of ``cls``."""
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        extra = {k: v for k, v in self.overrides.items() if k not in _COMPONENT_KEYS}
        unknown = sorted(set(extra) - accepted)
        if unknown:
            raise ConfigError(
                f"unknown model.tiny key(s) {unknown} for family {self.family!r}: use "
                f"{', '.join(_COMPONENT_KEYS)} or {cls.__name__} arguments ({', '.join(sorted(accepted))})"
            )
        return extra

    def clip(self, hidden: int, projection: int | None = None) -> nn.Module:
        """A CLIP text encoder; with ``projection`` a CLIPTextModelWithProjection."""
        tok = self.clip_tokenizer
        config = CLIPTextConfig(**{
            "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 37,
            "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": projection or hidden,
            "max_position_embeddings": tok.model_max_length, "hidden_act": "gelu",
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, **self.overrides.get("text_encoder", {}),
        })
        encoder = self.seeded(CLIPTextModelWithProjection if projection else CLIPTextModel, config)
        if self.overrides.get("bos_outlier"):
            add_bos_outlier(encoder, float(self.overrides["bos_outlier"]))
        return encoder

    def t5(self, d_model: int) -> nn.Module:
        """A T5 encoder with ``d_model`` features."""
        tok = self.t5_tokenizer
        config = T5Config(**{
            "vocab_size": len(tok), "d_model": d_model, "d_ff": 37, "d_kv": 8, "num_layers": 2,
            "num_heads": 4, "relative_attention_num_buckets": 8, "dropout_rate": 0.0,
            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "decoder_start_token_id": tok.pad_token_id, **self.overrides.get("t5", {}),
        })
        return self.seeded(T5EncoderModel, config)

    def vae(self, scaling_factor: float, shift_factor: float | None = None) -> nn.Module:
        """A two-block AutoencoderKL (downsamples by 2, 4 latent channels)."""
        flow = shift_factor is not None
        return self.seeded(AutoencoderKL, **{
            "block_out_channels": (16, 32), "in_channels": 3, "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
            "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32,
            "scaling_factor": scaling_factor, "shift_factor": shift_factor,
            "use_quant_conv": not flow, "use_post_quant_conv": not flow,
            **self.overrides.get("vae", {}),
        })


def add_bos_outlier(encoder: nn.Module, scale: float) -> None:
    """Scale position 0 of a CLIP encoder's last hidden state by ``scale``: the BOS token's massive
    activation of real CLIP text encoders (~823 against 10-15 for the other tokens in SD's), which a
    random tiny CLIP lacks (the ``model.tiny.bos_outlier`` key)."""

    def hook(module: nn.Module, args: tuple, out: Any) -> Any:
        out.last_hidden_state[:, 0] *= scale
        return out

    encoder.register_forward_hook(hook)


def _unet_defaults() -> dict[str, Any]:
    return {
        "block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 16,
        "in_channels": 4, "out_channels": 4, "norm_num_groups": 32,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32, "attention_head_dim": 8,
    }


def _build_sd(f: _Factory) -> DiffusionPipeline:
    unet = f.denoiser(UNet2DConditionModel, _unet_defaults())
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return diffusers.StableDiffusionPipeline(
        vae=f.vae(0.18215), text_encoder=f.clip(unet.config.cross_attention_dim), tokenizer=f.clip_tokenizer,
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(f: _Factory) -> DiffusionPipeline:
    defaults = {
        **_unet_defaults(), "cross_attention_dim": 64, "attention_head_dim": (2, 4),
        "transformer_layers_per_block": (1, 2), "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    }
    den = {**defaults, **f.denoiser_overrides(UNet2DConditionModel)}
    hidden = den["cross_attention_dim"] // 2  # the two encoders' hidden states are concatenated
    # add_embedding input: pooled text (text_encoder_2 projection) + 6 time ids
    defaults["projection_class_embeddings_input_dim"] = hidden + 6 * den["addition_time_embed_dim"]
    unet = f.denoiser(UNet2DConditionModel, defaults)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    return diffusers.StableDiffusionXLPipeline(
        vae=f.vae(0.13025), text_encoder=f.clip(hidden), text_encoder_2=f.clip(hidden, projection=hidden),
        tokenizer=f.clip_tokenizer, tokenizer_2=f.clip_tokenizer, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def _build_dit(f: _Factory) -> DiffusionPipeline:
    transformer = f.denoiser(DiTTransformer2DModel, {
        "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "num_attention_heads": 2, "attention_head_dim": 8, "num_embeds_ada_norm": 1000,
    })
    pipe = diffusers.DiTPipeline(
        transformer=transformer, vae=f.vae(0.18215), scheduler=DDIMScheduler(clip_sample=False),
        id2label=DIT_TINY_LABELS,
    )
    pipe.register_to_config(id2label=DIT_TINY_LABELS)  # saved in model_index.json like the hub's
    return pipe


def _build_pixart(f: _Factory) -> DiffusionPipeline:
    den = f.denoiser_overrides(PixArtTransformer2DModel)
    inner = den.get("num_attention_heads", 4) * den.get("attention_head_dim", 8)
    transformer = f.denoiser(PixArtTransformer2DModel, {
        "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "num_attention_heads": 4, "attention_head_dim": 8, "cross_attention_dim": inner,
        "caption_channels": 32, "use_additional_conditions": False,
    })
    return diffusers.PixArtSigmaPipeline(
        tokenizer=f.t5_tokenizer, text_encoder=f.t5(transformer.config.caption_channels),
        vae=f.vae(0.13025), transformer=transformer, scheduler=DPMSolverMultistepScheduler(),
    )


def _build_sd3(f: _Factory) -> DiffusionPipeline:
    transformer = f.denoiser(SD3Transformer2DModel, {
        "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
        "num_attention_heads": 4, "attention_head_dim": 8, "joint_attention_dim": 32,
        "caption_projection_dim": 32, "pooled_projection_dim": 32, "pos_embed_max_size": 16,
    })
    joint = transformer.config.joint_attention_dim
    pooled = transformer.config.pooled_projection_dim
    # the two CLIP hidden states are concatenated and padded to the T5 width: split them evenly
    clips = [f.clip(joint // 2, projection=pooled // 2) for _ in range(2)]
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=f.vae(1.5305, 0.0609), text_encoder=clips[0], tokenizer=f.clip_tokenizer,
        text_encoder_2=clips[1], tokenizer_2=f.clip_tokenizer, text_encoder_3=f.t5(joint),
        tokenizer_3=f.t5_tokenizer,
    )


def _build_flux(f: _Factory) -> DiffusionPipeline:
    transformer = f.denoiser(FluxTransformer2DModel, {
        "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
        "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 4, 8),
    })
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return diffusers.FluxPipeline(
        scheduler=scheduler, vae=f.vae(0.3611, 0.1159),
        text_encoder=f.clip(transformer.config.pooled_projection_dim), tokenizer=f.clip_tokenizer,
        text_encoder_2=f.t5(transformer.config.joint_attention_dim), tokenizer_2=f.t5_tokenizer,
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[_Factory], DiffusionPipeline]] = {
    "sd": _build_sd, "sdxl": _build_sdxl, "dit": _build_dit,
    "pixart": _build_pixart, "sd3": _build_sd3, "flux": _build_flux,
}


def build_tiny_pipeline(family: str, seed: int = 0, **overrides: Any) -> DiffusionPipeline:
    """A random-weight tiny pipeline of ``family``, deterministic from ``seed``.

    ``overrides`` update the denoiser's config (e.g. ``block_out_channels``, ``num_layers``);
    the keys ``vae``, ``text_encoder`` (CLIP), ``t5`` take dicts for those configs,
    ``words`` replaces the tokenizers' vocabulary and ``bos_outlier`` scales the CLIP encoders'
    first position (:func:`add_bos_outlier`).
    """
    if family not in _BUILDERS:
        raise ConfigError(f"unknown model family {family!r}: use one of {', '.join(FAMILIES)}")
    pipe = _BUILDERS[family](_Factory(family, seed, overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe
