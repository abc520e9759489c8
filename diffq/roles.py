"""Layer roles: what each quantizable module of a denoiser or text encoder does.

Roles let one bit-config rule cover UNets and DiTs alike ("keep conv_in/conv_out in 8 bit").
Each architecture family has an ordered table of (glob on the module name, role); the first
match wins, then a shared table of generic suffixes applies. Unknown architectures get the
shared table only, with a warning.
"""
from __future__ import annotations

import fnmatch
import re
import warnings
from functools import cache

from torch import nn

from diffq.errors import ConfigError

__all__ = [
    "ROLES", "QUANTIZABLE_TYPES", "FAMILY_ROLE_TABLES", "SHARED_ROLE_TABLE", "TEXT_ENCODER_CLASSES",
    "detect_family", "assign_roles", "quantizable_layers", "CAUSAL_TEXT_FAMILIES",
]

ROLES: tuple[str, ...] = (
    "conv_in", "conv_out", "time_embed", "time_proj", "text_proj", "adanorm", "attn_qkv", "attn_out",
    "cross_attn_q", "cross_attn_kv", "ffn_up", "ffn_down", "resnet_conv", "resnet_shortcut",
    "downsample", "upsample", "transformer_proj", "text_encoder", "other",
)
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
TEXT_ENCODER_CLASSES: tuple[str, ...] = (
    "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "UMT5EncoderModel",
)

RoleTable = tuple[tuple[str, str], ...]


def _same(role: str, *patterns: str) -> RoleTable:
    return tuple((p, role) for p in patterns)


_UNET: RoleTable = (
    *_same("conv_in", "conv_in"),
    *_same("conv_out", "conv_out"),
    *_same("time_embed", "time_embedding.*", "add_embedding.*", "class_embedding.*"),
    *_same("text_proj", "encoder_hid_proj*"),
    *_same("time_proj", "*.resnets.*.time_emb_proj"),
    *_same("resnet_conv", "*.resnets.*.conv1", "*.resnets.*.conv2"),
    *_same("resnet_shortcut", "*.resnets.*.conv_shortcut"),
    *_same("downsample", "*.downsamplers.*.conv"),
    *_same("upsample", "*.upsamplers.*.conv"),
    *_same("transformer_proj", "*.attentions.*.proj_in", "*.attentions.*.proj_out"),
)

_DIT: RoleTable = (
    *_same("conv_in", "pos_embed.proj"),
    *_same("time_embed", "*.norm1.emb.*"),
    *_same("adanorm", "*.norm1.linear", "proj_out_1"),
    *_same("conv_out", "proj_out_2", "proj_out"),
)

_PIXART: RoleTable = (
    *_same("conv_in", "pos_embed.proj"),
    *_same("time_embed", "adaln_single.emb.*"),
    *_same("adanorm", "adaln_single.linear"),
    *_same("text_proj", "caption_projection.*"),
    *_same("conv_out", "proj_out"),
)

_SD3: RoleTable = (
    *_same("conv_in", "pos_embed.proj"),
    *_same("time_embed", "time_text_embed.*"),
    *_same("text_proj", "context_embedder"),
    *_same("adanorm", "*.norm1.linear", "*.norm1_context.linear", "norm_out.linear"),
    # SD3.5 dual-attention blocks: attn2 is a second self-attention over image tokens
    *_same("attn_qkv", "*.attn2.to_q", "*.attn2.to_k", "*.attn2.to_v"),
    *_same("conv_out", "proj_out"),
)

_FLUX: RoleTable = (
    *_same("conv_in", "x_embedder"),
    *_same("time_embed", "time_text_embed.*"),
    *_same("text_proj", "context_embedder"),
    *_same("adanorm", "*.norm1.linear", "*.norm1_context.linear", "*.norm.linear", "norm_out.linear"),
    *_same("ffn_up", "single_transformer_blocks.*.proj_mlp"),
    *_same("ffn_down", "single_transformer_blocks.*.proj_out"),
    *_same("conv_out", "proj_out"),
)

FAMILY_ROLE_TABLES: dict[str, RoleTable] = {
    "sd": _UNET, "sdxl": _UNET, "dit": _DIT, "pixart": _PIXART, "sd3": _SD3, "flux": _FLUX,
}

