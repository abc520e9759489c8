"""Extra loss terms of finetuning, each a small object that hooks the model and returns a term.

The teacher (the model in float mode) runs first, then the student; an extra loss records what
it needs in each pass (:meth:`ExtraLoss.begin` names the pass) and :meth:`ExtraLoss.term` compares
them. A new one is a class plus ``@EXTRA_LOSSES.register("name")``; ``finetune.extra_losses``
lists ``{name, weight, roles, names}`` entries.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffq.errors import ConfigError
from diffq.registry import Registry
from diffq.spec import parse_rules

EXTRA_LOSSES: Registry[Callable[..., "ExtraLoss"]] = Registry("finetune.extra_losses[].name")


class ExtraLoss(ABC):
    """Base class: forward hooks on ``modules`` keep their outputs of the current pass."""

    def __init__(self, modules: Mapping[str, nn.Module], weight: float) -> None:
        if not modules:
            raise ConfigError(f"{type(self).__name__}: its roles/names match no layer of the model")
        self.weight = float(weight)
        self.outputs: dict[str, dict[str, torch.Tensor]] = {"teacher": {}, "student": {}}
        self.phase = "teacher"
        self._hooks = [m.register_forward_hook(self._record(n)) for n, m in modules.items()]

    def _record(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            t = out if torch.is_tensor(out) else out[0]
            self.outputs[self.phase][name] = t.detach() if self.phase == "teacher" else t
        return hook

    def begin(self, phase: str) -> None:
        """Start recording the ``teacher`` or the ``student`` pass."""
        self.phase = phase
        self.outputs[phase] = {}

    @abstractmethod
    def term(self) -> torch.Tensor:
        """The unweighted loss term of the last teacher/student passes."""

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


@EXTRA_LOSSES.register("layer_mse")
class LayerOutputMSE(ExtraLoss):
    """Mean over the matched layers of the MSE between their student and FP outputs (QuEST's
    L_TLA / L_CMA)."""

    def term(self) -> torch.Tensor:
        s, t = self.outputs["student"], self.outputs["teacher"]
        return torch.stack([F.mse_loss(s[n].float(), t[n].float()) for n in s]).mean()


def build_extra_losses(entries: Sequence[Mapping[str, Any]], layers: Mapping[str, tuple[str, nn.Module]],
                       valid_roles: Sequence[str]) -> list[ExtraLoss]:
    """The configured extra losses, hooked on the layers their roles/names match."""
    losses = []
    for i, e in enumerate(entries):
        cls = EXTRA_LOSSES.get(e["name"])
        (rule,) = parse_rules([{"roles": e.get("roles"), "names": e.get("names")}], valid_roles)
        modules = {n: m for n, (role, m) in layers.items() if rule.matches(n, role)}
        try:
            losses.append(cls(modules, e.get("weight", 1.0)))
        except ConfigError as err:
            raise ConfigError(f"finetune.extra_losses[{i}]: {err}") from None
    return losses
