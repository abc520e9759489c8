"""MixDQ (Zhao et al., ECCV 2024): per-layer mixed precision from metric-decoupled sensitivity and
integer programming, with BOS-aware cross-attention K/V layers (a rule option, ``bos: true``).

1. Every candidate bit-width's quantizer parameters are computed once (weights from the weight,
   activations in one calibration pass per width), so a bit plan is pure data.
2. Sensitivity of a layer at a width = a metric with **only that layer** quantized, weights and
   activations separately: SSIM of generated images vs FP (same seeds, a near-global window) for
   the content group (FFN and cross-attention layers by default), SQNR of the denoiser output vs
   FP for the quality group, on ``num_prompts`` search prompts whose seeds are apart from the
   evaluation's and ``sqnr_calls`` denoiser calls of their FP trajectories. Cached by everything
   that determines it.
3. In each group, the ``fp_act_fraction`` most activation-sensitive layers by the group's own metric
   keep FP inputs; they count at 16 bits inside the activation budget, and the other inputs get a
   lower average so that the whole model stays at or under ``act_bits``.
4. Four integer programs (weights/activations x content/quality,
   :func:`diffq.bit_allocation.allocate_bits`) each keep their group's average in ``[target - 2
   band, target]``; the budget is split between the groups by a ratio ``k`` and swept over ``k`` x
   ``budget_offsets`` into a family of plans, as the code does: the weight plans first, the one
   whose images (activations FP) are closest to FP kept; then the activation plans given it.
5. The chosen plan is installed, the specs updated (``spec.txt``, export) and written as a reusable
   rule list. ``control: true`` installs uniform ``weight_bits``/``act_bits`` with exactly the
   plan's FP inputs instead (what the FP inputs alone give).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from diffq.bit_allocation import allocate_bits, feasible_range, split_budget
from diffq.cache import cache_key
from diffq.calib import CalibSample
from diffq.errors import ConfigError
from diffq.eval.cost import FP_BITS, count_layer_inputs
from diffq.eval.fidelity import SSIM_WINDOWS
from diffq.methods import METHODS, SETTINGS, MethodContext, rtn
from diffq.methods.common import calibrate_activations, split_shortcuts
from diffq.methods.mixdq_probe import SEARCH_STREAM, Candidates, Probe, measure, write_sensitivity
from diffq.model_quant import prepare
from diffq.settings import typed
from diffq.spec import LayerSpec, Rule

log = logging.getLogger(__name__)

GROUPS = ("content", "quality")


@SETTINGS.register("mixdq")
@dataclass
class MixDQConfig:
    """MixDQ's mixed-precision search (``quant.mixdq``, method ``mixdq``)."""

    weight_bits: float = 8.0  # target parameter-weighted average weight bits
    weight_mb: Optional[float] = None  # or a memory budget for the quantized weights (MB), replacing weight_bits
    act_bits: float = 8.0  # target element-weighted average activation bits
    weight_bits_content: List[int] = field(default_factory=lambda: [2, 4, 8])
    weight_bits_quality: List[int] = field(default_factory=lambda: [4, 8])
    act_bits_candidates: List[int] = field(default_factory=lambda: [4, 8])
    # the most activation-sensitive layers of each group (content by its SSIM, quality by its SQNR, at
    # the lowest candidate width) keep FP inputs: ceil(fraction x group size) per group; they count
    # at 16 bits inside act_bits, the rest are lowered to keep the whole at or under it
    fp_act_fraction: float = 0.01
    content_roles: List[str] = field(default_factory=lambda: ["ffn_up", "ffn_down", "cross_attn_q", "cross_attn_kv"])
    content_names: List[str] = field(default_factory=lambda: ["*.attn2.to_out.*"])
    band: float = 0.02  # each program's average bits lie in [target - 2 band, target]: never over budget
    # the code's family: content/quality budget ratios k x budgets target + offset (linspace(target - 0.3,
    # target, 10)); weights are chosen first (activations FP), then activations given those weights
    k_weight: List[float] = field(default_factory=lambda: [round(float(x), 4) for x in np.linspace(0.46, 1.36, 10)])
    k_act: List[float] = field(default_factory=lambda: [round(float(x), 4) for x in np.linspace(0.94, 1.09, 20)])
    budget_offsets: List[float] = field(default_factory=lambda: [round(float(x), 4) for x in np.linspace(-0.3, 0, 10)])
    num_prompts: int = 32  # search prompts (seeds apart from the evaluation's) scoring content and choosing plans
    plan_prompts: int = 8  # the first search prompts whose images choose among the plans (the code: 1 image)
    sqnr_calls: int = 32  # denoiser calls of the search prompts' FP trajectories the quality group's SQNR runs on
    ssim_window: str = "global"  # content SSIM window: global (the code's 511 px on 512) | local (11 px Gaussian)
    decoupled: bool = True  # SSIM for the content group, SQNR for the quality group (false: SQNR for all)
    control: bool = False  # the control: uniform weight_bits / act_bits with exactly the plan's FP inputs
    plan: Optional[str] = None  # a written mixdq_plan.yaml: reuse its bits, skip the search


