"""QuEST (Wang et al., ICCV 2025): selective finetuning of the temporal and the activation-sensitive
layers of a PTQ model against its FP self, data-free.

Stages (``finetune.quest.select``):

- ``temporal`` — TLA only: the per-block time-embedding projections (role ``time_proj``) and the
  adaLN modulation of DiTs / FLUX (``adanorm``); the global time-embedding MLP (``time_embed``) is
  left out as the paper does. Weights, biases and input step sizes, step-size lr
  ``quest.tla_act_scale_lr``;
- ``sensitive`` — CMA only: the sensitive layers' weights, biases and step sizes, plus the step
  sizes of every other static activation quantizer (attention matmuls included);
- ``both`` — TLA, then CMA (the paper; ``quest.tla_fraction`` of the steps go to TLA);
- ``all`` — TLA, then CMA with every layer's weights trained (the full-finetuning control).

The sensitive layers are the released choice (``quest.sensitive_roles``: the FFN for SD) or, with
``quest.sensitive=measured``, the ``quest.fraction`` of the candidate layers whose output SQNR drops
most when only their input is quantized (:mod:`diffq.finetune.sensitivity`, widths
``quest.sweep_bits``). Loss: ``layer_weight * L_stage + distill_weight * L_G`` (the paper's 1 and 2),
each an MSE to the FP model: the stage's own layers' outputs (TLA: the temporal layers, CMA: the sensitive ones, as the
released code hooks ``emb_layer`` in one and ``ff.net`` in the other), the denoiser's. The steps
split as the code's epochs do (``quest.tla_fraction``, 0.89). A learned rounding from the PTQ start is
held while the weights train (:class:`~diffq.methods.adaround.HeldRounding`), so codes can move.
Weight quantizers (scales) and zero points stay frozen: ``weight_scale`` is never selected and
LSQ trains the activation scale only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, List, Mapping

from diffq.errors import ConfigError
from diffq.finetune.recipes import RECIPES, SETTINGS, Recipe, RecipeContext, Stage
from diffq.finetune.select import plan_selection
from diffq.finetune.sensitivity import most_sensitive
from diffq.roles import ROLES
from diffq.settings import typed

log = logging.getLogger(__name__)

SELECTIONS = ("temporal", "sensitive", "both", "all")
SENSITIVE = ("released", "measured")
TRAIN = ["weight", "bias", "act_scale"]


@SETTINGS.register("quest")
@dataclass
class QuestConfig:
    """QuEST's selective finetuning (``finetune.quest``, recipe ``quest``)."""

    select: str = "both"  # temporal (TLA) | sensitive (CMA) | both (TLA then CMA) | all (TLA, then every layer)
    sensitive: str = "released"  # released (sensitive_roles) | measured (activation-bit sweep per layer)
    temporal_roles: List[str] = field(default_factory=lambda: ["time_proj", "adanorm"])
    sensitive_roles: List[str] = field(default_factory=lambda: ["ffn_up", "ffn_down"])  # the released choice (SD)
    fraction: float = 0.15  # measured: the most sensitive fraction of the candidate layers
    sweep_bits: List[int] = field(default_factory=lambda: [8, 6, 4])  # measured: ranked by SQNR at the lowest
    sweep_calls: int = 8  # measured: calibration calls each probe runs on
    tla_fraction: float = 0.3  # of finetune.steps spent in the TLA stage when both stages run
    tla_act_scale_lr: float = 1.0e-5  # step-size lr of the TLA stage (CMA: finetune.optim.act_scale_lr)
    layer_weight: float = 1.0  # weight of L_TLA and L_CMA (the denoiser's L_G: finetune.distill_weight)


def settings_of(ft: Mapping[str, Any]) -> QuestConfig:
    """The typed ``finetune.quest`` settings of a finetuning config."""
    return typed(QuestConfig, ft.get("quest"), "finetune.quest")


