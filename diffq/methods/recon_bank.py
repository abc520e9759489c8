"""A reconstruction unit's activations over the calibration set: its inputs and outputs (and those of
its quantized layers) captured by one pass of the denoiser per calibration call and concatenated along
the batch axis (:class:`Bank`), running the unit on them, and QDrop's mix of quantized and FP inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from diffq.calib import CalibSample
from diffq.calib.capture import map_tensors
from diffq.methods.blocks import Unit
from diffq.timestep_groups import call_timesteps, router_of


class _Stop(Exception):
    """Raised by a hook once the unit under reconstruction has run (skips the rest of the model)."""


@dataclass
class Bank:
    """A unit's inputs (per module: args, kwargs; the first module's hidden state excluded for the
    others), target tensors and inner-layer outputs, the calibration calls concatenated row-wise."""

    inputs: list[tuple[tuple, dict[str, Any]]]
    outputs: list[torch.Tensor]
    layer_outputs: dict[str, torch.Tensor]
    calls: list[slice]  # rows of each calibration call
    batched: set[int]  # ids of the tensors that have one row per sample
    timesteps: torch.Tensor | None = None  # each row's denoiser timestep (routed to timestep-grouped quantizers)

    def rows(self, index: slice | torch.Tensor) -> tuple[list, list[torch.Tensor], dict[str, torch.Tensor]]:
        """(inputs, outputs, layer outputs) of the rows ``index``."""
        def take(t: torch.Tensor) -> torch.Tensor:
            return t[index] if id(t) in self.batched else t
        return (map_tensors(self.inputs, take), [take(t) for t in self.outputs],
                {n: take(t) for n, t in self.layer_outputs.items()})

    def route(self, model: nn.Module, index: slice | torch.Tensor) -> None:
        """Hand the rows' timesteps to the model's timestep-grouped quantizers (if it has any)."""
        router = router_of(model)
        if router is not None:
            router.route(self.timesteps[index])


def tensors_of(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in tensors_of(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_of(v)]
    if hasattr(obj, "to_tuple"):  # diffusers/transformers output objects
        return tensors_of(obj.to_tuple())
    return []


def _merge(objs: list[Any], sizes: list[int], batched: set[int]) -> Any:
    """One structure from the per-call ones: tensors with one row per sample concatenated (their ids
    recorded in ``batched``), others taken from the first call."""
    first = objs[0]
    if torch.is_tensor(first):
        rows = [t.shape[0] if t.dim() else 0 for t in objs]
        full = [r == n for r, n in zip(rows, sizes)]
        # batched: one row per sample in every call, or in some calls and one row broadcast in the others
        # (e.g. a negative prompt's single embedding for all rows of an unconditional call)
        if any(full) and all(f or r == 1 for f, r in zip(full, rows)):
            objs = [t if f else t.expand(n, *t.shape[1:]) for t, f, n in zip(objs, full, sizes)]
            out = torch.cat(objs) if len(objs) > 1 else first
            batched.add(id(out))
            return out
        return first
    if isinstance(first, Mapping):
        return {k: _merge([o[k] for o in objs], sizes, batched) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_merge(list(parts), sizes, batched) for parts in zip(*objs))
    return first


def capture_unit(model: nn.Module, unit: Unit, calib: Sequence[CalibSample], device: torch.device, dtype: torch.dtype,
             layers: Mapping[str, nn.Module] | None = None) -> Bank:
    """The unit's inputs and output (and the outputs of ``layers``) over the calibration set; the
    model stops as soon as the unit has run."""
    calls: list[dict[str, Any]] = []
    inner: dict[str, torch.Tensor] = {}
    last = len(unit.modules) - 1

    def on_input(i: int):
        def hook(module, args, kwargs):
            args = map_tensors(args if i == 0 else args[1:], lambda t: t.detach())
            calls[-1]["inputs"].append((args, map_tensors(kwargs, lambda t: t.detach())))
        return hook

    def on_output(module, args, kwargs, output):
        calls[-1]["outputs"] = [t.detach() for t in tensors_of(output)]
        calls[-1]["layers"] = dict(inner)
        raise _Stop

    hooks = [m.register_forward_pre_hook(on_input(i), with_kwargs=True) for i, m in enumerate(unit.modules)]
    hooks.append(unit.modules[last].register_forward_hook(on_output, with_kwargs=True))
    hooks += [m.register_forward_hook(lambda mod, a, o, n=n: inner.__setitem__(n, o.detach()))
              for n, m in (layers or {}).items()]
    try:
        with torch.no_grad():
            for sample in calib:
                inner.clear()
                calls.append({"inputs": []})
                try:
                    model(**sample.to(device, dtype), return_dict=False)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    sizes = [int(c["outputs"][0].shape[0]) for c in calls]
    offsets = np.cumsum([0, *sizes])
    batched: set[int] = set()
    timesteps = torch.cat([call_timesteps(s.kwargs["timestep"], n) for s, n in zip(calib, sizes)]) \
        if router_of(model) is not None else None
    return Bank(_merge([c["inputs"] for c in calls], sizes, batched),
                 _merge([c["outputs"] for c in calls], sizes, batched),
                 _merge([c["layers"] for c in calls], sizes, batched),
                 [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])], batched, timesteps)


def run_unit(unit: Unit, inputs: Sequence[tuple[tuple, dict[str, Any]]]) -> Any:
    (args, kwargs), *rest = inputs
    out = unit.modules[0](*args, **kwargs)
    for module, (args, kwargs) in zip(unit.modules[1:], rest):
        out = module(out if torch.is_tensor(out) else out[0], *args, **kwargs)
    return out


def mix_inputs(q: Any, fp: Any, p: float, gen: torch.Generator) -> Any:
    """QDrop: each floating element of the quantized-path input replaced by the FP one with probability p."""
    if p <= 0:
        return q
    if torch.is_tensor(q) and q.is_floating_point():
        keep_fp = torch.rand(q.shape, generator=gen, device="cpu").to(q.device) < p
        return torch.where(keep_fp, fp, q)
    if isinstance(q, Mapping):
        return {k: mix_inputs(v, fp[k], p, gen) for k, v in q.items()}
    if isinstance(q, (list, tuple)):
        return type(q)(mix_inputs(a, b, p, gen) for a, b in zip(q, fp))
    return q
