"""``TensorQuant``: the one schema of a tensor's quantization, from the YAML to the quantizer.

The same dataclass is the Hydra schema of ``quant.weight``, ``quant.act`` and
``quant.attn.{qkv,softmax}``, the type a rule's partial ``weight:`` / ``act:`` is checked
against, the resolved per-layer setting in :mod:`diffq.spec`, and what builds the
:class:`~diffq.quantizer.Quantizer`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from diffq.errors import ConfigError
from diffq.formats import Format, IntFormat, make_format
from diffq.quantizer import Quantizer
from diffq.timestep_groups import TIMESTEP_INITS, TimestepGroupedQuantizer

__all__ = ["TensorQuant"]


@dataclass
class TensorQuant:
    """One tensor's quantization: number format, granularity and how its range is found."""

    format: str = "int"  # int | fp | nvfp4 | mxfp4 | ternary | binary | none
    bits: int = 8  # >= 16 with int/fp means "keep floating point"; binary: the number of sign bases
    exp: Optional[int] = None  # fp exponent bits (default from bits: 8->E4M3, 4->E2M1, ...)
    man: Optional[int] = None  # fp mantissa bits
    granularity: str = "tensor"  # tensor | channel | token | group:<g> | block
    symmetric: bool = True
    observer: str = "minmax"  # minmax | percentile | mse | absmean | absmedian | twn | lsq (2 mean|x| / sqrt(Qp))
    percentile: float = 99.99  # percentile observer
    momentum: Optional[float] = None  # minmax observer: EMA across calibration batches (None: global)
    dynamic: bool = False  # compute the range at run time from the tensor itself
    learnable: bool = False  # LSQ step size (trained by reconstruction methods)
    # static activations: one calibrated range per group of sampler steps, switched by the denoiser's
    # timestep (QuEST's code; diffq/timestep_groups.py); 1 = one range for all steps
    timestep_groups: int = 1
    # how the groups start: own (each calibrated on its own steps' calibration calls, at least
    # MIN_CALLS_PER_GROUP distinct timesteps each) | shared (all from one calibration over every call,
    # separated by training: QuEST's code, with one group per calibration timestep)
    timestep_init: str = "own"

    @staticmethod
    def check_partial(values: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
        """``values`` with keys and types checked against the schema (and converted, e.g. "4" -> 4);
        ConfigError naming ``where`` otherwise."""
        if not values:
            return {}
        names = [f.name for f in fields(TensorQuant)]
        unknown = set(values) - set(names)
        if unknown:
            raise ConfigError(f"{where}: unknown quantization key(s) {sorted(unknown)}; valid keys are {sorted(names)}")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(TensorQuant), dict(values))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", "") or "?"
            raise ConfigError(f"{where}: bad value for {key!r}: {str(e).splitlines()[0]}") from None
        return {k: merged[k] for k in values}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> TensorQuant:
        """Build from a (possibly OmegaConf) mapping, checking keys and types."""
        return cls(**cls.check_partial(values, where))

    def merged(self, partial: Mapping[str, Any] | None) -> TensorQuant:
        """A copy with the keys of an already checked ``partial`` overriding this one's."""
        return replace(self, **partial) if partial else self

    def build_format(self) -> Format | None:
        """The number format, or None when this tensor stays floating point."""
        return make_format(self.format, self.bits, exp=self.exp, man=self.man, symmetric=self.symmetric)

    def build_quantizer(self, kind: str, feature_axis: int = -1, name: str = "",
                        storage_dtype: torch.dtype | None = None) -> nn.Module | None:
        """A Quantizer module for this tensor (a :class:`TimestepGroupedQuantizer` of them with
        ``timestep_groups > 1``), or None when it stays floating point (``storage_dtype``: the half
        type its parameters are exported in)."""
        fmt = self.build_format()
        if fmt is None:
            return None
        self.check_timestep_groups(kind)

        def one(label: str) -> Quantizer:
            return Quantizer(self.build_format(), kind=kind, granularity=self.granularity,  # type: ignore[arg-type]
                             symmetric=self.symmetric, observer=self.observer, dynamic=self.dynamic,
                             feature_axis=feature_axis, learnable=self.learnable, name=label,
                             storage_dtype=storage_dtype, percentile=self.percentile, momentum=self.momentum)

        if self.timestep_groups == 1:
            return one(name)
        parts = [one(f"{name}@t{g}") for g in range(self.timestep_groups)]
        return TimestepGroupedQuantizer(parts, shared_init=self.timestep_init == "shared")

    def check_timestep_groups(self, kind: str) -> None:
        """ConfigError unless ``timestep_groups`` is 1, or > 1 on a static activation quantizer."""
        if self.timestep_groups < 1:
            raise ConfigError(f"timestep_groups must be at least 1 (got {self.timestep_groups})")
        if self.timestep_init not in TIMESTEP_INITS:
            raise ConfigError(f"unknown timestep_init {self.timestep_init!r}: use one of {', '.join(TIMESTEP_INITS)}")
        if self.timestep_groups == 1:
            return
        dynamic = self.dynamic or self.granularity.split(":")[0] in ("token", "group", "block")
        if kind != "act" or dynamic:
            what = "weights" if kind != "act" else "dynamic activations (their range comes from each call)"
            raise ConfigError(f"timestep_groups={self.timestep_groups} applies to static activation quantizers, not "
                              f"to {what}; set it on quant.act (or a rule's act) with a tensor/channel granularity")

    def describe(self) -> str:
        """Short human label, e.g. ``int8/channel/sym``, ``fp8_e4m3/tensor`` or ``float`` (unquantized)."""
        fmt = self.build_format()
        if fmt is None:
            return "float"
        sym = ("/sym" if self.symmetric else "/asym") if isinstance(fmt, IntFormat) else ""
        dyn = "/dyn" if self.dynamic else ""
        shared = "s" if self.timestep_init == "shared" else ""
        groups = f"/t{self.timestep_groups}{shared}" if self.timestep_groups > 1 else ""
        return f"{fmt.name}/{self.granularity}{sym}{dyn}{groups}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)
