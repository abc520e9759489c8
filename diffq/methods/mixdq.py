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

import contextlib
import csv
import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from diffq.bit_allocation import allocate_bits, feasible_range, split_budget
from diffq.cache import cache_key
from diffq.calib import CalibSample
from diffq.calib.capture import capture_trajectories
from diffq.errors import ConfigError
from diffq.eval.cost import FP_BITS, count_layer_inputs
from diffq.eval.fidelity import SSIM_WINDOWS, sqnr, ssim
from diffq.methods import METHODS, SETTINGS, MethodContext, rtn
from diffq.methods.common import calibrate_activations, split_shortcuts
from diffq.model_quant import act_parts, float_mode, prepare
from diffq.models import generate_images, sample_seeds
from diffq.settings import typed
from diffq.spec import LayerSpec, Rule
from diffq.weight_sources import FloatWeight

log = logging.getLogger(__name__)

SEARCH_STREAM = "mixdq-search"  # the search prompts' seeds: never the evaluation's (sample_seeds' default stream)
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


def settings_of(mc: Mapping[str, Any] | MixDQConfig | MixDQConfig | None) -> MixDQConfig:
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


class Candidates:
    """Every candidate width's quantizer parameters per layer, and installing one of them."""

    def __init__(self, layers: Mapping[str, nn.Module], specs: Mapping[str, LayerSpec], wbits: Mapping[str, list],
                 abits: Sequence[int], calib: Sequence[CalibSample], model: nn.Module, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.layers, self.specs = layers, specs
        self.weights: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name, layer in layers.items():
            wq = layer.weight_quantizer
            if wq is None:
                continue
            self.weights[name] = {}
            for b in wbits[name]:
                wq.set_format(replace(specs[name].weight, bits=b).build_format())
                wq.calibrate_weight(layer.weight)
                self.weights[name][b] = wq.params()
        self.acts: dict[str, dict[int, list[dict[str, torch.Tensor]]]] = {n: {} for n, m in layers.items()
                                                                          if m.input_quantizer is not None}
        for b in abits:
            for name in self.acts:
                for q in act_parts(layers[name].input_quantizer):
                    q.set_format(replace(specs[name].act, bits=b).build_format())
            calibrate_activations(model, calib, device, dtype)
            for name in self.acts:
                self.acts[name][b] = [q.params() for q in act_parts(layers[name].input_quantizer)]

    def set_weight(self, name: str, bits: int) -> None:
        """Quantize the layer's weight at ``bits`` (and cache it)."""
        layer, wq = self.layers[name], self.layers[name].weight_quantizer
        wq.set_format(replace(self.specs[name].weight, bits=bits).build_format())
        wq.set_params(**self.weights[name][bits])
        layer.freeze(keep_original=True)

    def set_act(self, name: str, bits: int | None) -> None:
        """Quantize the layer's input at ``bits`` (None: keep it floating point)."""
        stored = self.acts[name][bits or min(self.acts[name])]
        for q, params in zip(act_parts(self.layers[name].input_quantizer), stored):
            q.enabled = bits is not None
            if bits is not None:
                q.set_format(replace(self.specs[name].act, bits=bits).build_format())
                q.set_params(**params)


@contextlib.contextmanager
def only(layers: Mapping[str, nn.Module], name: str, what: str) -> Iterator[None]:
    """Only layer ``name``'s weight (``what="weight"``) or input (``"act"``) quantized."""
    saved = {n: m.quant_enabled for n, m in layers.items()}
    layer = layers[name]
    inputs = act_parts(layer.input_quantizer)
    enabled = [q.enabled for q in inputs]
    source = layer.weight_source
    try:
        for m in layers.values():
            m.quant_enabled = False
        layer.quant_enabled = True
        if what == "weight":
            for q in inputs:
                q.enabled = False
        else:
            layer.use_source(FloatWeight())
        yield
    finally:
        for n, m in layers.items():
            m.quant_enabled = saved[n]
        for q, e in zip(inputs, enabled):
            q.enabled = e
        layer.use_source(source)


class Probe:
    """The two metrics of one configuration of the model on the search prompts: SQNR of the denoiser
    output on calls of their FP trajectories, and their images (SSIM and MSE vs FP, in float)."""

    def __init__(self, model: nn.Module, context: MethodContext, prompts: list[str], sqnr_calls: int,
                 ssim_window: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.ctx, self.prompts, self.window = model, context, prompts, ssim_window
        self.device, self.dtype = device, dtype
        self.seeds = sample_seeds(context.seed, len(prompts), stream=SEARCH_STREAM)
        s = context.sampling
        batches = math.ceil(len(prompts) / s.batch_size)
        with float_mode(model):
            self.calls = capture_trajectories(
                context.pipe, context.family, prompts, self.seeds, steps=s.steps, guidance=s.guidance,
                resolution=s.resolution, keep_steps=math.ceil(sqnr_calls / batches), batch_size=s.batch_size,
                call_kwargs=s.call_kwargs)[:sqnr_calls]
            self.ref = self.outputs()
            self.fp_images = self.images()

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The denoiser's outputs on the recorded calls."""
        return [self.model(**c.to(self.device, self.dtype), return_dict=False)[0].float().cpu() for c in self.calls]

    def images(self, n: int | None = None) -> torch.Tensor:
        """Images of the (first ``n``) search prompts, float in [0, 1]."""
        s, n = self.ctx.sampling, n or len(self.prompts)
        return generate_images(self.ctx.pipe, self.ctx.family, self.prompts[:n], self.seeds[:n], steps=s.steps,
                               guidance=s.guidance, resolution=s.resolution, batch_size=s.batch_size,
                               call_kwargs=s.call_kwargs, progress=False)

    def sqnr(self) -> float:
        """SQNR (dB) of the current model against FP on the recorded calls."""
        return sqnr(self.ref, self.outputs())

    def ssim(self) -> float:
        """Mean SSIM of the current model's images against FP's."""
        return float(ssim(self.fp_images, self.images(), window=self.window).mean())

    def image_mse(self, n: int | None = None) -> float:
        """Mean squared error of the current model's images of the first ``n`` search prompts against
        FP's (float, not the code's wrapped uint8)."""
        n = n or len(self.prompts)
        return float((self.images(n) - self.fp_images[:n]).square().mean())


def measure(cands: Candidates, probe: Probe, ssim_layers: set[str], wbits: Mapping[str, list], abits: Sequence[int]
            ) -> dict[str, dict[str, dict[int, float]]]:
    """``{layer: {"weight": {bits: score}, "act": {bits: score}}}``, one layer quantized at a time:
    SSIM of images for ``ssim_layers``, SQNR of the denoiser output for the others."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    jobs = [(n, "weight", b) for n in cands.weights for b in wbits[n]] + [(n, "act", b) for n in cands.acts
                                                                           for b in abits]
    for name, what, b in tqdm(jobs, desc="mixdq sensitivity", unit="probe"):
        if what == "weight":
            cands.set_weight(name, b)
        else:
            cands.set_act(name, b)
        with only(cands.layers, name, what):
            score = probe.ssim() if name in ssim_layers else probe.sqnr()
        out.setdefault(name, {"weight": {}, "act": {}})[what][b] = score
    return out


def write_sensitivity(sens: Mapping[str, Any], content: set[str], ssim_layers: set[str], folder: Path) -> None:
    """mixdq_sensitivity.csv and .png (score per layer and width, the groups coloured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(folder / "mixdq_sensitivity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "group", "metric", "what", "bits", "score"])
        for name, kinds in sens.items():
            group = "content" if name in content else "quality"
            for what, scores in kinds.items():
                for b, v in scores.items():
                    w.writerow([name, group, "ssim" if name in ssim_layers else "sqnr_db", what, b, round(v, 6)])
    fig, axes = plt.subplots(2, 2, figsize=(12, 6))
    for row, group in enumerate(("content", "quality")):
        for col, what in enumerate(("weight", "act")):
            ax = axes[row, col]
            names = [n for n in sens if (n in content) == (group == "content") and sens[n][what]]
            for b in sorted({b for n in names for b in sens[n][what]}):
                ax.plot([sens[n][what].get(b, np.nan) for n in names], marker=".", lw=0.8, label=f"{b} bit")
            metric = "SSIM" if names and names[0] in ssim_layers else "SQNR dB"
            ax.set(title=f"{group} group, {what}s ({metric})", xlabel="layer")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "mixdq_sensitivity.png", dpi=90)
    plt.close(fig)


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
    key = cache_key({"model": context.model_key, "specs": [s.to_dict() for s in by.values()],
                     "calib": [s.step for s in calib], "calib_sums": [round(float(c.kwargs[k].double().sum()), 6)
                                                                      for c in calib[:4] for k in sorted(c.kwargs)
                                                                      if torch.is_tensor(c.kwargs[k])],
                     "prompts": prompts, "seed": context.seed,
                     "sampling": {k: v for k, v in asdict(context.sampling).items() if k != "batch_size"},
                     "search": [SEARCH_STREAM, len(probe.calls)], "wbits": wbits, "abits": abits,
                     "mixdq": {k: getattr(mc, k) for k in ("content_roles", "content_names", "ssim_window",
                                                            "decoupled")}})
    path = Path(context.cache_dir).expanduser() / "mixdq" / f"{key}.json"
    if path.exists():
        sens = {n: {w: {int(b): v for b, v in d.items()} for w, d in k.items()} for n, k in
                json.loads(path.read_text()).items()}
        log.info("mixdq sensitivities loaded from %s", path)
    else:
        sens = measure(cands, probe, ssim_layers, wbits, abits)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sens))
    counter = count_layer_inputs(model, [s.name for s in specs], calib[0], device, dtype)
    counts = {s.name: counter.counts.get(s.name, 0) for s in specs}  # a layer the call never reaches: 0
    fp = fp_inputs(sens, content, mc)
    fp_set = {n for g in GROUPS for n in fp[g]}
    act_names = [n for n in cands.acts if n not in fp_set]
    rest_max = rest_budget(counts, act_names, float(mc.act_bits))
    if rest_max < min(mc.act_bits_candidates) and not mc.control:
        raise ConfigError(f"quant.mixdq.act_bits={mc.act_bits:g}: with {len(fp_set)} FP-kept inputs and the layers "
                          f"left FP at 16 bits, the quantized inputs would need {rest_max:.2f} bits on average, under "
                          f"the narrowest candidate {min(mc.act_bits_candidates)}; raise act_bits or lower "
                          "quant.mixdq.fp_act_fraction")
    stats: dict[str, Any] = {"sensitivity_cache": str(path), "control": bool(mc.control),
                             "content_layers": len(content), "fp_inputs": fp, "act_budget": {
                                 "target": float(mc.act_bits), "quantized_inputs_max": round(rest_max, 4)},
                             "search": {"prompts": len(prompts), "sqnr_calls": len(probe.calls),
                                        "seed_stream": SEARCH_STREAM, "ssim_window": mc.ssim_window,
                                        "plan_prompts": min(mc.plan_prompts, len(prompts))}}
    fp_none: dict[str, int | None] = dict.fromkeys(fp_set)
    if mc.control:  # uniform widths, the plan's FP inputs
        best = {"weight": dict.fromkeys(cands.weights, int(wtarget)),
                "act": {**dict.fromkeys(act_names, int(mc.act_bits)), **fp_none}}
    else:
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
        best = {"weight": wbest["bits"], "act": {**abest["bits"], **fp_none}}
        for what, plans, chosen in (("weight", wplans, wbest), ("act", aplans, abest)):
            stats[f"{what}_plans"] = [{k: v for k, v in p.items() if k != "bits"} for p in plans]
            stats.setdefault("chosen", {})[what] = chosen["k_budget"][0]
    install(cands, best)
    for name, b in best["act"].items():
        if b is None:  # FP input: no quantizer at all, as the written plan's rules make it
            layers[name].input_quantizer = None
    calibrate_activations(model, calib, device, dtype)  # the final widths' ranges, seen through the final weights
    for s in specs:
        if s.name in best["weight"]:
            s.weight = replace(s.weight, bits=best["weight"][s.name])
        if s.name in best["act"]:
            s.act = None if best["act"][s.name] is None else replace(s.act, bits=best["act"][s.name])
    if context.out_dir is not None:
        write_sensitivity(sens, content, ssim_layers, context.out_dir)
        (context.out_dir / "mixdq_plan.yaml").write_text(yaml.safe_dump({"rules": plan_rules(best)}, sort_keys=False))
    stats["weight_bits_avg"] = sum(by[n].params * b for n, b in best["weight"].items()) / max(
        1, sum(by[n].params for n in best["weight"]))
    stats["act_bits_avg"] = model_act_average(counts, best["act"])
    log.info("mixdq%s: weights %.3f bits on average, inputs %.3f (budget %g, FP inputs %s)",
             " control" if mc.control else "", stats["weight_bits_avg"], stats["act_bits_avg"], mc.act_bits,
             sorted(fp_set))
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
