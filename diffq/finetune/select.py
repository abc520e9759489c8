"""What finetuning trains, chosen with the bit-config grammar's matchers.

``finetune.train`` is an ordered list of rules ``{roles, names, kinds}``; like ``quant.rules``, a
rule matches a layer when its roles (if any) contain the layer's role and one of its name globs
(if any) matches, and the last matching rule sets the layer's ``kinds``:

- ``weight`` / ``bias``: the layer's FP weight (trained through the quantizer's straight-through
  estimator) and bias;
- ``weight_scale``: the weight quantizer's scale, learned (LSQ) or, with ``weight_scale="follow"``,
  recomputed from the latent weight at every forward (BitNet b1.58); a binary format's sigma is
  always learned;
- ``act_scale``: the input quantizer's step size (LSQ); on attention modules (matched by name)
  the q/k/v/softmax quantizers' step sizes;
- ``lora``: a low-rank FP adapter, with ``lora_mode="merge"`` added to the weight before
  quantization and merged into it by :meth:`Selection.finish`, with ``lora_mode="side"`` a branch
  beside the quantized weight that :meth:`Selection.finish` keeps, cast to the layer's dtype
  (see :mod:`diffq.finetune.lora`);
- ``other``: the parameters of the modules outside the quantizable layers (norms, embeddings,
  learned positions: every parameter of the denoiser no other kind reaches). These modules have
  no role; a rule matches them by its name globs, or by having no matcher (:func:`plan_other`).

Everything else has ``requires_grad=False``. The FP teacher is the same model in
:func:`~diffq.model_quant.float_mode`; only tensors whose value training changes (trained weights
and biases) keep an FP copy for it. A learned rounding (BRECQ / AdaRound before finetuning) is held: its up/down
bits stay fixed while the FP weight trains underneath, so codes move when a weight crosses a grid
point (see :func:`_make_live`), and :meth:`Selection.finish` caches the result as the new learned rounding.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from diffq.attention import attention_modules
from diffq.errors import ConfigError
from diffq.finetune.lora import attach_adapter, attach_side, check_lora, merge_adapter
from diffq.layers import dequantize_layer_, is_quant_layer, iter_quantizers, quantize_layer_
from diffq.methods.adaround import HeldRounding
from diffq.model_quant import act_parts, float_mode
from diffq.quantizer import Quantizer
from diffq.spec import LayerSpec, Rule, parse_rules
from diffq.tensor_quant import TensorQuant
from diffq.timestep_groups import TimestepGroupedQuantizer

KINDS = ("weight", "bias", "weight_scale", "act_scale", "lora", "other")
WEIGHT_SCALE_MODES = ("learn", "follow")


def parse_train_rules(rules: Sequence[Mapping[str, Any]], valid_roles: Sequence[str]) -> list[tuple[Rule, tuple]]:
    """The rules with their kinds (ConfigError for an unknown kind, role or bad regex)."""
    parsed = parse_rules([{"roles": r.get("roles"), "names": r.get("names")} for r in rules], valid_roles,
                         "finetune.train")
    out = []
    for i, (rule, r) in enumerate(zip(parsed, rules)):
        kinds = tuple(r.get("kinds") or ())
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ConfigError(f"finetune.train[{i}]: unknown kind(s) {bad}; use any of {list(KINDS)}")
        out.append((rule, kinds))
    return out


def _learnable_scale(tq: TensorQuant | None, kind: str) -> bool:
    """Whether a quantizer built from ``tq`` has a static scale (or a binary sigma) to train."""
    if tq is None:
        return False
    fmt = tq.build_format()
    if fmt is None or fmt.block_size:
        return False
    names = fmt.param_names(tq.symmetric)
    if "sigma" in names:
        return True
    dynamic = kind == "act" and (tq.dynamic or tq.granularity.split(":")[0] in ("token", "group", "block"))
    return names[0] == "scale" and not dynamic


def _viable(kind: str, spec: LayerSpec, module: nn.Module) -> bool:
    quantized = spec.quantized
    if kind == "other":  # modules outside the layers only (plan_other)
        return False
    if kind == "bias":
        return getattr(module, "bias", None) is not None
    if kind == "weight_scale":
        return quantized and _learnable_scale(spec.weight, "weight")
    if kind == "act_scale":
        return quantized and _learnable_scale(spec.act, "act")
    return True


def plan_selection(layers: Mapping[str, tuple[str, nn.Module]], specs: Sequence[LayerSpec],
                   rules: Sequence[Mapping[str, Any]], valid_roles: Sequence[str],
                   attn_names: Sequence[str] = (), attn_static: bool = False,
                   model: nn.Module | None = None) -> dict[str, tuple[str, ...]]:
    """``{layer, attention or other module name: kinds it trains}``, before anything is trained
    (``model``: the denoiser, whose modules outside ``layers`` the kind ``other`` selects).

    Kinds a layer cannot train (a bias it lacks, the step size of a dynamic or unquantized input)
    are dropped; ConfigError when nothing is left, so a bad selection stops before calibration."""
    parsed = parse_train_rules(rules, valid_roles)
    by_name = {s.name: s for s in specs}
    plan: dict[str, tuple[str, ...]] = {}
    for name, (role, module) in layers.items():
        kinds: tuple[str, ...] = ()
        for rule, k in parsed:
            if rule.matches(name, role):
                kinds = k
        kinds = tuple(k for k in kinds if _viable(k, by_name[name], module))
        if kinds:
            plan[name] = kinds
    for name in attn_names if attn_static else ():
        kinds = ()
        for rule, k in parsed:
            if not rule.roles and rule.names and rule.matches(name, ""):
                kinds = tuple(x for x in k if x == "act_scale")
        if kinds:
            plan[name] = kinds
    if model is not None:
        plan.update(plan_other(model, layers, rules, valid_roles))
    if not plan:
        shown = [{"roles": list(r.roles), "names": list(r.names), "kinds": list(k)} for r, k in parsed]
        raise ConfigError(f"finetune.train selects nothing to train: {shown} match no layer with a trainable "
                          "part (see spec.txt for the layers' names, roles and formats; act_scale needs a static "
                          "input quantizer, weight_scale a scaled weight format)")
    return plan


def plan_other(model: nn.Module, layers: Mapping[str, Any], rules: Sequence[Mapping[str, Any]],
               valid_roles: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``{module name: ("other",)}`` for the modules of ``model`` holding parameters of their own outside
    the quantizable ``layers`` and the quantizers (norms, embeddings...) whose last matching rule (by
    name: these modules have no role) has the kind ``other``; ConfigError for ``other`` on a rule with roles."""
    parsed = parse_train_rules(rules, valid_roles)
    for i, (rule, kinds) in enumerate(parsed):
        if "other" in kinds and rule.roles:
            raise ConfigError(f"finetune.train[{i}]: kind other trains the modules outside the quantizable layers, "
                              "which have no role: match them with names (or no matcher), not roles")
    owned = set(layers) | {n for n, m in model.named_modules() if isinstance(m, (Quantizer, TimestepGroupedQuantizer))}
    plan: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        if _within(name, owned) or next(module.parameters(recurse=False), None) is None:
            continue
        kinds: tuple[str, ...] = ()
        for rule, k in parsed:
            if rule.matches(name, ""):
                kinds = k
        if "other" in kinds:
            plan[name] = ("other",)
    return plan