SHARED_ROLE_TABLE: RoleTable = (
    *_same("attn_qkv", "*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v"),
    *_same("cross_attn_q", "*.attn2.to_q"),
    *_same("cross_attn_kv", "*.attn2.to_k", "*.attn2.to_v"),
    *_same("attn_qkv", "*.add_q_proj", "*.add_k_proj", "*.add_v_proj", "*.to_q", "*.to_k", "*.to_v",
           "*.to_qkv", "*.q_proj", "*.k_proj", "*.v_proj", "*.qkv"),
    *_same("attn_out", "*.to_out.0", "*.to_add_out", "*.out_proj", "*.o_proj"),
    *_same("ffn_up", "*.net.0.proj", "*.fc1", "*.up_proj", "*.gate_proj", "*.proj_mlp"),
    *_same("ffn_down", "*.net.2", "*.fc2", "*.down_proj"),
    *_same("time_proj", "*time_emb_proj"),
    *_same("resnet_shortcut", "*conv_shortcut"),
    *_same("resnet_conv", "*resnets.*.conv1", "*resnets.*.conv2"),
    *_same("downsample", "*downsamplers.*.conv"),
    *_same("upsample", "*upsamplers.*.conv"),
    *_same("transformer_proj", "*attentions.*.proj_in", "*attentions.*.proj_out"),
    *_same("adanorm", "*norm*.linear"),
    *_same("time_embed", "time_embedding.*", "time_text_embed.*", "*timestep_embedder.*", "time_embed.*"),
    *_same("text_proj", "context_embedder", "caption_projection.*"),
    *_same("conv_in", "conv_in", "pos_embed.proj", "x_embedder", "patch_embed*"),
    *_same("conv_out", "conv_out", "proj_out"),
)


@cache
def _compiled(family: str | None) -> tuple[tuple[re.Pattern[str], str], ...]:
    table = FAMILY_ROLE_TABLES.get(family, ()) + SHARED_ROLE_TABLE
    return tuple((re.compile(fnmatch.translate(pattern)), role) for pattern, role in table)


# families whose denoiser cross-attends to a causal CLIP text sequence (token 0 = BOS, the same for
# every prompt and a massive activation in real CLIP); SD3 joins CLIP to T5, FLUX's sequence is T5
CAUSAL_TEXT_FAMILIES = ("sd", "sdxl")


def detect_family(model: nn.Module) -> str | None:
    """The role-map family of a denoiser ("sd", "sdxl", "dit", "pixart", "sd3", "flux"),
    "text_encoder" for CLIP/T5 text encoders, or None for an unknown architecture."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name == "UNet2DConditionModel":
        return "sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd"
    if name == "Transformer2DModel":  # legacy class of both DiT and PixArt checkpoints
        return "pixart" if getattr(config, "norm_type", None) == "ada_norm_single" else "dit"
    if name in TEXT_ENCODER_CLASSES:
        return "text_encoder"
    return {
        "DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart",
        "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
    }.get(name)


def assign_roles(model: nn.Module, family: str | None = None) -> dict[str, str]:
    """Map every quantizable module name (nn.Linear, nn.Conv2d) of ``model`` to its role.

    ``family`` defaults to ``detect_family(model)``; an unknown architecture falls back to
    the shared generic table and warns. Layers no pattern covers get "other".
    """
    family = family or detect_family(model)
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE_TYPES)]
    if family == "text_encoder":
        return dict.fromkeys(names, "text_encoder")
    if family is not None and family not in FAMILY_ROLE_TABLES:
        raise ConfigError(
            f"unknown role family {family!r}: use one of {', '.join(FAMILY_ROLE_TABLES)}, "
            "'text_encoder', or None to detect it"
        )
    if family is None:
        warnings.warn(
            f"no role map for {type(model).__name__}; using generic roles — rules by role may "
            "match fewer layers",
            stacklevel=2,
        )
    table = _compiled(family)
    return {name: next((role for rx, role in table if rx.match(name)), "other") for name in names}


def quantizable_layers(model: nn.Module, family: str | None = None) -> dict[str, tuple[str, nn.Module]]:
    """Every quantizable module (nn.Linear, nn.Conv2d) of ``model`` as ``name -> (role, module)``,
    the input :func:`diffq.spec.resolve_spec` takes."""
    roles = assign_roles(model, family)
    modules = dict(model.named_modules())
    return {name: (role, modules[name]) for name, role in roles.items()}
