"""Where a quantized layer's weight comes from: one :class:`WeightSource` per layer.

A quantized layer (:mod:`diffq.layers`) computes with ``layer.weight_source.weight(layer)``; the
stages switch its source through the layer's methods (``use_source``, ``freeze``, ``cache_weight``,
``unfreeze``, ``train_rounding``, ``hold_rounding``). A new source is one subclass of
:class:`WeightSource`. The live sources read the latent weight through ``layer.latent_weight()``:
the FP weight plus a LoRA adapter's update, if any (:mod:`diffq.finetune.lora`).

Sources are modules (a submodule ``weight_source`` of their layer), so the tensors they hold follow
the layer's device and dtype and a rollback (:mod:`diffq.rollback`) puts the previous one back.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from diffq.quantizer import Quantizer


class WeightSource(nn.Module, ABC):
    """The weight a quantized layer computes with."""

    learned = False  # its values are a learned rounding on the grid: an export stores them, not RTN of the weight

    @abstractmethod
    def weight(self, layer: nn.Module) -> Tensor:
        """The weight ``layer`` computes with."""

    def shape(self, layer: nn.Module) -> tuple[int, ...]:
        """The shape of that weight (the FP weight's, unless the source stores it otherwise)."""
        return tuple(layer.weight.shape)


class FloatWeight(WeightSource):
    """The latent FP weight, unquantized (a layer without a weight quantizer)."""

    def weight(self, layer: nn.Module) -> Tensor:
        return layer.latent_weight()


class RoundToNearest(WeightSource):
    """The latent weight fake-quantized by the layer's weight quantizer at every forward."""

    def weight(self, layer: nn.Module) -> Tensor:
        return layer.weight_quantizer(layer.latent_weight())


class FrozenWeight(WeightSource):
    """A weight computed once and cached (``layer.freeze``, a loaded export), or with ``learned`` a
    learned rounding's grid values; it no longer follows the FP weight."""

    def __init__(self, cache: Tensor, learned: bool = False) -> None:
        super().__init__()
        self.register_buffer("cache", cache, persistent=False)
        self.learned = learned

    def weight(self, layer: nn.Module) -> Tensor:
        return self.cache

    def extra_repr(self) -> str:
        return f"learned={self.learned}"


class RoundingSource(WeightSource):
    """A rounding module applied to the latent weight (``rounding(latent)``)."""

    def __init__(self, rounding: nn.Module) -> None:
        super().__init__()
        self.rounding = rounding

    def weight(self, layer: nn.Module) -> Tensor:
        return self.rounding(layer.latent_weight())


class TrainedRounding(RoundingSource):
    """A learned rounding being trained (AdaRound, :class:`diffq.methods.adaround.AdaRound`): its soft
    values lie off the grid, so an export re-rounds the FP weight."""


class HeldLearnedRounding(RoundingSource):
    """A learned rounding held while the FP weight trains underneath
    (:class:`diffq.methods.adaround.HeldRounding`): its up/down bits applied to the latent weight,
    grid values an export stores as they are."""

    learned = True


class PackedCodes(WeightSource):
    """A loaded export's packed codes (:class:`diffq.export.PackedWeight`), unpacked with the layer's
    weight quantizer at each forward."""

    def __init__(self, packed: nn.Module) -> None:
        super().__init__()
        self.packed = packed

    def weight(self, layer: nn.Module) -> Tensor:
        return self.packed(layer.weight_quantizer)

    def shape(self, layer: nn.Module) -> tuple[int, ...]:
        return tuple(self.packed.shape)


def live_source(quantizer: Quantizer | None) -> WeightSource:
    """The source of a layer quantized live: round to nearest by ``quantizer``, FP without one."""
    return FloatWeight() if quantizer is None else RoundToNearest()
