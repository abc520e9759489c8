"""BinaryDM's training: progressive initialisation, then QAT of the whole binarised model.

With ``finetune.binarydm.progressive``, the quantizable layers are grouped from the middle of the
network outwards (:func:`diffq.levels.middle_out_groups`: the UNet's lowest-resolution level first,
a transformer's middle blocks first); stage ``k`` binarises groups ``0..k`` (the rest compute in
floating point, activations too) and trains what ``finetune.train`` selects in them for
``progressive_steps`` steps; the last stage turns every quantizer on (activations included) and
trains the whole selection for the remaining steps. Without it: one stage, as ``plain``. The loss
is the engine's (distillation and/or the diffusion loss on images) plus ``finetune.extra_losses``
(BinaryDM's LRM: ``{name: lrm, weight: 1e-4, names: <blocks>}``).
"""
from __future__ import annotations

from typing import Any, Mapping

from diffq.errors import ConfigError
from diffq.finetune.recipes import RECIPES, Recipe, RecipeContext, Stage
from diffq.finetune.select import plan_selection
from diffq.levels import middle_out_groups
from diffq.roles import ROLES


@RECIPES.register("binarydm")
class BinaryDM(Recipe):
    """Progressive binarisation stages, then the full QAT stage."""

    def check(self, ft: Mapping[str, Any]) -> None:  # noqa: D102
        if ft["binarydm"]["progressive"] and ft["binarydm"]["progressive_steps"] < 1:
            raise ConfigError("finetune.binarydm.progressive_steps must be at least 1 (or progressive=false)")

    def stages(self, ctx: RecipeContext) -> list[Stage]:  # noqa: D102
        ft = ctx.ft
        plan = plan_selection(ctx.layers, ctx.specs, ft["train"], ROLES, ctx.attn_names, ctx.attn_static)
        if not ft["binarydm"]["progressive"]:
            return [Stage("qat", plan, dict(ft))]
        quantized = {s.name for s in ctx.specs if s.quantized}
        groups = [[n for n in g if n in quantized] for g in middle_out_groups(ctx.model)]
        groups = [g for g in groups if g]
        per = int(ft["binarydm"]["progressive_steps"])
        rest = int(ft["steps"]) - per * len(groups)
        if rest < 1:
            raise ConfigError(f"finetune.steps={ft['steps']} leaves no steps after the progressive initialisation "
                              f"({len(groups)} groups x {per} steps): raise finetune.steps")
        stages, on = [], []
        for k, group in enumerate(groups):
            on = on + group
            sub = {n: kinds for n, kinds in plan.items() if n in on}
            if sub:
                stages.append(Stage(f"progressive{k}", sub, {**ft, "steps": per}, quantized=list(on), acts=False))
        stages.append(Stage("qat", plan, {**ft, "steps": rest}))
        return stages
