"""The plain recipe: one stage training what ``finetune.train`` selects."""
from __future__ import annotations

from diffq.finetune.recipes import RECIPES, Recipe, RecipeContext, Stage
from diffq.finetune.select import plan_selection
from diffq.roles import ROLES


@RECIPES.register("plain")
class Plain(Recipe):
    """``finetune.train`` for ``finetune.steps`` steps with ``finetune.optim``."""

    def stages(self, ctx: RecipeContext) -> list[Stage]:  # noqa: D102
        plan = plan_selection(ctx.layers, ctx.specs, ctx.ft["train"], ROLES, ctx.attn_names, ctx.attn_static,
                              model=ctx.model)
        return [Stage(ctx.ft["name"], plan, dict(ctx.ft))]