def settings_of(mc: Mapping[str, Any] | MixDQConfig | None) -> MixDQConfig:
    """The typed settings of a (partial) ``quant.mixdq`` section."""
    return typed(MixDQConfig, mc, "quant.mixdq")


def content_names(specs: Sequence[LayerSpec], mc: Mapping[str, Any] | MixDQConfig) -> set[str]:
    """The quantized layers of the content group: those with a ``content_roles`` role or a name
    matching ``content_names``."""
    mc = settings_of(mc)
    rules = [Rule(0, roles=tuple(mc.content_roles))] * bool(mc.content_roles)
    rules += [Rule(0, names=tuple(mc.content_names))] * bool(mc.content_names)
    return {s.name for s in specs if s.quantized and any(r.matches(s.name, s.role) for r in rules)}


def weight_target(mc: Mapping[str, Any] | MixDQConfig, specs: Sequence[LayerSpec]) -> float:
    """The average weight bits asked for (``weight_mb`` turned into bits over the quantized weights)."""
    mc = settings_of(mc)
    if mc.weight_mb:
        params = sum(s.params for s in specs if s.quantized and s.weight is not None)
        return float(mc.weight_mb) * 8 * 2**20 / params
    return float(mc.weight_bits)


def check_budget(specs: Sequence[LayerSpec], mc: Mapping[str, Any] | MixDQConfig) -> None:
    """ConfigError, before calibration, for candidate widths the formats cannot take, a weight or
    activation budget out of reach, or a control without one uniform width."""
    mc = settings_of(mc)
    ws = [s for s in specs if s.quantized and s.weight is not None]
    acts = [s for s in specs if s.quantized and s.act is not None]
    for key, tq in (("weight_bits_content", ws), ("weight_bits_quality", ws), ("act_bits_candidates", acts)):
        for b in getattr(mc, key) if tq else ():
            try:
                replace(tq[0].weight if key.startswith("weight") else tq[0].act, bits=b).build_format()
            except ConfigError as e:
                raise ConfigError(f"quant.mixdq.{key}={list(getattr(mc, key))}: {e}") from None
    if mc.ssim_window not in SSIM_WINDOWS:
        raise ConfigError(f"quant.mixdq.ssim_window={mc.ssim_window!r}: use one of {list(SSIM_WINDOWS)}")
    content = content_names(specs, mc)
    cands = sorted({*mc.weight_bits_content, *mc.weight_bits_quality})
    allowed = np.array([[b in (mc.weight_bits_content if s.name in content else mc.weight_bits_quality)
                         for b in cands] for s in ws])
    lo, hi = feasible_range([s.params for s in ws], cands, allowed)
    target = weight_target(mc, specs)
    if not lo - mc.band <= target <= hi + mc.band:
        raise ConfigError(f"quant.mixdq: an average of {target:.3f} weight bits is out of reach; with the candidate "
                          f"widths the average lies in [{lo:.3f}, {hi:.3f}]")
    a = mc.act_bits_candidates
    if not min(a) <= mc.act_bits:
        raise ConfigError(f"quant.mixdq.act_bits={mc.act_bits} is out of reach of the candidates {list(a)}")
    if mc.control and (target != int(target) or mc.act_bits != int(mc.act_bits)):
        raise ConfigError(f"quant.mixdq.control uses one uniform width: weight_bits ({target:g}) and act_bits "
                          f"({mc.act_bits:g}) must be whole numbers")


