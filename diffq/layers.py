"""Quantized layers: QuantLinear / QuantConv2d and attention-matmul quantizers.

Layers are converted *in place*: the module object keeps its identity, name, parameters and
hooks; its class is swapped for a quantized subclass of its own class and quantizers become
named submodules (``...to_q.weight_quantizer``, ``...to_q.input_quantizer``), as in ModelOpt.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffq.quantizer import Quantizer
from diffq.spec import LayerSpec, TensorQuant


class QuantMixin:
    """Behaviour shared by quantized Linear and Conv2d layers."""

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    def _init_quant(self, weight_q: Quantizer | None, input_q: Quantizer | None) -> None:
        self.weight_quantizer = weight_q
        self.input_quantizer = input_q
        self.register_buffer("weight_fq", None, persistent=False)
        self.rounding: nn.Module | None = None  # learned rounding being trained (reconstruction)
        self.quant_enabled = True  # False: compute in floating point (FP targets during reconstruction)
        self.learned_rounding = False  # weight_fq holds a learned rounding: export it, not RTN of weight

    @property
    def frozen(self) -> bool:
        """True once the fake-quantized weight is cached."""
        return self.weight_fq is not None

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with (frozen cache, live fake-quant, or FP)."""
        if self.rounding is not None:
            return self.rounding(self.weight)
        if self.weight_fq is not None:
            return self.weight_fq
        if self.weight_quantizer is not None:
            return self.weight_quantizer(self.weight)
        return self.weight

    @torch.no_grad()
    def freeze(self, keep_original: bool = True) -> None:
        """Fake-quantize the weight once; later forwards reuse it at no extra cost.

        With ``keep_original=False`` the FP weight is overwritten (halves memory), so the
        layer cannot be re-quantized afterwards.
        """
        if self.weight_quantizer is None:
            return
        wq = self.weight_quantizer(self.weight).detach()
        if keep_original:
            self.weight_fq = wq
        else:
            self.weight.data.copy_(wq)
            self.weight_fq = self.weight.data

    def unfreeze(self) -> None:
        """Drop the cached weight so the weight quantizer runs (and trains) again."""
        self.weight_fq = None

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.quant_enabled:
            return x, self.weight
        return self._quant_input(x), self.quantized_weight()


class QuantLinearMixin(QuantMixin):
    """Forward of a quantized nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.linear(*self._operands(x), self.bias)


class QuantConv2dMixin(QuantMixin):
    """Forward of a quantized nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._conv_forward(*self._operands(x), self.bias)


@functools.lru_cache(maxsize=None)
def _quant_class(cls: type) -> type:
    mixin = QuantLinearMixin if issubclass(cls, nn.Linear) else QuantConv2dMixin
    return type(f"Quant{cls.__name__}", (mixin, cls), {"_diffq_base": cls})


QuantLinear = _quant_class(nn.Linear)
QuantConv2d = _quant_class(nn.Conv2d)


def is_quant_layer(module: nn.Module) -> bool:
    """Whether ``module`` was converted by :func:`quantize_layer_`."""
    return isinstance(module, QuantMixin)


def quantize_layer_(module: nn.Module, weight_q: Quantizer | None, input_q: Quantizer | None) -> nn.Module:
    """Convert an nn.Linear / nn.Conv2d in place into its quantized subclass."""
    if is_quant_layer(module):
        raise ValueError(f"{type(module).__name__} is already quantized")
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"cannot quantize {type(module).__name__}: only nn.Linear and nn.Conv2d")
    module.__class__ = _quant_class(type(module))
    module._init_quant(weight_q, input_q)
    return module


def dequantize_layer_(module: nn.Module) -> nn.Module:
    """Undo :func:`quantize_layer_` (the FP weight must have been kept)."""
    if not is_quant_layer(module):
        return module
    for attr in ("weight_quantizer", "input_quantizer"):
        if attr in module._modules:
            del module._modules[attr]
        module.__dict__.pop(attr, None)
    module._buffers.pop("weight_fq", None)
    module.__class__ = module._diffq_base
    return module


def attach_quantizers(model: nn.Module, specs: Sequence[LayerSpec]) -> dict[str, nn.Module]:
    """Convert every layer of ``specs`` that is quantized; returns name -> layer."""
    modules = dict(model.named_modules())
    converted = {}
    for s in specs:
        if not s.quantized:
            continue
        module = modules[s.name]
        feature_axis = -1 if s.kind == "linear" else 1
        wq = None if s.weight is None else s.weight.build_quantizer("weight", name=f"{s.name}.weight")
        aq = None if s.act is None else s.act.build_quantizer("act", feature_axis, name=f"{s.name}.input")
        converted[s.name] = quantize_layer_(module, wq, aq)
    return converted


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """All Quantizer submodules of ``model`` with their names."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


# --------------------------------------------------------------------------- attention


def _quantized_sdpa(attn: nn.Module, sdpa: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An SDPA with q/k/v (and optionally the softmax output) fake-quantized."""

    def run(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v = query, key, value
        if attn.q_quantizer is not None:
            q, k, v = attn.q_quantizer(q), attn.k_quantizer(k), attn.v_quantizer(v)
        smq = attn.softmax_quantizer
        if smq is None:
            return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        if k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        probs = smq(scores.softmax(dim=-1))
        if dropout_p:
            probs = F.dropout(probs, dropout_p)
        return probs @ v

    return run


@contextlib.contextmanager
def _patched_sdpa(attn: nn.Module) -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _quantized_sdpa(attn, original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class QuantAttnProcessor:
    """Wraps a diffusers attention processor; its SDPA call sees quantized q, k, v, softmax."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, item: str) -> Any:
        return getattr(self.inner, item)


@functools.lru_cache(maxsize=None)
def _processor_class(inner_cls: type) -> type:
    @functools.wraps(inner_cls.__call__)
    def __call__(self, attn, *args, **kwargs):
        with _patched_sdpa(attn):
            return self.inner(attn, *args, **kwargs)

    return type(f"Quant{inner_cls.__name__}", (QuantAttnProcessor,), {"__call__": __call__})


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Diffusers attention modules (anything with a ``processor`` and ``set_processor``)."""
    return {
        name: m
        for name, m in model.named_modules()
        if hasattr(m, "set_processor") and hasattr(m, "processor") and not isinstance(m, QuantAttnProcessor)
    }


def attach_attention_quantizers(model: nn.Module, qkv: TensorQuant, softmax: TensorQuant | None) -> list[str]:
    """Quantize the matmul inputs of every attention module; returns their names."""
    names = []
    for name, attn in attention_modules(model).items():
        for which in ("q", "k", "v"):
            setattr(attn, f"{which}_quantizer", qkv.build_quantizer("act", -1, name=f"{name}.{which}"))
        attn.softmax_quantizer = None if softmax is None else softmax.build_quantizer("act", -1, name=f"{name}.softmax")
        inner = attn.processor
        attn.processor = _processor_class(type(inner))(inner)
        names.append(name)
    return names


def layer_table(model: nn.Module) -> Mapping[str, nn.Module]:
    """Quantized layers of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if is_quant_layer(m)}