def _within(name: str, owners: set[str]) -> bool:
    """Whether module ``name`` is one of ``owners`` or inside one."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in owners for i in range(1, len(parts) + 1))


@dataclass
class Selection:
    """The trainable parameters of a model by kind, the FP copies its teacher needs, and how to
    undo the set-up (:meth:`finish`)."""

    model: nn.Module
    plan: dict[str, tuple[str, ...]]
    groups: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    teacher: dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)
    converted: list[nn.Module] = field(default_factory=list)  # FP layers wrapped to carry an adapter or branch
    following: list[nn.Module] = field(default_factory=list)  # layers whose weight scale follows the weight
    held: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # held learned roundings' start values
    codes_moved: tuple[int, int] = (0, 0)  # after finish: held-rounding weights whose code moved, of all held

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter (kind by kind)."""
        return [p for ps in self.groups.values() for p in ps]

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by their names in the model (the checkpoint's keys)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def teacher_mode(self) -> Iterator[None]:
        """The model as its FP self: quantizers and adapters off, original weights in place."""
        saved = {p: p.data for p in self.teacher}
        with float_mode(self.model):
            try:
                for p, fp in self.teacher.items():
                    p.data = fp
                yield
            finally:
                for p, data in saved.items():
                    p.data = data

    def summary(self, total_params: int) -> dict[str, Any]:
        """Which layers train which kinds, and how many parameters that is."""
        n = sum(p.numel() for p in self.parameters)
        return {"layers": {k: list(v) for k, v in self.plan.items()}, "layers_trained": len(self.plan),
                "params": n, "params_by_kind": {k: sum(p.numel() for p in ps) for k, ps in self.groups.items()},
                "fraction": n / max(1, total_params),
                "teacher_copy_mb": sum(t.numel() * t.element_size() for t in self.teacher.values()) / 2**20}

    @torch.no_grad()
    def finish(self, release_teacher: bool = True) -> None:
        """Merge adapters (side branches stay, in their layer's dtype), stop training, and cache the
        quantized weights again; the teacher's FP copies are kept for a later stage with
        ``release_teacher=False``."""
        for _, q in iter_quantizers(self.model):
            if q.learnable or "sigma" in q.fmt.param_names(q.symmetric):
                q.set_params(**q.params())  # trained values rounded to what an export stores
        self.model.requires_grad_(False)
        for m in self.model.modules():
            if is_quant_layer(m):
                merge_adapter(m)
                if m in self.held:  # the held rounding's result is the learned rounding now
                    m.cache_weight(m.quantized_weight().detach().contiguous(), learned=True)
                    start = self.held.pop(m)
                    moved, total = self.codes_moved
                    self.codes_moved = (moved + int((m.weight_fq != start).sum()), total + start.numel())
                if m.side is not None:
                    m.side.to(m.weight.dtype)
                if m in self.following:  # store the scale the last forward computed
                    m.weight_quantizer.calibrate_weight(m.latent_weight())
                    m.weight_quantizer.follow_weight(False)
                if m.weight_quantizer is not None and not m.frozen:
                    m.freeze(keep_original=True)
        for m in self.converted:
            if m.side is None:  # a layer with a side branch stays wrapped (with no quantizers) to keep it
                dequantize_layer_(m)
        if release_teacher:
            self.teacher.clear()


def _keep_teacher(sel: Selection, p: nn.Parameter) -> None:
    if p not in sel.teacher:
        sel.teacher[p] = p.detach().clone()


def _make_live(sel: Selection, layer: nn.Module) -> None:
    """Quantize the weight at every forward again; a learned rounding is held (its up/down bits fixed,
    :class:`~diffq.methods.adaround.HeldRounding`) while the FP weight underneath may train, so a weight
    that moves past a grid point changes its code (QuEST's code)."""
    if not layer.frozen:
        return
    if layer.learned_rounding:
        sel.held[layer] = layer.weight_fq
        layer.hold_rounding(HeldRounding(layer.weight_quantizer, layer.latent_weight().detach(), layer.weight_fq))
    else:
        layer.unfreeze()


def _add(sel: Selection, kind: str, params: Sequence[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)
        sel.groups.setdefault(kind, []).append(p)


def select_trainable(model: nn.Module, plan: Mapping[str, tuple[str, ...]], lora_rank: int = 4,
                     lora_alpha: float = 4.0, seed: int = 0,
                     teacher: dict[nn.Parameter, torch.Tensor] | None = None,
                     weight_scale: str = "learn", lora_mode: str = "merge") -> Selection:
    """Set the model up to train what ``plan`` selects (see :func:`plan_selection`); all else frozen.
    ``teacher``: the FP copies an earlier stage kept (its trained tensors' original values), shared;
    ``weight_scale``: ``learn`` or ``follow``; ``lora_mode``: ``merge`` or ``side`` (see the module's docstring)."""
    if weight_scale not in WEIGHT_SCALE_MODES:
        raise ConfigError(f"unknown finetune.weight_scale {weight_scale!r}: use one of {', '.join(WEIGHT_SCALE_MODES)}")
    check_lora({"mode": lora_mode})
    live = {"weight", "weight_scale"} | ({"lora"} if lora_mode == "merge" else set())  # kinds that change Q(W)
    attach = attach_side if lora_mode == "side" else attach_adapter
    model.requires_grad_(False)
    sel = Selection(model, dict(plan), teacher=teacher if teacher is not None else {})
    modules = dict(model.named_modules())
    attn = attention_modules(model)
    gen = torch.Generator().manual_seed(seed)
    for name, kinds in plan.items():
        module = modules[name]
        if "other" in kinds:  # a module outside the quantizable layers: its own parameters (plan_other)
            own = list(module.parameters(recurse=False))
            for p in own:
                _keep_teacher(sel, p)
            _add(sel, "other", own)
            continue
        if name in attn:
            _add(sel, "act_scale", _attention_scales(module))
            continue
        if "lora" in kinds and not is_quant_layer(module):
            quantize_layer_(module, None, None)
            sel.converted.append(module)
        if is_quant_layer(module) and live & set(kinds):
            _make_live(sel, module)
        if "weight" in kinds:
            _keep_teacher(sel, module.weight)
            _add(sel, "weight", [module.weight])
        if "bias" in kinds:
            _keep_teacher(sel, module.bias)
            _add(sel, "bias", [module.bias])
        if "weight_scale" in kinds:
            q = module.weight_quantizer
            if weight_scale == "follow" and "scale" in q.fmt.param_names(q.symmetric):
                q.follow_weight()
                sel.following.append(module)
            else:
                _add(sel, "weight_scale", _learn(q))
        if "act_scale" in kinds:
            _add(sel, "act_scale", [p for q in act_parts(module.input_quantizer) for p in _learn(q)])
        if "lora" in kinds:
            _add(sel, "lora", list(attach(module, lora_rank, lora_alpha, gen).parameters()))
    return sel


def _learn(q: nn.Module) -> list[nn.Parameter]:
    """The quantizer's scale (or sigma) as float32 parameters: a half-precision step size's gradient,
    summed over every element it scales, overflows float16."""
    if not q.learnable and "sigma" not in q.fmt.param_names(q.symmetric):
        q.make_learnable()
    q.set_params(**{k: v.float() for k, v in q.params().items()})
    return list(q.parameters())


def _attention_scales(attn: nn.Module) -> list[nn.Parameter]:
    own = [getattr(attn, f"{which}_quantizer", None) for which in ("q", "k", "v", "softmax")]
    quantizers = [q for q in own if q is not None and not q.dynamic and q.needs_calibration]
    return [p for q in quantizers for leaf in act_parts(q) for p in _learn(leaf)]


__all__ = ["KINDS", "WEIGHT_SCALE_MODES", "Selection", "parse_train_rules", "plan_other", "plan_selection",
           "select_trainable"]