def fp_inputs(sens: Mapping[str, Any], content: set[str], mc: Mapping[str, Any] | MixDQConfig) -> dict[str, list[str]]:
    """Per group, the ``ceil(fp_act_fraction x group size)`` layers whose input is the most sensitive
    at the lowest candidate width by the group's own metric (the lowest SSIM or SQNR)."""
    mc = settings_of(mc)
    low, frac = min(mc.act_bits_candidates), float(mc.fp_act_fraction)
    out = {}
    for g in GROUPS:
        names = sorted(n for n in sens if sens[n]["act"] and (n in content) == (g == "content"))
        keep = math.ceil(frac * len(names) - 1e-9) if frac > 0 else 0
        out[g] = sorted(names, key=lambda n: (sens[n]["act"][low], n))[:keep]
    return out


def rest_budget(counts: Mapping[str, int], quantized: Sequence[str], act_bits: float) -> float:
    """The average width the quantized inputs may take so that the whole model's input average (every
    other input at 16 bits: skipped layers, FP by rule, FP-kept) is at most ``act_bits``."""
    total, rest = sum(counts.values()), sum(counts[n] for n in quantized)
    return (act_bits * total - FP_BITS * (total - rest)) / max(rest, 1)


def model_act_average(counts: Mapping[str, int], bits: Mapping[str, int | None]) -> float:
    """The element-weighted input width over every layer, FP inputs at 16 bits (as the cost report counts)."""
    total = sum(counts.values())
    return sum(n * (bits.get(name) or FP_BITS) for name, n in counts.items()) / max(total, 1)


def group_plan(what: str, sens: Mapping[str, Any], names: Sequence[str], content: set[str],
               sizes: Mapping[str, int], cands: Mapping[str, list], target: float, k: float, band: float
               ) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """One plan: the budget split by ``k`` (one group alone takes it all), each group's integer
    program with its average in ``[target - 2 band, target]`` (ConfigError when out of reach)."""
    groups = {g: [n for n in names if (n in content) == (g == "content")] for g in GROUPS}
    size = {g: sum(sizes[n] for n in ns) for g, ns in groups.items()}
    if all(size.values()):
        bq, bc = split_budget(target, size["content"] / size["quality"], k)
    else:
        bq = bc = target
    bits: dict[str, int] = {}
    programs = []
    for g, b in (("quality", bq), ("content", bc)):
        ns = groups[g]
        if not ns:
            continue
        c = sorted(cands[g])
        b = min(b, max(c))  # a group cannot spend more than its widest width
        score = np.array([[sens[n][what][x] for x in c] for n in ns])
        alloc = allocate_bits([sizes[n] for n in ns], score, c, b - band, band, what=f"quant.mixdq {g} {what}s")
        bits.update({n: int(x) for n, x in zip(ns, alloc.bits)})
        programs.append({"group": g, "target": round(b, 4), "status": alloc.status, "score": round(alloc.score, 6),
                         "average": round(alloc.average, 4)})
    return bits, programs