def check_quest(q: Mapping[str, Any] | QuestConfig) -> None:
    """ConfigError for QuEST settings that cannot work (before any model loads)."""
    q = typed(QuestConfig, q, "finetune.quest")
    if q.select not in SELECTIONS:
        raise ConfigError(f"unknown finetune.quest.select {q.select!r}: use one of {', '.join(SELECTIONS)}")
    if q.sensitive not in SENSITIVE:
        raise ConfigError(f"unknown finetune.quest.sensitive {q.sensitive!r}: use one of {', '.join(SENSITIVE)}")
    bad = [r for r in [*q.temporal_roles, *q.sensitive_roles] if r not in ROLES]
    if bad:
        raise ConfigError(f"finetune.quest: unknown role(s) {bad}; valid roles are {list(ROLES)}")
    if not 0 < q.fraction <= 1 or not 0 < q.tla_fraction < 1:
        raise ConfigError("finetune.quest.fraction must be in (0, 1] and finetune.quest.tla_fraction in (0, 1)")
    if q.sensitive == "measured" and not q.sweep_bits:
        raise ConfigError("finetune.quest.sensitive=measured needs finetune.quest.sweep_bits (e.g. [8, 6, 4])")


@RECIPES.register("quest")
class Quest(Recipe):
    """TLA and/or CMA stages as ``finetune.quest`` says."""

    def check(self, ft: Mapping[str, Any]) -> None:  # noqa: D102
        check_quest(settings_of(ft))

    def stages(self, ctx: RecipeContext) -> list[Stage]:  # noqa: D102
        q, ft = settings_of(ctx.ft), ctx.ft
        temporal = {"roles": list(q.temporal_roles)}
        sensitive = self._sensitive(ctx)
        runs_tla, runs_cma = q.select != "sensitive", q.select != "temporal"
        cma_layers = {} if q.select == "all" else sensitive  # {}: every layer

        def layer_loss(layers: Mapping[str, Any]) -> list[dict[str, Any]]:  # a stage's loss is over its own layers
            return [{"name": "layer_mse", "weight": q.layer_weight, **layers}] if q.layer_weight else []

        steps = int(ft["steps"])
        tla_steps = round(steps * q.tla_fraction) if runs_tla and runs_cma else steps * runs_tla
        stages = []
        if runs_tla:
            plan = self._plan(ctx, [{**temporal, "kinds": TRAIN}], "temporal")
            optim = {**ft["optim"], "act_scale_lr": q.tla_act_scale_lr}
            stages.append(Stage("tla", plan, {**ft, "steps": tla_steps, "optim": optim,
                                              "extra_losses": layer_loss(temporal)}))
        if runs_cma:
            rules = [{"names": ["*"], "kinds": ["act_scale"]}, {**cma_layers, "kinds": TRAIN}]
            plan = self._plan(ctx, rules, "sensitive")
            cma = {**ft, "steps": steps - tla_steps, "extra_losses": layer_loss(cma_layers)}
            stages.append(Stage("cma", plan, cma))
        if any(s.settings["steps"] < 1 for s in stages):
            raise ConfigError(f"finetune.steps={steps} leaves a QuEST stage without steps: raise finetune.steps or "
                              "change finetune.quest.tla_fraction")
        return stages

    @staticmethod
    def _plan(ctx: RecipeContext, rules: list[dict[str, Any]], what: str) -> dict[str, tuple[str, ...]]:
        try:
            return plan_selection(ctx.layers, ctx.specs, rules, ROLES, ctx.attn_names, ctx.attn_static)
        except ConfigError as e:
            raise ConfigError(f"QuEST's {what} selection trains nothing on this model ({e}); check "
                              f"finetune.quest.{what}_roles against the roles in spec.txt") from None

    @staticmethod
    def _sensitive(ctx: RecipeContext) -> dict[str, list[str]]:
        """Matchers of the sensitive layers: the released roles, or the measured layers' names."""
        q = settings_of(ctx.ft)
        if q.sensitive == "released":
            return {"roles": list(q.sensitive_roles)}
        temporal = set(q.temporal_roles)
        candidates = [s.name for s in ctx.specs if s.quantized and s.act is not None and not s.act.dynamic
                      and s.act.granularity.split(":")[0] in ("tensor", "channel") and s.role not in temporal]
        if not candidates:
            raise ConfigError("finetune.quest.sensitive=measured: no layer has a static input quantizer to sweep")
        if ctx.measure is None:  # before calibration: any candidate may be chosen
            return {"names": candidates}
        scores = ctx.measure(candidates, [int(b) for b in q.sweep_bits], int(q.sweep_calls))
        chosen = most_sensitive(scores, float(q.fraction))
        ctx.info["sensitivity"] = {"bits": list(q.sweep_bits), "sqnr_db": scores, "chosen": chosen}
        log.info("QuEST measured selection: the %d most activation-sensitive of %d layers: %s", len(chosen),
                 len(candidates), ", ".join(chosen))
        return {"names": chosen}
