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
    """Base class: forward hooks on ``modules`` keep their outputs of the current pass. ``targets``
    says what the entry's roles/names match: ``layers`` (the quantizable layers) or ``modules`` (any
    module by name, e.g. whole blocks)."""

    targets = "layers"

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

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors the term depends on beyond the model (checkpointed so a resumed run continues exactly)."""
        return {}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state` returned."""

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
                       valid_roles: Sequence[str], model: nn.Module | None = None) -> list[ExtraLoss]:
    """The configured extra losses, hooked on the layers (or, for a loss over ``modules``, the
    modules of ``model``) their roles/names match."""
    losses = []
    for i, e in enumerate(entries):
        cls = EXTRA_LOSSES.get(e["name"])
        (rule,) = parse_rules([{"roles": e.get("roles"), "names": e.get("names")}], valid_roles,
                              "finetune.extra_losses", start=i)
        if cls.targets == "modules":
            if model is None or rule.roles or not rule.names:
                raise ConfigError(f"finetune.extra_losses[{i}]: {e['name']} hooks modules by name: give names "
                                  "(globs or re:) and no roles")
            modules = {n: m for n, m in model.named_modules() if n and rule.matches(n, "")}
        else:
            modules = {n: m for n, (role, m) in layers.items() if rule.matches(n, role)}
        try:
            losses.append(cls(modules, e.get("weight", 1.0)))
        except ConfigError as err:
            raise ConfigError(f"finetune.extra_losses[{i}]: {err}") from None
    return losses


@EXTRA_LOSSES.register("feature_mse")
class FeatureMSE(LayerOutputMSE):
    """Intermediate-feature matching: the MSE between the student's and the FP outputs of modules
    matched by name (e.g. every transformer block), averaged over them."""

    targets = "modules"


@EXTRA_LOSSES.register("lrm")
class LowRankMimicking(ExtraLoss):
    """BinaryDM's low-rank representation mimicking: each matched block's output, projected on the
    top principal components of its FP output over the channel axis (``channels // 4`` of them,
    centred; computed by ``torch.pca_lowrank`` on the first teacher batch, then fixed), should match
    the FP projection; the term is the MSE averaged over blocks."""

    targets = "modules"

    def __init__(self, modules: Mapping[str, nn.Module], weight: float) -> None:
        super().__init__(modules, weight)
        self.projections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (mean [C], basis [C, q])

    @staticmethod
    def channels_last(t: torch.Tensor) -> torch.Tensor:
        """``[rows, channels]``: NCHW maps with the channel axis last, token sequences as they are."""
        x = t.float()
        return (x.movedim(1, -1) if x.dim() == 4 else x).reshape(-1, x.shape[1] if x.dim() == 4 else x.shape[-1])

    def projection(self, name: str, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's fixed (mean, basis), computed from its first teacher output."""
        if name not in self.projections:
            x = self.channels_last(teacher)
            q = max(1, x.shape[1] // 4)
            mean = x.mean(0)
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(0)  # pca_lowrank's random sketch: the same projection on every run and resume
            _, _, v = torch.pca_lowrank(x - mean, q=q, center=False)
            torch.random.set_rng_state(gen_state)
            self.projections[name] = (mean.detach(), v.detach())
        return self.projections[name]

    def state(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return {f"{n}/{part}": t for n, pair in self.projections.items() for part, t in zip(("mean", "basis"), pair)}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:  # noqa: D102
        names = {k.rsplit("/", 1)[0] for k in tensors}
        self.projections = {n: (tensors[f"{n}/mean"], tensors[f"{n}/basis"]) for n in names}

    def term(self) -> torch.Tensor:
        s, t = self.outputs["student"], self.outputs["teacher"]
        terms = []
        for n in s:
            mean, v = self.projection(n, t[n])
            terms.append(F.mse_loss((self.channels_last(s[n]) - mean) @ v, (self.channels_last(t[n]) - mean) @ v))
        return torch.stack(terms).mean()
