"""Quantized attention processors: the attention matmuls with fake-quantized q, k, v and softmax output.

Each attention module gets four named quantizers (``<attn>.q_quantizer``, ``.k_quantizer``,
``.v_quantizer``, ``.softmax_quantizer``; any may be None: that operand stays floating point) and a
quantized processor in place of its diffusers one. The quantized processor runs the same
projection / norm / rotary steps as the processor it replaces and computes the attention core
itself (:func:`quantized_attention`). Nothing global is replaced, so other code calling
``scaled_dot_product_attention`` (another thread, another model) is unaffected.

Supported processors: one subclass of :class:`QuantAttnProcessor` per diffusers class, registered
with ``@_replaces``; any other processor class is refused with a ConfigError before anything is
attached.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from diffq.errors import ConfigError
from diffq.tensor_quant import TensorQuant

__all__ = ["QuantAttnProcessor", "attach_attention_quantizers", "attention_modules", "quantized_attention"]

_QUANT_PROCESSORS: dict[type, type[QuantAttnProcessor]] = {}


def quantized_attention(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) @ v`` on ``[batch, heads, tokens, head_dim]`` tensors, with q, k, v
    and the softmax output fake-quantized by ``attn``'s quantizers. ``attn_mask`` is boolean (True =
    attend) or additive; k/v may have fewer heads than q (grouped-query attention). Without a softmax
    quantizer torch's SDPA computes the core from the quantized q, k, v.
    """
    q, k, v = (t if qz is None else qz(t) for qz, t in
               ((attn.q_quantizer, query), (attn.k_quantizer, key), (attn.v_quantizer, value)))
    smq = attn.softmax_quantizer
    if smq is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=k.shape[-3] != q.shape[-3])
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return smq(scores.softmax(dim=-1)) @ v


class QuantAttnProcessor:
    """Base of the quantized processors; ``original`` is the diffusers processor it replaced."""

    def __init__(self, original: Any) -> None:
        self.original = original


def _replaces(original_cls: type) -> Callable[[type[QuantAttnProcessor]], type[QuantAttnProcessor]]:
    def register(cls: type[QuantAttnProcessor]) -> type[QuantAttnProcessor]:
        _QUANT_PROCESSORS[original_cls] = cls
        return cls

    return register


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[batch, tokens, heads * head_dim]`` -> ``[batch, heads, tokens, head_dim]``."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2).to(dtype)


@_replaces(AttnProcessor2_0)
class QuantAttnProcessor2_0(QuantAttnProcessor):
    """``AttnProcessor2_0`` (UNet, DiT, PixArt self- and cross-attention)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch, seq_len, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = (_heads(t, attn.heads) for t in
                             (query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = _merge_heads(quantized_attention(attn, query, key, value, attention_mask), query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@_replaces(JointAttnProcessor2_0)
class QuantJointAttnProcessor2_0(QuantAttnProcessor):
    """``JointAttnProcessor2_0`` (SD3 / SD3.5 joint attention over image and text tokens)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor | tuple:
        n_image = hidden_states.shape[1]
        query, key, value = (_heads(p(hidden_states), attn.heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            cq, ck, cv = (_heads(p(encoder_hidden_states), attn.heads)
                          for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            query, key, value = (torch.cat(pair, dim=2) for pair in zip((query, key, value), (cq, ck, cv)))
        hidden_states = _merge_heads(quantized_attention(attn, query, key, value), query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_image], hidden_states[:, n_image:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


@_replaces(FluxAttnProcessor)
class QuantFluxAttnProcessor(QuantAttnProcessor):
    """``FluxAttnProcessor`` (FLUX double- and single-stream blocks; rotary embeddings)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor | tuple:
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        # diffusers' FLUX layout: [batch, tokens, heads, head_dim]
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if attn.fused_projections:
                cq, ck, cv = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                cq, ck, cv = (p(encoder_hidden_states) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            cq, ck, cv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (cq, ck, cv))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            query, key, value = (torch.cat(pair, dim=1) for pair in zip((cq, ck, cv), (query, key, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attention_mask is not None and attention_mask.ndim == 2:  # [batch, tokens] -> [batch, 1, 1, tokens]
            attention_mask = attention_mask[:, None, None]
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # -> [batch, heads, tokens, head_dim]
        hidden_states = _merge_heads(quantized_attention(attn, query, key, value, attention_mask), query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        n_text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :n_text], hidden_states[:, n_text:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Diffusers attention modules (anything with a ``processor`` and ``set_processor``)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}


def _quant_processor(name: str, processor: Any) -> QuantAttnProcessor:
    if isinstance(processor, QuantAttnProcessor):
        return processor
    cls = _QUANT_PROCESSORS.get(type(processor))
    if cls is None:
        supported = ", ".join(sorted(c.__name__ for c in _QUANT_PROCESSORS))
        raise ConfigError(
            f"attention quantization is not supported for processor {type(processor).__name__} (module {name}); "
            f"supported: {supported}; fix: set quant.attn.enabled=false or use one of the supported processors"
        )
    if getattr(processor, "_parallel_config", None) is not None:
        raise ConfigError(f"attention quantization does not support context parallelism (module {name}); "
                          "fix: set quant.attn.enabled=false or run without a parallel config")
    return cls(processor)


def attach_attention_quantizers(model: nn.Module, qkv: TensorQuant, softmax: TensorQuant | None) -> list[str]:
    """Quantize the matmul inputs of every attention module; returns their names.

    Raises ConfigError (before changing anything) when a module's processor is not supported.
    """
    modules = attention_modules(model)
    processors = {name: _quant_processor(name, attn.processor) for name, attn in modules.items()}
    for name, processor in processors.items():
        attn = modules[name]
        for which in ("q", "k", "v"):
            setattr(attn, f"{which}_quantizer", qkv.build_quantizer("act", -1, name=f"{name}.{which}"))
        attn.softmax_quantizer = None if softmax is None else softmax.build_quantizer("act", -1, name=f"{name}.softmax")
        attn.processor = processor
    return list(processors)
