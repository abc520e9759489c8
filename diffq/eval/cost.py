"""Cost accounting: bits per element of each quantizer, effective bits of weights and
activations, model size.

Weights are counted as the export stores them: codes at their packed width plus the parameters in
their storage types (16-bit scales, uint8 zero points, E4M3 NVFP4 block factors with an fp32
tensor scale, E8M0 MXFP4 exponents); where a format's information content is less than what is
stored (ternary: log2(3) in 2 bits; 6-bit FP in 8), the information bits are reported beside.
Dynamic activation scales count 16 bits each; static activation scales are free. Side branches
(LoRA kept at inference, :class:`~diffq.layers.SideBranch`) are not part of the FP model: their
parameters count at their dtype's width in the quantized model's bits and size only, and their
multiply-accumulates as FP operations of the quantized model.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from diffq.errors import CalibrationError
from diffq.formats import IntFormat
from diffq.layers import is_quant_layer, iter_quantizers, side_branches
from diffq.model_quant import float_mode
from diffq.quantizer import Quantizer
from diffq.spec import LayerSpec

FP_BITS = 16  # floating-point tensors are counted at 16 bits (fp16/bf16 deployment)


def quantizer_bits(q: nn.Module, shape: tuple[int, ...] | None = None, stored: bool = True) -> float:
    """Bits per element of a quantized tensor incl. scale (and zero-point) overhead; static
    activation scales are free. A split or timestep-grouped quantizer counts as its first part (all
parts share the format).

    ``shape`` (of the quantized tensor) defaults to the last one the quantizer saw; tensor,
    channel and token granularities need it.
    """
    if not isinstance(q, Quantizer):
        return quantizer_bits(q.parts[0], shape, stored)
    fmt = q.fmt
    shape = shape or q.last_shape
    params = {k: getattr(q, k) for k in fmt.param_names(q.symmetric)} if q.kind == "weight" else {}
    if params and shape is not None and all(p.numel() for p in params.values()):
        half = q.storage_dtype or torch.float16
        param_bits = sum(t.numel() * t.element_size() * 8 for t in fmt.to_storage(params, half).values())
        return float(fmt.storage_bits if stored else fmt.element_bits) + param_bits / math.prod(shape)
    if fmt.block_size is not None:
        return fmt.bits_per_element(stored=stored)
    if q.kind == "act" and not q.dynamic:
        return fmt.bits_per_element(None, stored=stored)
    if shape is None and q.layout.group is None:
        raise CalibrationError(f"bits_per_element of layer {q.name or '<unnamed>'} needs the tensor shape; "
                               "pass shape=... or calibrate first")
    group_size = q.layout.group or q.layout.elements_per_scale(shape)  # type: ignore[arg-type]
    zero_bits = fmt.bits if isinstance(fmt, IntFormat) and not q.symmetric else 0
    return fmt.bits_per_element(group_size, zero_bits=zero_bits, stored=stored)


def weight_bits(model: nn.Module) -> dict[str, float]:
    """Weight bits per element over the quantizable layers and the model size FP vs quantized.

    Two widths, each with the scales' overhead (learned scales too, once): ``effective_weight_bits``
    counts the format's bits (INT6: 6, ternary: log2 3), as papers and Pareto fronts compare
    methods; ``stored_weight_bits`` the bits the export stores them in (INT6 in an int8 container:
    8, ternary packed 2-bit: 2), as are the sizes. Every other parameter (FP layers, biases, norms,
    embeddings) counts FP_BITS. Side branches add their parameters at their dtype's width to both
    (still per quantizable-layer weight, so they rise by the branches' bits / those weights) and
    nothing to the FP model's size.
    """
    side = [p for b in side_branches(model).values() for p in b.parameters()]
    side_params = sum(p.numel() for p in side)
    side_bits = sum(p.numel() * p.element_size() * 8 for p in side)
    # learned scales are parameters of their quantizers, already counted by quantizer_bits (or free)
    apart = {id(p) for p in side} | {id(p) for _, q in iter_quantizers(model) for p in q.parameters()}
    total_params = sum(p.numel() for p in model.parameters() if id(p) not in apart) + sum(
        math.prod(m.packed.shape) for m in model.modules() if is_quant_layer(m) and m.packed is not None)
    counts = {"stored": float(side_bits), "information": float(side_bits)}
    quant_params = layer_params = 0
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        shape = m.weight_shape if is_quant_layer(m) else tuple(m.weight.shape)
        n = math.prod(shape)
        layer_params += n
        q = m.weight_quantizer if is_quant_layer(m) else None
        if q is None:
            for key in counts:
                counts[key] += FP_BITS * n
            continue
        quant_params += n
        counts["stored"] += quantizer_bits(q, shape) * n
        counts["information"] += quantizer_bits(q, shape, stored=False) * n
    fp_bytes = total_params * FP_BITS / 8
    other_bits = (total_params - layer_params) * FP_BITS
    q_bytes = (counts["stored"] + other_bits) / 8
    out = {
        "effective_weight_bits": counts["information"] / max(layer_params, 1),
        "stored_weight_bits": counts["stored"] / max(layer_params, 1),
        "quantized_weight_fraction": quant_params / max(layer_params, 1),
        "size_fp_mb": fp_bytes / 2**20,
        "size_quant_mb": q_bytes / 2**20,
        "compression": fp_bytes / max(q_bytes, 1),
        "storage_ratio_fp32": total_params * 4 / max(q_bytes, 1),  # the binarisation papers' storage ratio
        "side_branch_params": side_params,
        "side_branch_mb": side_bits / 8 / 2**20,
    }
    return out


def activation_bits(model: nn.Module, act_elems: Mapping[str, int], specs: Sequence[LayerSpec]) -> float:
    """Input-activation bits averaged over layers, weighted by elements seen per layer call, at the
    formats' widths (activations are never stored: no container width)."""
    modules = dict(model.named_modules())
    num = den = 0.0
    for s in specs:
        n = act_elems.get(s.name, 0)
        m = modules[s.name]
        q = getattr(m, "input_quantizer", None) if is_quant_layer(m) else None
        num += n * (quantizer_bits(q, stored=False) if q is not None else FP_BITS)
        den += n
    return num / den if den else float(FP_BITS)


def layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one Linear / Conv2d call that produced ``out``."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return out.numel() * (module.in_channels // module.groups) * kh * kw
    return out.numel() * module.in_features


def _format_bits(tq: Any) -> float | None:
    fmt = None if tq is None else tq.build_format()
    return None if fmt is None else fmt.element_bits


def operations(model: nn.Module, macs: Mapping[str, int], specs: Sequence[LayerSpec]) -> dict[str, float]:
    """Operations of one denoiser call as the binarisation papers count them (BiBench, BinaryDM):
    a layer with quantized weights *and* inputs costs ``MACs * w_bits * a_bits / 64`` (BOPs / 64),
    any other layer its MACs in floating point; a side branch adds its MACs in floating point to
    the quantized model's (``ops_side_g``): the layer's MACs x branch parameters / weight elements,
    since both run over the same output positions. ``ops_ratio`` = FP operations / these."""
    sides = side_branches(model)
    modules = dict(model.named_modules())
    fp = quant = side = 0.0
    for s in specs:
        n = float(macs.get(s.name, 0))
        fp += n
        wb, ab = (None, None) if not s.quantized else (_format_bits(s.weight), _format_bits(s.act))
        quant += n * wb * ab / 64 if wb is not None and ab is not None else n
        if s.name in sides:
            side += n * sum(p.numel() for p in sides[s.name].parameters()) / math.prod(modules[s.name].weight_shape)
    quant += side
    return {"ops_fp_g": fp / 1e9, "ops_quant_g": quant / 1e9, "ops_ratio": fp / quant if quant else 1.0,
            "ops_side_g": side / 1e9}


def model_cost(model: nn.Module, specs: Sequence[LayerSpec], input_counts: Mapping[str, int],
               macs: Mapping[str, int]) -> dict[str, Any]:
    """metrics.json's ``cost``: effective weight/activation bits, model sizes, operations, resident
    memory and how many layers are quantized (``input_counts`` / ``macs``: one denoiser call's)."""
    cost: dict[str, Any] = dict(weight_bits(model))
    cost["effective_act_bits"] = activation_bits(model, input_counts, specs)
    cost.update(operations(model, macs, specs))
    cost["resident_mb"] = resident_mb(model)
    cost["layers_quantized"] = sum(s.quantized for s in specs)
    cost["layers_total"] = len(specs)
    return cost


def resident_mb(model: nn.Module) -> float:
    """Memory the model's parameters and buffers occupy (MB): what inference keeps resident."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


class LayerCounter:
    """Counts the input elements and multiply-accumulates of each named layer in the denoiser's first call."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.counts: dict[str, int] = {}
        self.macs: dict[str, int] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[n].register_forward_hook(self._count(n)) for n in names]
        self._hooks.append(model.register_forward_hook(lambda *_: self.remove()))

    def _count(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            self.counts[name] = self.counts.get(name, 0) + args[0].numel()
            self.macs[name] = self.macs.get(name, 0) + layer_macs(module, out)
        return hook

    def remove(self) -> None:
        """Detach all hooks (called after the first denoiser call)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


@torch.no_grad()
def count_layer_inputs(model: nn.Module, names: Sequence[str], sample: Any, device: torch.device,
                       dtype: torch.dtype) -> LayerCounter:
    """A :class:`LayerCounter` of the named layers over one floating-point call of ``model`` on the
    calibration ``sample`` (input elements and MACs per layer; what activation budgets and bit
    averages weigh layers by)."""
    counter = LayerCounter(model, list(names))
    try:
        with float_mode(model):
            model(**sample.to(device, dtype), return_dict=False)
    finally:
        counter.remove()
    return counter
