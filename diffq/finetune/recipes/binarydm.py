"""BinaryDM's training: progressive initialisation, then QAT of the whole binarised model.

With ``finetune.binarydm.progressive`` (as the released code's ``on_train_batch_start`` does it), the
quantizable layers are grouped from the middle of the network outwards
(:func:`diffq.levels.middle_out_groups`: a UNet's middle block, then its resolution levels from the
lowest; a transformer's middle blocks first); stage ``k`` binarises groups ``0..k``, their inputs
quantized with them and the other layers computing in floating point, for ``progressive_steps``
(1, the code's) steps. Every stage trains the whole ``finetune.train`` selection (the code's
optimiser holds every parameter from its first step); the progressive stages are not validated
(an initialisation: keeping a best state would undo it), the last stage turns every quantizer on and
trains for the remaining steps, validated as ``finetune.keep`` says. Without it: one stage, as
``plain``. The loss is the engine's (the code's: the diffusion loss on the model's data,
``data_weight``) plus ``finetune.extra_losses`` (LRM: ``{name: lrm, weight: 1e-4, names: <blocks>}``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from diffq.errors import ConfigError
from diffq.finetune.recipes import RECIPES, SETTINGS, Recipe, RecipeContext, Stage
from diffq.finetune.select import plan_selection
from diffq.levels import middle_out_groups
from diffq.roles import ROLES
from diffq.settings import typed


@SETTINGS.register("binarydm")
@dataclass
class BinaryDMTrainConfig:
    """BinaryDM's progressive initialisation (``finetune.binarydm``, recipe ``binarydm``)."""

    progressive: bool = True  # binarise group by group from the middle outwards (inputs quantized with their layer)
    progressive_steps: int = 1  # steps per group (the released code: one training step per group)


def settings_of(ft: Mapping[str, Any]) -> BinaryDMTrainConfig:
    """The typed ``finetune.binarydm`` settings of a finetuning config."""
    return typed(BinaryDMTrainConfig, ft.get("binarydm"), "finetune.binarydm")


@RECIPES.register("binarydm")
class BinaryDM(Recipe):
    """Progressive binarisation stages, then the full QAT stage."""

    def check(self, ft: Mapping[str, Any]) -> None:  # noqa: D102
        b = settings_of(ft)
        if b.progressive and b.progressive_steps < 1:
            raise ConfigError(f"finetune.binarydm.progressive_steps must be at least 1 (got "
                              f"{b.progressive_steps}; the code's is 1), or set progressive=false")

    def stages(self, ctx: RecipeContext) -> list[Stage]:  # noqa: D102
        ft = ctx.ft
        plan = plan_selection(ctx.layers, ctx.specs, ft["train"], ROLES, ctx.attn_names, ctx.attn_static,
                              model=ctx.model)
        b = settings_of(ft)
        if not b.progressive:
            return [Stage("qat", plan, dict(ft))]
        quantized = {s.name for s in ctx.specs if s.quantized}
        groups = [[n for n in g if n in quantized] for g in middle_out_groups(ctx.model)]
        groups = [g for g in groups if g]
        per = int(b.progressive_steps)
        rest = int(ft["steps"]) - per * len(groups)
        if rest < 1:
            raise ConfigError(f"finetune.steps={ft['steps']} leaves no steps after the progressive initialisation "
                              f"({len(groups)} groups x {per} steps): raise finetune.steps")
        init = {**ft, "steps": per, "eval_every": 0, "keep": "last"}
        on: list[str] = []
        stages = []
        for k, group in enumerate(groups):
            on = on + group
            stages.append(Stage(f"progressive{k}", plan, init, quantized=list(on)))
        stages.append(Stage("qat", plan, {**ft, "steps": rest}))
        return stages
