"""Layer roles of the six denoiser families (tiny and full-size on the meta device) and text encoders."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import (
    DiTTransformer2DModel,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    Transformer2DModel,
    UNet2DConditionModel,
)
from torch import nn

from diffq.errors import ConfigError
from diffq.models import FAMILIES, build_tiny_pipeline, denoiser_of, text_encoders_of
from diffq.roles import ROLES, assign_roles, detect_family


@pytest.fixture(scope="module")
def tiny_pipes():
    return {family: build_tiny_pipeline(family) for family in FAMILIES}


def others(roles: dict[str, str]) -> list[str]:
    return [name for name, role in roles.items() if role == "other"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_denoiser_layer_has_a_role(family, tiny_pipes):
    _, denoiser = denoiser_of(tiny_pipes[family])
    assert detect_family(denoiser) == family
    roles = assign_roles(denoiser)
    quantizable = [n for n, m in denoiser.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert list(roles) == quantizable
    assert not others(roles), f"{family} layers without a role: {others(roles)}"
    assert set(roles.values()) <= set(ROLES)


EXPECTED = {
    "sd": {
        "conv_in": "conv_in",
        "conv_out": "conv_out",
        "time_embedding.linear_1": "time_embed",
        "down_blocks.0.resnets.0.time_emb_proj": "time_proj",
        "down_blocks.0.resnets.0.conv1": "resnet_conv",
        "down_blocks.1.resnets.0.conv_shortcut": "resnet_shortcut",
        "down_blocks.0.downsamplers.0.conv": "downsample",
        "down_blocks.1.attentions.0.proj_in": "transformer_proj",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "attn_qkv",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": "attn_out",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q": "cross_attn_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "cross_attn_kv",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0": "attn_out",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": "ffn_up",
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "ffn_down",
        "mid_block.attentions.0.proj_out": "transformer_proj",
        "up_blocks.0.upsamplers.0.conv": "upsample",
    },
    "sdxl": {
        "add_embedding.linear_1": "time_embed",
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v": "cross_attn_kv",
        "up_blocks.1.resnets.0.time_emb_proj": "time_proj",
    },
    "dit": {
        "pos_embed.proj": "conv_in",
        "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": "time_embed",
        "transformer_blocks.0.norm1.linear": "adanorm",
        "transformer_blocks.1.attn1.to_k": "attn_qkv",
        "transformer_blocks.1.ff.net.2": "ffn_down",
        "proj_out_1": "adanorm",
        "proj_out_2": "conv_out",
    },
    "pixart": {
        "pos_embed.proj": "conv_in",
        "adaln_single.emb.timestep_embedder.linear_2": "time_embed",
        "adaln_single.linear": "adanorm",
        "caption_projection.linear_1": "text_proj",
        "transformer_blocks.0.attn1.to_v": "attn_qkv",
        "transformer_blocks.0.attn2.to_q": "cross_attn_q",
        "transformer_blocks.0.attn2.to_k": "cross_attn_kv",
        "transformer_blocks.0.ff.net.0.proj": "ffn_up",
        "proj_out": "conv_out",
    },
    "sd3": {
        "pos_embed.proj": "conv_in",
        "time_text_embed.text_embedder.linear_1": "time_embed",
        "context_embedder": "text_proj",
        "transformer_blocks.0.norm1.linear": "adanorm",
        "transformer_blocks.0.norm1_context.linear": "adanorm",
        "transformer_blocks.0.attn.add_k_proj": "attn_qkv",
        "transformer_blocks.0.attn.to_add_out": "attn_out",
        "transformer_blocks.0.ff_context.net.2": "ffn_down",
        "norm_out.linear": "adanorm",
        "proj_out": "conv_out",
    },
    "flux": {
        "x_embedder": "conv_in",
        "time_text_embed.guidance_embedder.linear_1": "time_embed",
        "context_embedder": "text_proj",
        "transformer_blocks.0.norm1.linear": "adanorm",
        "transformer_blocks.0.attn.add_q_proj": "attn_qkv",
        "transformer_blocks.0.attn.to_out.0": "attn_out",
        "single_transformer_blocks.0.norm.linear": "adanorm",
        "single_transformer_blocks.0.attn.to_q": "attn_qkv",
        "single_transformer_blocks.0.proj_mlp": "ffn_up",
        "single_transformer_blocks.0.proj_out": "ffn_down",
        "proj_out": "conv_out",
    },
}


@pytest.mark.parametrize("family", FAMILIES)
def test_named_layers_get_the_expected_roles(family, tiny_pipes):
    roles = assign_roles(denoiser_of(tiny_pipes[family])[1])
    assert {name: roles.get(name) for name in EXPECTED[family]} == EXPECTED[family]


@pytest.mark.parametrize("family", ["sd", "sdxl", "pixart", "sd3", "flux"])
def test_text_encoders_are_all_text_encoder(family, tiny_pipes):
    for encoder in text_encoders_of(tiny_pipes[family]).values():
        assert detect_family(encoder) == "text_encoder"
        roles = assign_roles(encoder)
        assert roles and set(roles.values()) == {"text_encoder"}


def test_unknown_architecture_warns_and_gets_generic_roles():
    class Mystery(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_in = nn.Conv2d(3, 8, 3)
            self.block = nn.ModuleDict({"to_q": nn.Linear(8, 8), "fc2": nn.Linear(8, 8), "gizmo": nn.Linear(8, 8)})

    with pytest.warns(UserWarning, match="no role map for Mystery; using generic roles"):
        roles = assign_roles(Mystery())
    assert roles == {"conv_in": "conv_in", "block.to_q": "attn_qkv", "block.fc2": "ffn_down", "block.gizmo": "other"}


def test_unknown_family_name_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown role family 'sd4'"):
        assign_roles(nn.Linear(2, 2), family="sd4")


# Published configs of the full-size denoisers (key fields), built without weights on the meta device.
UNET_SD15 = {
    "sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
UNET_SDXL = {
    "sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
FLUX1 = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
SD35_MEDIUM = {
    **SD3_MEDIUM, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
PIXART_SIGMA = {
    "sample_size": 128, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "num_attention_heads": 16, "attention_head_dim": 72, "cross_attention_dim": 1152, "caption_channels": 4096,
    "norm_type": "ada_norm_single", "use_additional_conditions": False, "interpolation_scale": 2,
}
DIT_XL2 = {
    "sample_size": 32, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "num_attention_heads": 16, "attention_head_dim": 72, "num_embeds_ada_norm": 1000,
}
FULL_SIZE = [
    ("sd15", UNet2DConditionModel, UNET_SD15, "sd", 282),
    ("sdxl", UNet2DConditionModel, UNET_SDXL, "sdxl", 794),
    ("flux1", FluxTransformer2DModel, FLUX1, "flux", 504),
    ("sd3_medium", SD3Transformer2DModel, SD3_MEDIUM, "sd3", 341),
    ("sd35_medium", SD3Transformer2DModel, SD35_MEDIUM, "sd3", 393),
    ("pixart_sigma", PixArtTransformer2DModel, PIXART_SIGMA, "pixart", 287),
    ("pixart_alpha", PixArtTransformer2DModel, {**PIXART_SIGMA, "use_additional_conditions": True}, "pixart", 291),
    ("dit_xl2", DiTTransformer2DModel, DIT_XL2, "dit", 255),
    ("dit_xl2_legacy", Transformer2DModel, {**DIT_XL2, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False},
     "dit", 255),
]


@pytest.mark.parametrize(("name", "cls", "config", "family", "n_layers"), FULL_SIZE, ids=[f[0] for f in FULL_SIZE])
def test_full_size_architectures_have_no_unassigned_layers(name, cls, config, family, n_layers):
    with torch.device("meta"):
        model = cls(**config)
    assert detect_family(model) == family
    roles = assign_roles(model)
    assert len(roles) == n_layers
    assert not others(roles), f"{name} layers without a role: {others(roles)}"
