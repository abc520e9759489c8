"""Quantized layers: QuantLinear / QuantConv2d (attention matmuls: :mod:`diffq.attention`).

Layers are converted *in place*: the module object keeps its identity, name, parameters and
hooks; its class is swapped for a quantized subclass of its own class and quantizers become
named submodules (``...to_q.weight_quantizer``, ``...to_q.input_quantizer``), as in ModelOpt.
"""
from __future__ import annotations

import functools
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffq.quantizer import Quantizer
from diffq.spec import LayerSpec
from diffq.weight_sources import (
    FrozenWeight,
    HeldLearnedRounding,
    PackedCodes,
    RoundingSource,
    TrainedRounding,
    WeightSource,
    live_source,
)


class SideBranch(nn.Module):
    """A low-rank FP branch ``scale * B (A x)`` beside a layer of weight shape ``[out, *fan_in]``
    (1.58-bit FLUX's LoRA kept at inference): ``A [rank, *fan_in]`` (a Conv2d's A is a convolution
    with the layer's kernel, stride, padding and groups), ``B [out, rank]`` (1x1 for a Conv2d).
    Both start at zero (see :func:`diffq.finetune.lora.attach_side`); rank x (fan_in + out) parameters."""

    def __init__(self, weight_shape: Sequence[int], rank: int, scale: float, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        out, *fan_in = weight_shape
        self.scale = float(scale)
        self.A = nn.Parameter(torch.zeros(rank, *fan_in, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(out, rank, *[1] * (len(fan_in) - 1), dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        """The branch's rank."""
        return self.A.shape[0]

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, dtype={str(self.A.dtype).removeprefix('torch.')}"


_SOURCE_VIEWS = frozenset({"weight_fq", "learned_rounding", "rounding", "packed"})


class QuantMixin:
    """Behaviour shared by quantized Linear and Conv2d layers. The weight they compute with comes from
    their :class:`~diffq.weight_sources.WeightSource` (``weight_source``), switched by the methods below;
    ``weight_fq``, ``learned_rounding``, ``rounding`` and ``packed`` are views of it (setting one installs
    the matching source)."""

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None
    weight_source: WeightSource

    def _init_quant(self, weight_q: Quantizer | None, input_q: Quantizer | None) -> None:
        self.weight_quantizer = weight_q
        self.input_quantizer = input_q
        self.weight_source = live_source(weight_q)
        self.register_buffer("bos_weight", None)  # FP weight of token 0 (BOS-aware K/V projections)
        self.adapter: nn.Module | None = None  # low-rank FP weight update, added before quantization (finetuning)
        self.side: SideBranch | None = None  # low-rank FP branch beside the quantized weight, kept at inference
        self.quant_enabled = True  # False: compute in floating point (FP targets during reconstruction)

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SOURCE_VIEWS:  # the property's setter: nn.Module would register a module or tensor itself
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def use_source(self, source: WeightSource) -> WeightSource:
        """Compute with ``source`` from now on; returns the source it replaces."""
        previous = self.weight_source
        self.weight_source = source
        return previous

    def unfreeze(self) -> WeightSource:
        """Quantize the latent weight live again (round to nearest; FP without a weight quantizer)."""
        return self.use_source(live_source(self.weight_quantizer))

    @torch.no_grad()
    def freeze(self, keep_original: bool = True) -> None:
        """Fake-quantize the weight once; later forwards reuse it at no extra cost.

        With ``keep_original=False`` the FP weight is overwritten (halves memory), so the
        layer cannot be re-quantized afterwards.
        """
        if self.weight_quantizer is None:
            return
        wq = self.weight_quantizer(self.latent_weight()).detach()
        if not keep_original:
            self.weight.data.copy_(wq)
            wq = self.weight.data
        self.cache_weight(wq)

    def cache_weight(self, values: torch.Tensor, learned: bool = False) -> WeightSource:
        """Compute with the fixed ``values`` from now on; ``learned``: they are a learned rounding's grid
        values, which an export stores as they are."""
        return self.use_source(FrozenWeight(values, learned))

    def train_rounding(self, rounding: nn.Module) -> WeightSource:
        """Compute with a rounding under training (AdaRound) applied to the latent weight."""
        return self.use_source(TrainedRounding(rounding))

    def hold_rounding(self, rounding: nn.Module) -> WeightSource:
        """Compute with a learned rounding held while the FP weight trains (``HeldRounding``)."""
        return self.use_source(HeldLearnedRounding(rounding))

    @property
    def frozen(self) -> bool:
        """True once the fake-quantized weight is cached."""
        return isinstance(self.weight_source, FrozenWeight)

    @property
    def weight_fq(self) -> torch.Tensor | None:
        """The cached weight of a frozen layer, else None; setting a tensor caches it (keeping the
        learned flag of a frozen layer), setting None quantizes live again."""
        return self.weight_source.cache if self.frozen else None

    @weight_fq.setter
    def weight_fq(self, value: torch.Tensor | None) -> None:
        if value is not None:
            self.cache_weight(value, self.frozen and self.weight_source.learned)
        elif self.frozen:
            self.unfreeze()

    @property
    def learned_rounding(self) -> bool:
        """Whether the weight is a learned rounding's grid values (an export stores them, not RTN of
        the weight); settable on a frozen layer."""
        return self.weight_source.learned

    @learned_rounding.setter
    def learned_rounding(self, value: bool) -> None:
        if self.frozen:
            self.cache_weight(self.weight_source.cache, bool(value))
        elif value and not self.weight_source.learned:
            raise ValueError("only a frozen weight (weight_fq) can hold a learned rounding")

    @property
    def rounding(self) -> nn.Module | None:
        """The rounding module the layer computes with (trained or held), else None; setting a module
        trains it, setting None quantizes live again."""
        return self.weight_source.rounding if isinstance(self.weight_source, RoundingSource) else None

    @rounding.setter
    def rounding(self, value: nn.Module | None) -> None:
        if value is not None:
            self.train_rounding(value)
        elif isinstance(self.weight_source, RoundingSource):
            self.unfreeze()

    @property
    def packed(self) -> nn.Module | None:
        """The packed codes the layer computes with (:class:`diffq.export.PackedWeight`), else None."""
        return self.weight_source.packed if isinstance(self.weight_source, PackedCodes) else None

    @packed.setter
    def packed(self, value: nn.Module | None) -> None:
        if value is not None:
            self.use_source(PackedCodes(value))
        elif isinstance(self.weight_source, PackedCodes):
            self.unfreeze()

    def latent_weight(self) -> torch.Tensor:
        """The FP weight the quantizer sees: the weight plus the adapter's update, if any."""
        if self.adapter is None:
            return self.weight
        return self.weight + self.adapter().to(self.weight.dtype)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight's shape (also when it is held packed)."""
        return self.weight_source.shape(self)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with: its source's."""
        return self.weight_source.weight(self)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.quant_enabled:
            return x, self.weight
        return self._quant_input(x), self.quantized_weight()

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``x``; with a side branch (quantized mode only) plus
        ``scale * B (A xq)`` on the input the weight sees, in the branch's dtype."""
        xq, w = self._operands(x)
        y = self._base_forward(xq, w)
        if self.side is None or not self.quant_enabled:
            return y
        return y + self._branch(xq.to(self.side.A.dtype)).to(y.dtype)


class QuantLinearMixin(QuantMixin):
    """Forward of a quantized nn.Linear; with a ``bos_weight`` (MixDQ's BOS-aware K/V projection of
    a text sequence ``[B, T, D]``) token 0 goes through that FP weight and only tokens ``1..``
    through the quantizers, so the BOS token's outlier never sets an activation range."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.bos_weight is not None and self.quant_enabled and x.dim() == 3 and x.shape[1] > 1:
            head = F.linear(x[:, :1], self.bos_weight.to(x.dtype), self.bias)
            return torch.cat([head, self._compute(x[:, 1:])], dim=1)  # the side branch on tokens 1.. only
        return self._compute(x)

    def _base_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w, self.bias)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.side.A) * self.side.scale, self.side.B)


class QuantConv2dMixin(QuantMixin):
    """Forward of a quantized nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._compute(x)

    def _base_forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, w, self.bias)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:  # A: the layer's own kernel, stride, padding, groups
        return F.conv2d(self._conv_forward(x, self.side.A, None) * self.side.scale, self.side.B)


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
    module._buffers.pop("bos_weight", None)
    for attr in ("weight_quantizer", "input_quantizer", "weight_source", "adapter", "side"):
        if attr in module._modules:
            del module._modules[attr]
        module.__dict__.pop(attr, None)
    module.__class__ = module._diffq_base
    return module


def half_of(dtype: torch.dtype) -> torch.dtype:
    """The 16-bit type weight scales are stored in: bfloat16 for bfloat16 models, else float16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def attach_quantizers(model: nn.Module, specs: Sequence[LayerSpec]) -> dict[str, nn.Module]:
    """Convert every layer of ``specs`` that is quantized; returns name -> layer."""
    modules = dict(model.named_modules())
    converted = {}
    for s in specs:
        if not s.quantized:
            continue
        module = modules[s.name]
        feature_axis = -1 if s.kind == "linear" else 1
        wq = None if s.weight is None else s.weight.build_quantizer(
            "weight", name=f"{s.name}.weight", storage_dtype=half_of(module.weight.dtype))
        aq = None if s.act is None else s.act.build_quantizer("act", feature_axis, name=f"{s.name}.input")
        converted[s.name] = quantize_layer_(module, wq, aq)
        if s.bos:
            keep_bos_fp(module)
    return converted


def keep_bos_fp(layer: nn.Module) -> None:
    """Give a quantized Linear its FP weight for the text sequence's token 0 (a persistent buffer:
    exports carry it, so a reloaded model computes the BOS row exactly as the quantized one)."""
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"BOS-aware quantization needs a Linear K/V projection, not {type(layer).__name__}")
    layer.bos_weight = layer.weight.detach().clone()


def iter_quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """All Quantizer submodules of ``model`` with their names."""
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            yield name, m


def layer_table(model: nn.Module) -> Mapping[str, nn.Module]:
    """Quantized layers of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if is_quant_layer(m)}


def side_branches(model: nn.Module) -> dict[str, SideBranch]:
    """The side branches of ``model``'s layers, by layer name."""
    return {name: m.side for name, m in model.named_modules() if is_quant_layer(m) and m.side is not None}


def add_side_branch(module: nn.Module, rank: int, scale: float, dtype: torch.dtype | None = None) -> SideBranch:
    """Give a Linear / Conv2d a zero side branch (an FP layer is converted, with no quantizers, to carry it)."""
    if not is_quant_layer(module):
        quantize_layer_(module, None, None)
    if rank % getattr(module, "groups", 1):
        raise ValueError(f"a side branch's rank ({rank}) must be a multiple of the convolution's groups "
                         f"({module.groups})")
    module.side = SideBranch(module.weight_shape, rank, scale, dtype or module.weight.dtype, module.weight.device)
    return module.side