def family(what: str, sens: Mapping[str, Any], names: Sequence[str], content: set[str], sizes: Mapping[str, int],
           cands: Mapping[str, list], top: float, ks: Sequence[float],
           mc: Mapping[str, Any] | MixDQConfig) -> list[dict[str, Any]]:
    """The distinct plans of ``ks`` x budgets ``top + budget_offsets`` (infeasible splits skipped, as
    the code skips them), each with the (k, budget) pairs that gave it and its size-weighted average."""
    mc = settings_of(mc)
    plans: dict[tuple, dict[str, Any]] = {}
    for k, off in itertools.product(ks, mc.budget_offsets):
        try:
            bits, programs = group_plan(what, sens, names, content, sizes, cands, top + off, k, mc.band)
        except ConfigError as e:
            log.debug("mixdq %s plan k=%s budget=%.3f skipped: %s", what, k, top + off, e)
            continue
        key = tuple(sorted(bits.items()))
        if key not in plans:
            avg = sum(sizes[n] * b for n, b in bits.items()) / max(1, sum(sizes[n] for n in bits))
            plans[key] = {"bits": bits, "programs": programs, "average": round(avg, 4), "k_budget": []}
        plans[key]["k_budget"].append([round(float(k), 4), round(top + off, 4)])
    if not plans:
        raise ConfigError(f"quant.mixdq: no {what} plan of the family meets its budget ({top:.3f} bits on average); "
                          "move quant.mixdq.weight_bits / act_bits inside the candidates' range, lower "
                          "fp_act_fraction or widen quant.mixdq.band")
    return list(plans.values())


def choose(plans: list[dict[str, Any]], install_plan: Any, probe: Probe, n: int, what: str) -> dict[str, Any]:
    """The plan whose images of the first ``n`` search prompts are closest to FP (each plan's
    ``image_mse`` recorded)."""
    for plan in tqdm(plans, desc=f"mixdq {what} plans", unit="plan"):
        install_plan(plan)
        plan["image_mse"] = probe.image_mse(n)
    best = min(plans, key=lambda p: p["image_mse"])
    log.info("mixdq: %d distinct %s plans, chosen average %.3f (image MSE %.3g)", len(plans), what, best["average"],
             best["image_mse"])
    return best


def install(cands: Candidates, plan: Mapping[str, Any]) -> None:
    """Set every layer's weight and input widths as the plan says."""
    for name, b in plan["weight"].items():
        cands.set_weight(name, b)
    for name, b in plan["act"].items():
        cands.set_act(name, b)


