"""What a (deployed) model keeps resident: the bytes of its parameters and buffers, counting a tensor
subclass (torchao's quantized tensors) by the plain tensors it holds, not by its logical dtype."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["resident_bytes", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` occupies: its storage, or for a wrapper subclass the sum of its inner tensors."""
    if type(t) in (torch.Tensor, nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(tensor_bytes(getattr(t, name)) for name in names if getattr(t, name) is not None)


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and held low-bit weight of ``model`` (each tensor once)."""
    from diffq.deployment.lowering import HeldWeight

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    tensors |= {id(m.tensor): m.tensor for m in model.modules() if isinstance(m, HeldWeight)}
    return sum(tensor_bytes(t) for t in tensors.values())
