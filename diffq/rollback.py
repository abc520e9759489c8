"""Undo what a failed quantization did to a model: module classes, submodules, quantizers, hooks,
attention processors and attributes go back to their state before the call.

Quantization changes a model by swapping module classes (:func:`diffq.layers.quantize_layer_`),
adding submodules, buffers and hooks and replacing attention processors, all of which live in
each module's ``__dict__``; a snapshot of those dicts (shallow: the tensors are the model's own)
restores them. Weights changed in place (finetuning trains them, ``keep_fp_weights=false``
overwrites them) cannot come back from a shallow snapshot: the error then says to reload the model.
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from diffq.errors import DiffqError

log = logging.getLogger(__name__)

__all__ = ["ModuleSnapshot", "rollback_on_error"]


@dataclass
class _ModuleState:
    cls: type
    attrs: dict[str, Any]
    containers: dict[str, dict[Any, Any]]  # dict-valued attributes (parameters, buffers, submodules, hooks...)


class ModuleSnapshot:
    """The structure of every module of a model and the version of every tensor it holds."""

    def __init__(self, model: nn.Module) -> None:
        self.states: list[tuple[nn.Module, _ModuleState]] = []
        for module in model.modules():
            attrs = dict(module.__dict__)
            containers = {k: dict(v) for k, v in attrs.items() if type(v) in (dict, OrderedDict)}
            self.states.append((module, _ModuleState(type(module), attrs, containers)))
        self.signatures = {id(t): (t, _signature(t)) for t in _tensors(model)}

    def restore(self) -> list[str]:
        """Put every module back as it was; returns the names of tensors changed in place since."""
        for module, state in self.states:
            module.__class__ = state.cls
            for key in [k for k in module.__dict__ if k not in state.attrs]:
                del module.__dict__[key]
            for key, value in state.attrs.items():
                saved = state.containers.get(key)
                if saved is not None and (len(value) != len(saved) or any(value.get(k) is not v
                                                                          for k, v in saved.items())):
                    value.clear()  # the same dict object: handles registered before the call stay valid
                    value.update(saved)
                module.__dict__[key] = value
        return self.changed()

    def changed(self) -> list[str]:
        """Names (``module.attr``) of the tensors whose values changed in place since the snapshot."""
        names = {id(t): n for n, t in _named_tensors(self.states[0][0])}
        return sorted(names.get(key, "?") for key, (t, sig) in self.signatures.items() if _signature(t) != sig)


@torch.no_grad()
def _signature(t: torch.Tensor) -> tuple[int, int, float, float]:
    """Storage, version and two sums of a tensor: writes through ``.data`` skip the version counter."""
    x = t.detach().double()
    return t.data_ptr(), t._version, float(x.sum()), float(x.abs().sum())


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=True)
    yield from ((n, b) for n, b in model.named_buffers(remove_duplicate=True) if b is not None)


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    return (t for _, t in _named_tensors(model))


@contextlib.contextmanager
def rollback_on_error(model: nn.Module, what: str = "the denoiser") -> Iterator[ModuleSnapshot]:
    """Run the block; on any exception restore ``model`` as it was and re-raise. When weights were
    changed in place the error says so and names the fix (reload the model)."""
    snapshot = ModuleSnapshot(model)
    try:
        yield snapshot
    except BaseException as e:
        changed = snapshot.restore()
        if not changed:
            log.info("%s is restored to its state before the call", what)
            raise
        note = (f"{what} is restored to its modules before the call, but {len(changed)} of its tensors were changed "
                f"in place ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}): reload the model before "
                "using it again")
        if isinstance(e, DiffqError):
            raise type(e)(f"{e}; {note}") from e
        log.error("%s", note)
        raise