def plan_rules(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The plan as ``quant.rules`` entries (one per layer), to append to a preset's rules."""
    names = sorted({*plan["weight"], *plan["act"]})
    rules = []
    for n in names:
        rule: dict[str, Any] = {"names": [n]}
        if n in plan["weight"]:
            rule["weight"] = {"bits": plan["weight"][n]}
        if n in plan["act"]:
            rule["act"] = {"format": "none"} if plan["act"][n] is None else {"bits": plan["act"][n]}
        rules.append(rule)
    return rules


def sensitivities(cands: Candidates, probe: Probe, calib: Sequence[CalibSample], ssim_layers: set[str],
                  scope: Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
    """Every layer's sensitivity at every candidate width (:func:`measure`), from the cache when a run
    with the same model, calibration, prompts, sampling and ``scope`` (specs, widths, groups) measured it;
    returns them and the cache file."""
    ctx = probe.ctx
    key = cache_key({"model": ctx.model_key, "specs": scope["specs"], "calib": [s.step for s in calib],
                     "calib_sums": [round(float(c.kwargs[k].double().sum()), 6) for c in calib[:4]
                                    for k in sorted(c.kwargs) if torch.is_tensor(c.kwargs[k])],
                     "prompts": probe.prompts, "seed": ctx.seed,
                     "sampling": {k: v for k, v in asdict(ctx.sampling).items() if k != "batch_size"},
                     "search": [SEARCH_STREAM, len(probe.calls)], "wbits": scope["wbits"], "abits": scope["abits"],
                     "mixdq": scope["mixdq"]})
    path = Path(ctx.cache_dir).expanduser() / "mixdq" / f"{key}.json"
    if path.exists():
        log.info("mixdq sensitivities loaded from %s", path)
        return {n: {w: {int(b): v for b, v in d.items()} for w, d in k.items()} for n, k in
                json.loads(path.read_text()).items()}, path
    sens = measure(cands, probe, ssim_layers, scope["wbits"], scope["abits"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sens))
    return sens, path


def search_plan(cands: Candidates, probe: Probe, sens: Mapping[str, Any], content: set[str],
                counts: Mapping[str, int], by: Mapping[str, LayerSpec], wtarget: float,
                mc: MixDQConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plan ``{"weight": {layer: bits}, "act": {layer: bits or None}}`` (the control's uniform one,
    or the best of the weight plans, then of the activation plans given it) and what the search reports."""
    fp = fp_inputs(sens, content, mc)
    fp_set = {n for g in GROUPS for n in fp[g]}
    act_names = [n for n in cands.acts if n not in fp_set]
    rest_max = rest_budget(counts, act_names, float(mc.act_bits))
    if rest_max < min(mc.act_bits_candidates) and not mc.control:
        raise ConfigError(f"quant.mixdq.act_bits={mc.act_bits:g}: with {len(fp_set)} FP-kept inputs and the layers "
                          f"left FP at 16 bits, the quantized inputs would need {rest_max:.2f} bits on average, under "
                          f"the narrowest candidate {min(mc.act_bits_candidates)}; raise act_bits or lower "
                          "quant.mixdq.fp_act_fraction")
    stats: dict[str, Any] = {"control": bool(mc.control), "content_layers": len(content), "fp_inputs": fp,
                             "act_budget": {"target": float(mc.act_bits), "quantized_inputs_max": round(rest_max, 4)}}
    fp_none: dict[str, int | None] = dict.fromkeys(fp_set)
    if mc.control:  # uniform widths, the plan's FP inputs
        return {"weight": dict.fromkeys(cands.weights, int(wtarget)),
                "act": {**dict.fromkeys(act_names, int(mc.act_bits)), **fp_none}}, stats
    sizes_w = {n: by[n].params for n in cands.weights}
    cw = {"content": mc.weight_bits_content, "quality": mc.weight_bits_quality}
    wplans = family("weight", sens, list(cands.weights), content, sizes_w, cw, wtarget, mc.k_weight, mc)
    for n in cands.acts:  # weight plans are scored with FP activations, as the code does
        cands.set_act(n, None)
    wbest = choose(wplans, lambda p: install(cands, {"weight": p["bits"], "act": {}}), probe, mc.plan_prompts,
                   "weight")
    install(cands, {"weight": wbest["bits"], "act": {}})
    ca = dict.fromkeys(GROUPS, list(mc.act_bits_candidates))
    aplans = family("act", sens, act_names, content, counts, ca, rest_max, mc.k_act, mc)
    abest = choose(aplans, lambda p: install(cands, {"weight": {}, "act": {**p["bits"], **fp_none}}), probe,
                   mc.plan_prompts, "activation")
    for what, plans, chosen in (("weight", wplans, wbest), ("act", aplans, abest)):
        stats[f"{what}_plans"] = [{k: v for k, v in p.items() if k != "bits"} for p in plans]
        stats.setdefault("chosen", {})[what] = chosen["k_budget"][0]
    return {"weight": wbest["bits"], "act": {**abest["bits"], **fp_none}}, stats


def finish(model: nn.Module, layers: Mapping[str, nn.Module], specs: Sequence[LayerSpec], cands: Candidates,
           best: Mapping[str, Any], calib: Sequence[CalibSample], device: torch.device, dtype: torch.dtype) -> None:
    """Install the chosen plan, drop the quantizers of FP-kept inputs (as the written plan's rules do),
    calibrate the final widths' ranges through the final weights and write the widths into ``specs``."""
    install(cands, best)
    for name, b in best["act"].items():
        if b is None:
            layers[name].input_quantizer = None
    calibrate_activations(model, calib, device, dtype)
    for s in specs:
        if s.name in best["weight"]:
            s.weight = replace(s.weight, bits=best["weight"][s.name])
        if s.name in best["act"]:
            s.act = None if best["act"][s.name] is None else replace(s.act, bits=best["act"][s.name])


@METHODS.register("mixdq")
def apply(model: nn.Module, specs: Sequence[LayerSpec], calib: Sequence[CalibSample], cfg: Any, *,
          device: torch.device, dtype: torch.dtype, context: MethodContext | None = None) -> dict[str, Any]:
    """Quantize ``model`` in place with MixDQ's mixed-precision plan (see the module docstring)."""
    mc = settings_of(cfg.get("mixdq"))
    if mc.plan:  # a written plan: its rules are in the specs, calibrate them as RTN does
        return rtn.apply(model, specs, calib, cfg, device=device, dtype=dtype)
    if context is None or context.pipe is None:
        raise ConfigError(needs_pipeline(cfg))
    check_budget(specs, mc)
    layers = prepare(model, specs, cfg.get("attn"))
    n_splits = split_shortcuts(model, calib, device, dtype) if cfg.get("split_shortcut") else 0
    by = {s.name: s for s in specs if s.name in layers}
    content = content_names(specs, mc)
    ssim_layers = content if mc.decoupled else set()  # not decoupled: SQNR for every layer (the ablation)
    wtarget = weight_target(mc, specs)
    wbits = {n: sorted({*(mc.weight_bits_content if n in content else mc.weight_bits_quality),
                        *([int(wtarget)] if mc.control else [])}) for n in by}
    abits = sorted({*mc.act_bits_candidates, *([int(mc.act_bits)] if mc.control else [])})
    cands = Candidates(layers, by, wbits, abits, calib, model, device, dtype)
    prompts = [context.prompts[i % len(context.prompts)] for i in range(mc.num_prompts)]
    probe = Probe(model, context, prompts, mc.sqnr_calls, mc.ssim_window, device, dtype)
    scope = {"specs": [s.to_dict() for s in by.values()], "wbits": wbits, "abits": abits,
             "mixdq": {k: getattr(mc, k) for k in ("content_roles", "content_names", "ssim_window", "decoupled")}}
    sens, path = sensitivities(cands, probe, calib, ssim_layers, scope)
    counter = count_layer_inputs(model, [s.name for s in specs], calib[0], device, dtype)
    counts = {s.name: counter.counts.get(s.name, 0) for s in specs}  # a layer the call never reaches: 0
    best, stats = search_plan(cands, probe, sens, content, counts, by, wtarget, mc)
    stats["sensitivity_cache"] = str(path)
    stats["search"] = {"prompts": len(prompts), "sqnr_calls": len(probe.calls), "seed_stream": SEARCH_STREAM,
                       "ssim_window": mc.ssim_window, "plan_prompts": min(mc.plan_prompts, len(prompts))}
    finish(model, layers, specs, cands, best, calib, device, dtype)
    if context.out_dir is not None:
        write_sensitivity(sens, content, ssim_layers, context.out_dir)
        (context.out_dir / "mixdq_plan.yaml").write_text(yaml.safe_dump({"rules": plan_rules(best)}, sort_keys=False))
    stats["weight_bits_avg"] = sum(by[n].params * b for n, b in best["weight"].items()) / max(
        1, sum(by[n].params for n in best["weight"]))
    stats["act_bits_avg"] = model_act_average(counts, best["act"])
    log.info("mixdq%s: weights %.3f bits on average, inputs %.3f (budget %g, FP inputs %s)",
             " control" if mc.control else "", stats["weight_bits_avg"], stats["act_bits_avg"], mc.act_bits,
             sorted(n for n, b in best["act"].items() if b is None))
    return {"layers_quantized": len(layers), "shortcut_splits": n_splits, "mixdq": stats}


def check_specs(specs: Sequence[LayerSpec], cfg: Mapping[str, Any]) -> None:
    """The job's check before calibration: the budget is reachable (nothing to check with a written plan)."""
    mc = settings_of(cfg.get("mixdq"))
    if not mc.plan:
        check_budget(specs, mc)


def needs_pipeline(cfg: Mapping[str, Any]) -> str | None:
    """Why this config needs the pipeline, not the bare denoiser (None with a written plan)."""
    if settings_of(cfg.get("mixdq")).plan:
        return None
    return ("quant.method=mixdq generates images to measure sensitivity: pass the pipeline (not the bare denoiser) "
            "or a written plan (quant.mixdq.plan=<run>/mixdq_plan.yaml)")


apply.check_specs = check_specs
apply.needs_pipeline = needs_pipeline
