"""Cost accounting: effective bits of weights and activations, model size."""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import nn

from diffq.layers import is_quant_layer
from diffq.spec import LayerSpec

FP_BITS = 16  # floating-point tensors are counted at 16 bits (fp16/bf16 deployment)


def weight_bits(model: nn.Module) -> dict[str, float]:
    """Effective weight bits over the quantizable layers and the model size FP vs quantized.

    Quantized layers count their format's bits per element including scales; every other
    parameter (FP layers, biases, norms, embeddings) counts FP_BITS.
    """
    total_params = sum(p.numel() for p in model.parameters())
    quant_bits = 0.0
    quant_params = 0
    layer_params = 0
    layer_bits = 0.0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n = m.weight.numel()
            layer_params += n
            if is_quant_layer(m) and m.weight_quantizer is not None:
                b = m.weight_quantizer.bits_per_element()
                quant_params += n
                quant_bits += b * n
                layer_bits += b * n
            else:
                layer_bits += FP_BITS * n
    fp_bytes = total_params * FP_BITS / 8
    q_bytes = (quant_bits + (total_params - quant_params) * FP_BITS) / 8
    return {
        "effective_weight_bits": layer_bits / max(layer_params, 1),
        "quantized_weight_fraction": quant_params / max(layer_params, 1),
        "size_fp_mb": fp_bytes / 2**20,
        "size_quant_mb": q_bytes / 2**20,
        "compression": fp_bytes / max(q_bytes, 1),
    }


def activation_bits(model: nn.Module, act_elems: Mapping[str, int], specs: Sequence[LayerSpec]) -> float:
    """Input-activation bits averaged over layers, weighted by elements seen per layer call."""
    modules = dict(model.named_modules())
    num = den = 0.0
    for s in specs:
        n = act_elems.get(s.name, 0)
        m = modules[s.name]
        q = getattr(m, "input_quantizer", None) if is_quant_layer(m) else None
        num += n * (q.bits_per_element() if q is not None else FP_BITS)
        den += n
    return num / den if den else float(FP_BITS)
