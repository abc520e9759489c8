"""MixDQ (Zhao et al., ECCV 2024): per-layer mixed precision from metric-decoupled sensitivity and
integer programming, with BOS-aware cross-attention K/V layers (a rule option, ``bos: true``).

1. Every candidate bit-width's quantizer parameters are computed once (weights from the weight,
   activations in one calibration pass per width), so a bit plan is pure data.
2. Sensitivity of a layer at a width = a metric with **only that layer** quantized, weights and
   activations separately: SSIM of generated images vs FP (same seeds) for the content group
   (FFN and cross-attention layers by default), SQNR of the denoiser output vs FP on calibration
   inputs for the quality group. Cached by everything that determines it.
3. The ``fp_act_fraction`` most activation-sensitive layers keep FP inputs; the rest get bits from
   four integer programs (weights/activations x content/quality,
   :func:`diffq.bit_allocation.allocate_bits`), the budget split between the groups by a ratio
   ``k`` swept over ``k_weight`` x ``k_act`` x ``budget_offsets`` into a family of plans.
4. The plan whose images are closest to FP (MSE in float over the selection prompts) is installed,
   the specs updated (``spec.txt``, export) and written as a reusable rule list.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from diffq.bit_allocation import allocate_bits, feasible_range, split_budget
from diffq.cache import cache_key
from diffq.calib import CalibSample
from diffq.errors import ConfigError
from diffq.eval.fidelity import ssim
from diffq.methods import METHODS, MethodContext, rtn
from diffq.methods.common import calibrate_activations, split_shortcuts
from diffq.model_quant import act_parts, float_mode, prepare
from diffq.models import generate_images, sample_seeds
from diffq.spec import LayerSpec, Rule

log = logging.getLogger(__name__)


def content_names(specs: Sequence[LayerSpec], mc: Mapping[str, Any]) -> set[str]:
    """The quantized layers of the content group: those with a ``content_roles`` role or a name
    matching ``content_names``."""
    rules = [Rule(0, roles=tuple(mc["content_roles"]))] * bool(mc["content_roles"])
    rules += [Rule(0, names=tuple(mc["content_names"]))] * bool(mc["content_names"])
    return {s.name for s in specs if s.quantized and any(r.matches(s.name, s.role) for r in rules)}


def weight_target(mc: Mapping[str, Any], specs: Sequence[LayerSpec]) -> float:
    """The average weight bits asked for (``weight_mb`` turned into bits over the quantized weights)."""
    if mc.get("weight_mb"):
        params = sum(s.params for s in specs if s.quantized and s.weight is not None)
        return float(mc["weight_mb"]) * 8 * 2**20 / params
    return float(mc["weight_bits"])


def check_budget(specs: Sequence[LayerSpec], mc: Mapping[str, Any]) -> None:
    """ConfigError, before calibration, when the weight or activation budget is out of reach."""
    content = content_names(specs, mc)
    ws = [s for s in specs if s.quantized and s.weight is not None]
    cands = sorted({*mc["weight_bits_content"], *mc["weight_bits_quality"]})
    allowed = np.array([[b in (mc["weight_bits_content"] if s.name in content else mc["weight_bits_quality"])
                         for b in cands] for s in ws])
    lo, hi = feasible_range([s.params for s in ws], cands, allowed)
    target = weight_target(mc, specs)
    if not lo - mc["band"] <= target <= hi + mc["band"]:
        raise ConfigError(f"quant.mixdq: an average of {target:.3f} weight bits is out of reach; with the candidate "
                          f"widths the average lies in [{lo:.3f}, {hi:.3f}]")
    a = mc["act_bits_candidates"]
    if not min(a) - mc["band"] <= mc["act_bits"] <= max(a) + mc["band"]:
        raise ConfigError(f"quant.mixdq.act_bits={mc['act_bits']} is out of reach of the candidates {list(a)}")


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
        layer.weight_fq = None
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
    wq, cached = layer.weight_quantizer, layer.weight_fq
    try:
        for m in layers.values():
            m.quant_enabled = False
        layer.quant_enabled = True
        if what == "weight":
            for q in inputs:
                q.enabled = False
        elif wq is not None:
            wq.enabled, layer.weight_fq = False, None
        yield
    finally:
        for n, m in layers.items():
            m.quant_enabled = saved[n]
        for q, e in zip(inputs, enabled):
            q.enabled = e
        if wq is not None:
            wq.enabled, layer.weight_fq = True, cached


@torch.no_grad()
def input_counts(model: nn.Module, layers: Mapping[str, nn.Module], sample: CalibSample, device: torch.device,
                 dtype: torch.dtype) -> dict[str, int]:
    """Input elements each layer receives in one denoiser call (the activation budget's weights)."""
    counts: dict[str, int] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: counts.__setitem__(n, counts.get(n, 0) + a[0].numel()))
             for n, m in layers.items()]
    try:
        with float_mode(model):
            model(**sample.to(device, dtype), return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return counts


def sqnr(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """Signal-to-quantization-noise ratio in dB over a set of outputs."""
    signal = sum(float(r.double().square().sum()) for r in ref)
    noise = sum(float((o.double() - r.double()).square().sum()) for r, o in zip(ref, out))
    return 10 * np.log10(signal / max(noise, 1e-30))


class Probe:
    """The two metrics of one configuration of the model: SQNR on calibration inputs, and the
    images it generates (SSIM vs FP, MSE vs FP in float)."""

    def __init__(self, model: nn.Module, calib: Sequence[CalibSample], context: MethodContext, prompts: list[str],
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.calib, self.ctx, self.prompts = model, calib, context, prompts
        self.device, self.dtype = device, dtype
        self.seeds = sample_seeds(context.seed, len(prompts))
        with float_mode(model):
            self.ref = self.outputs()
            self.fp_images = self.images()

    @torch.no_grad()
    def outputs(self) -> list[torch.Tensor]:
        """The denoiser's outputs on the calibration inputs."""
        return [self.model(**s.to(self.device, self.dtype), return_dict=False)[0].float().cpu() for s in self.calib]

    def images(self) -> torch.Tensor:
        """Images of the selection prompts, float in [0, 1]."""
        s = self.ctx.sampling
        return generate_images(self.ctx.pipe, self.ctx.family, self.prompts, self.seeds, steps=s.steps,
                               guidance=s.guidance, resolution=s.resolution, batch_size=s.batch_size,
                               call_kwargs=s.call_kwargs, progress=False)

    def sqnr(self) -> float:
        """SQNR (dB) of the current model against FP on the calibration inputs."""
        return sqnr(self.ref, self.outputs())

    def ssim(self) -> float:
        """Mean SSIM of the current model's images against FP's."""
        return float(ssim(self.fp_images, self.images()).mean())

    def image_mse(self) -> float:
        """Mean squared error of the current model's images against FP's (float, not uint8)."""
        return float((self.images() - self.fp_images).square().mean())


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


def plan_family(sens: Mapping[str, Any], content: set[str], ssim_layers: set[str], sizes: Mapping[str, Any],
                mc: Mapping[str, Any], wtarget: float) -> list[dict[str, Any]]:
    """The family of plans ``{"weight": {layer: bits}, "act": {layer: bits or None}, "k": ...}``."""
    acts = [n for n in sens if sens[n]["act"]]
    low = min(mc["act_bits_candidates"])
    n_fp = int(round(mc["fp_act_fraction"] * len(acts)))
    fp_acts = sorted(acts, key=lambda n: _normalised(sens[n]["act"][low], n in ssim_layers))[:n_fp]
    plans = []
    for kw, ka, off in itertools.product(mc["k_weight"], mc["k_act"], mc["budget_offsets"]):
        plan: dict[str, Any] = {"weight": {}, "act": {n: None for n in fp_acts}, "k": [kw, ka, off], "programs": []}
        try:
            for what, k, target, names in (("weight", kw, wtarget + off, [n for n in sens if sens[n]["weight"]]),
                                           ("act", ka, mc["act_bits"] + off, [n for n in acts if n not in fp_acts])):
                groups = {g: [n for n in names if (n in content) == (g == "content")] for g in ("content", "quality")}
                size = {g: sum(sizes[what][n] for n in ns) for g, ns in groups.items()}
                ratio = size["content"] / max(1, size["quality"])
                bq, bc = split_budget(target, ratio, k)
                for g, b in (("quality", bq), ("content", bc)):
                    ns = groups[g]
                    if not ns:
                        continue
                    cands = (mc[f"weight_bits_{g}"] if what == "weight" else list(mc["act_bits_candidates"]))
                    score = np.array([[_normalised(sens[n][what][c], n in ssim_layers) for c in cands] for n in ns])
                    alloc = allocate_bits([sizes[what][n] for n in ns], score, cands, b, mc["band"],
                                          what=f"quant.mixdq {g} {what}s")
                    plan[what].update({n: int(x) for n, x in zip(ns, alloc.bits)})
                    plan["programs"].append({"group": g, "what": what, "target": round(b, 4), "status": alloc.status,
                                             "score": round(alloc.score, 6), "average": round(alloc.average, 4)})
        except ConfigError as e:
            log.info("mixdq plan k=%s skipped: %s", plan["k"], e)
            continue
        plans.append(plan)
    if not plans:
        raise ConfigError("quant.mixdq: no plan of the family meets the budgets; move quant.mixdq.weight_bits / "
                          "act_bits inside the candidates' range or widen quant.mixdq.band")
    return plans


def _normalised(score: float, is_ssim: bool) -> float:
    """Scores on one scale (SSIM in [0, 1]; SQNR in dB, divided by 10)."""
    return score if is_ssim else score / 10.0


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
    mc = cfg["mixdq"]
    if mc["plan"]:  # a written plan: its rules are in the specs, calibrate them as RTN does
        return rtn.apply(model, specs, calib, cfg, device=device, dtype=dtype)
    if context is None:
        raise ConfigError("quant.method=mixdq generates images to measure sensitivity: run it through the job")
    check_budget(specs, mc)
    layers = prepare(model, specs, cfg.get("attn"))
    n_splits = split_shortcuts(model, calib, device, dtype) if cfg.get("split_shortcut") else 0
    by = {s.name: s for s in specs if s.name in layers}
    content = content_names(specs, mc)
    ssim_layers = content if mc["decoupled"] else set()  # not decoupled: SQNR for every layer (the ablation)
    wbits = {n: list(mc["weight_bits_content"] if n in content else mc["weight_bits_quality"]) for n in by}
    abits = list(mc["act_bits_candidates"])
    cands = Candidates(layers, by, wbits, abits, calib, model, device, dtype)
    probe_calib = list(calib)[: mc["sqnr_calls"]]
    prompts = [context.prompts[i % len(context.prompts)] for i in range(mc["num_prompts"])]
    probe = Probe(model, probe_calib, context, prompts, device, dtype)
    key = cache_key({"model": context.model_key, "specs": [s.to_dict() for s in by.values()],
                     "calib": [s.step for s in calib], "prompts": prompts, "seed": context.seed,
                     "mixdq": {k: mc[k] for k in ("weight_bits_content", "weight_bits_quality", "act_bits_candidates",
                                                  "content_roles", "content_names", "sqnr_calls", "decoupled")}})
    path = Path(context.cache_dir).expanduser() / "mixdq" / f"{key}.json"
    if path.exists():
        sens = {n: {w: {int(b): v for b, v in d.items()} for w, d in k.items()} for n, k in
                json.loads(path.read_text()).items()}
        log.info("mixdq sensitivities loaded from %s", path)
    else:
        sens = measure(cands, probe, ssim_layers, wbits, abits)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sens))
    sizes = {"weight": {n: by[n].params for n in by}, "act": input_counts(model, layers, calib[0], device, dtype)}
    plans = plan_family(sens, content, ssim_layers, sizes, mc, weight_target(mc, specs))
    scored = []
    for plan in tqdm(plans, desc="mixdq plans", unit="plan"):
        install(cands, plan)
        scored.append(probe.image_mse())
    best = plans[int(np.argmin(scored))]
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
    w_avg = sum(by[n].params * b for n, b in best["weight"].items()) / max(1, sum(by[n].params for n in best["weight"]))
    family = [{"k": p["k"], "image_mse": m, "programs": p["programs"]} for p, m in zip(plans, scored)]
    return {"layers_quantized": len(layers), "shortcut_splits": n_splits, "mixdq": {
        "sensitivity_cache": str(path), "plans": family,
        "chosen": best["k"], "weight_bits_avg": w_avg, "content_layers": len(content),
        "fp_act_layers": [n for n, b in best["act"].items() if b is None]}}



def check_specs(specs: Sequence[LayerSpec], cfg: Mapping[str, Any]) -> None:
    """The job's check before calibration: the budget is reachable (nothing to check with a written plan)."""
    if not cfg["mixdq"]["plan"]:
        check_budget(specs, cfg["mixdq"])


apply.check_specs = check_specs
