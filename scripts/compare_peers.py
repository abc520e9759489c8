"""diffq against peer toolkits (optimum-quanto, NVIDIA ModelOpt) on one denoiser and one calibration set.

    python scripts/compare_peers.py [model=testbed_unet] [hydra overrides] [--out assets/peers/peers.csv]
        [--presets w8a8,w4a8,w8a8_linear,w4a8_linear,w8a8_fp8] [--held-out 2] [--images-per-task 6]

Every tool quantizes a copy of the FP denoiser from the same calibration inputs (``diffq.calib``'s
capture, as ``scripts/bench.py`` composes it): diffq at its presets (``diffq.quantize``), optimum-quanto
W8A8 / W4A8 (``quantize`` + ``Calibration`` over the inputs + ``freeze``) and ModelOpt INT8 / FP8
(``mtq.quantize`` with a ``forward_loop`` over them). Columns, one run:

- coverage, counted with hooks on one forward pass: Linear/Conv2d weights quantized, layer inputs the
  layer computes with quantized (linear / conv / other modules), outputs quantized;
- error vs FP on held-out denoiser inputs (other prompts and seeds than calibration, every sampler
  step): SQNR of the denoiser output (noise space) and of the predicted x0, pooled and per step;
- PSNR of the final images vs FP images with the same seeds, and GenEval-shapes with its standard error
  on a small balanced set (testbed models; the same images);
- quantization wall time (each package's first configuration is quantized once untimed before, so imports
  and start-up costs are not counted) and the denoiser step-time ratio vs FP (paired, interleaved rounds,
  median).

Peers are optional (``pip install -e ".[peers]"``): one that does not import or does not run on this
machine (CPU) is skipped, and the output says why. The table is printed and written as CSV.
"""
from __future__ import annotations

import argparse
import copy
import csv
import importlib
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from torch import nn

import diffq
from diffq import calib as calibration
from diffq.calib.capture import CalibSample, capture_trajectories
from diffq.config import register_configs
from diffq.errors import ConfigError
from diffq.eval.fidelity import psnr
from diffq.eval.geneval import balanced_entries, score
from diffq.eval.geneval_stats import standard_errors, task_outcomes
from diffq.job import load_model
from diffq.models import denoiser_of, generate_images, model_key, sample_seeds, sampling_of, set_denoiser

DEFAULT_PRESETS = ("w8a8", "w4a8", "w8a8_linear", "w4a8_linear", "w8a8_fp8")
PEERS = {"optimum-quanto": "optimum.quanto", "nvidia-modelopt": "modelopt.torch.quantization"}
FLOW_FAMILIES = ("sd3", "flux")  # rectified flow: the denoiser predicts v = noise - x0, x_t = x0 + sigma v
Calib = list[dict[str, Any]]


@dataclass
class Tool:
    """One row: a toolkit at one configuration, and how it quantizes a denoiser in place."""

    package: str
    config: str
    quantize: Callable[[nn.Module, Calib], nn.Module]


@dataclass
class Coverage:
    """What one forward pass actually quantized: Linear/Conv2d weights, and inputs / outputs by module kind."""

    layers: int = 0
    weights: int = 0
    inputs: Counter = field(default_factory=Counter)
    outputs: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        """``weights 79/83 linear+conv, inputs 46 linear + 29 conv, outputs 0``."""
        def parts(c: Counter) -> str:
            return " + ".join(f"{c[k]} {k}" for k in ("linear", "conv", "other") if c[k]) or "0"

        return f"weights {self.weights}/{self.layers} linear+conv, inputs {parts(self.inputs)}, " \
               f"outputs {parts(self.outputs)}"


def _call(model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    return model(**kwargs, return_dict=False)[0]


def _run_all(model: nn.Module, calib: Calib) -> None:
    with torch.no_grad():
        for kw in calib:
            _call(model, kw)


def diffq_tool(preset: str) -> Tool:
    """diffq at a preset of ``conf/quant/``."""
    return Tool("diffq", preset, lambda m, calib: diffq.quantize(m, preset, calib=calib, device="cpu"))


def quanto_tool(weights: str) -> Tool:
    """optimum-quanto with ``weights`` (qint8 / qint4) and qint8 activations, calibrated then frozen."""
    def run(model: nn.Module, calib: Calib) -> nn.Module:
        qt = importlib.import_module(PEERS["optimum-quanto"])
        qt.quantize(model, weights=getattr(qt, weights), activations=qt.qint8)
        with qt.Calibration():
            _run_all(model, calib)
        qt.freeze(model)
        return model

    return Tool("optimum-quanto", f"{weights} w / qint8 a", run)


def modelopt_tool(config: str) -> Tool:
    """ModelOpt's ``mtq.quantize`` with one of its configs, calibrated by a forward loop."""
    def run(model: nn.Module, calib: Calib) -> nn.Module:
        mtq = importlib.import_module(PEERS["nvidia-modelopt"])
        return mtq.quantize(model, copy.deepcopy(getattr(mtq, config)), forward_loop=lambda m: _run_all(m, calib))

    return Tool("nvidia-modelopt", config, run)


class _Probe(nn.Module):
    """A two-layer denoiser stand-in to check that a peer runs here before the real model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.proj = nn.Conv2d(4, 16, 3, padding=1), nn.Linear(16, 16)

    def forward(self, sample: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:  # noqa: D102
        return (self.proj(self.conv(sample).permute(0, 2, 3, 1)),)


def peer_tools() -> tuple[list[Tool], dict[str, str]]:
    """The peers' rows that import and run on a toy model on CPU, and ``{package: why}`` for the others."""
    candidates = {"optimum-quanto": [quanto_tool("qint8"), quanto_tool("qint4")],
                  "nvidia-modelopt": [modelopt_tool("INT8_DEFAULT_CFG"), modelopt_tool("FP8_DEFAULT_CFG")]}
    tools, skipped = [], {}
    for package, rows in candidates.items():
        try:
            importlib.import_module(PEERS[package])
        except Exception as e:  # ImportError, or a peer failing at import (CUDA, version checks)
            skipped[package] = f"not importable ({type(e).__name__}: {e}); install with pip install -e '.[peers]'"
            continue
        for tool in rows:
            try:
                tool.quantize(_Probe(), [{"sample": torch.randn(2, 4, 8, 8)}])
            except Exception as e:  # a peer that needs CUDA, or breaks on this torch
                skipped[f"{package} {tool.config}"] = f"does not run on CPU ({type(e).__name__}: {e})"
            else:
                tools.append(tool)
    return tools, skipped


def _is_qtensor(x: Any) -> bool:
    """A quanto QTensor (checked by its module, so quanto need not be installed)."""
    return any(c.__module__.startswith("optimum.quanto") for c in type(x).__mro__)


def _enabled(q: Any) -> bool:
    """A quantizer submodule that is on (ModelOpt ``is_enabled``, diffq ``enabled``)."""
    return isinstance(q, nn.Module) and bool(getattr(q, "is_enabled", getattr(q, "enabled", True)))


def _kind(m: nn.Module) -> str:
    return "linear" if isinstance(m, nn.Linear) else "conv" if isinstance(m, nn.Conv2d) else "other"


def _owns_quantization(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv2d)) or getattr(m, "activation_qtype", None) is not None or any(
        hasattr(m, a) for a in ("input_quantizer", "output_quantizer"))


def weight_quantized(m: nn.Module) -> bool:
    """Whether a layer computes with a quantized weight: a quanto QTensor or qtype, or an enabled weight
    quantizer (diffq, ModelOpt) on a layer not switched to float (diffq ``quant_enabled``)."""
    if not getattr(m, "quant_enabled", True):
        return False
    return (_is_qtensor(m.weight) or getattr(m, "weight_qtype", None) is not None
            or _enabled(getattr(m, "weight_quantizer", None)))


@torch.no_grad()
def count_coverage(model: nn.Module, kwargs: dict[str, Any]) -> Coverage:
    """Hooks on one forward pass: which Linear/Conv2d ran with quantized weights, and which modules' inputs
    and outputs were quantized (a quanto QTensor arriving or leaving, or an enabled ``input_quantizer`` /
    ``output_quantizer`` that ran); modules that do not run are not counted."""
    modules = dict(model.named_modules())
    ran: set[str] = set()
    inputs: set[str] = set()
    outputs: set[str] = set()

    def pre(name: str) -> Callable:
        def hook(m: nn.Module, args: tuple) -> None:
            ran.add(name)
            if args and _is_qtensor(args[0]):
                inputs.add(name)
        return hook

    def post(name: str) -> Callable:
        def hook(m: nn.Module, args: tuple, out: Any) -> None:
            if _is_qtensor(out):
                outputs.add(name)
        return hook

    def quantizer(owner: str, into: set[str]) -> Callable:
        def hook(q: nn.Module, args: tuple, out: Any) -> None:
            if _enabled(q):
                into.add(owner)
        return hook

    handles = []
    for name, m in modules.items():
        if _owns_quantization(m):
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post(name))]
        owner, _, attr = name.rpartition(".")
        if attr in ("input_quantizer", "output_quantizer") and owner in modules:
            handles.append(m.register_forward_hook(quantizer(owner, inputs if attr == "input_quantizer" else outputs)))
    try:
        _call(model, kwargs)
    finally:
        for h in handles:
            h.remove()
    layers = [n for n in ran if isinstance(modules[n], (nn.Linear, nn.Conv2d))]
    return Coverage(len(layers), sum(weight_quantized(modules[n]) for n in layers),
                    Counter(_kind(modules[n]) for n in inputs & ran), Counter(_kind(modules[n]) for n in outputs & ran))


def x0_coefficients(pipe: Any, family: str, calls: Sequence[CalibSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` per call with predicted ``x0 = a x_t - b out``: flow matching ``x_t - sigma v`` (sigma of
    the call's sampler step), epsilon ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)``, v-prediction
    ``sqrt(abar) x_t - sqrt(1 - abar) v`` (abar: the scheduler's alphas_cumprod at the call's timestep)."""
    sched = pipe.scheduler
    if family in FLOW_FAMILIES:
        sigma = sched.sigmas.double()[torch.tensor([c.step for c in calls])]
        return torch.ones_like(sigma), sigma
    t = torch.tensor([int(torch.as_tensor(c.kwargs["timestep"]).flatten()[0]) for c in calls])
    abar = sched.alphas_cumprod.double()[t]
    if sched.config.get("prediction_type", "epsilon") == "v_prediction":
        return abar.sqrt(), (1 - abar).sqrt()
    return abar.rsqrt(), ((1 - abar) / abar).sqrt()


@torch.no_grad()
def denoiser_outputs(model: nn.Module, calls: Sequence[CalibSample]) -> torch.Tensor:
    """The denoiser's prediction for every call, ``[calls, ...]`` in float64 (learned-variance channels dropped)."""
    latent = next(iter(calls[0].kwargs))
    outs = []
    for c in calls:
        out, x = _call(model, c.kwargs), c.kwargs[latent]
        outs.append((out if out.shape == x.shape else out[:, : x.shape[1]]).double())
    return torch.stack(outs)


def _sqnr(signal: torch.Tensor, noise: torch.Tensor) -> list[float]:
    return (10 * torch.log10(signal / noise.clamp_min(1e-30))).tolist()


def output_errors(ref: torch.Tensor, test: torch.Tensor, latents: torch.Tensor, coef: tuple[torch.Tensor, torch.Tensor],
                  steps: torch.Tensor) -> dict[str, Any]:
    """SQNR (dB) of the denoiser output and of the predicted x0 vs FP, pooled over all held-out calls and per
    sampler step (energies summed over the calls of a step)."""
    a, b = (c.view(-1, *[1] * (ref.dim() - 1)) for c in coef)
    n_steps = int(steps.max()) + 1
    out: dict[str, Any] = {}
    for space, sig, err in (("eps", ref, test - ref), ("x0", a * latents - b * ref, b * (test - ref))):
        s, e = sig.pow(2).flatten(1).sum(1), err.pow(2).flatten(1).sum(1)
        out[f"sqnr_{space}_db"] = _sqnr(s.sum(), e.sum())
        per_s = torch.zeros(n_steps, dtype=s.dtype).index_add_(0, steps, s)
        per_e = torch.zeros(n_steps, dtype=e.dtype).index_add_(0, steps, e)
        out[f"sqnr_{space}_steps"] = _sqnr(per_s, per_e)
    return out


@torch.no_grad()
def _median_time(model: nn.Module, kwargs: dict[str, Any], repeats: int) -> float:
    for _ in range(2):
        _call(model, kwargs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _call(model, kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_ratio(fp: nn.Module, model: nn.Module, kwargs: dict[str, Any], repeats: int, rounds: int) -> float:
    """Median over paired, interleaved rounds of (quantized / FP) median step time."""
    return statistics.median(_median_time(model, kwargs, repeats) / _median_time(fp, kwargs, repeats)
                             for _ in range(rounds))


@dataclass
class ImageSet:
    """The final-image evaluation: prompts and seeds, and GenEval entries when the model has a world."""

    prompts: list[str]
    seeds: list[int]
    entries: list[dict[str, Any]] | None


def image_set(cfg: DictConfig, images_per_task: int, images: int) -> ImageSet:
    """GenEval-shapes balanced to ``images_per_task`` (one image per entry) on the testbed world, else the
    first ``images`` evaluation prompts; seeds from ``eval.seed``."""
    if cfg.model.world == "shapes":
        from diffq.testbed.prompts import evaluation_metadata

        entries = balanced_entries(list(evaluation_metadata()), images_per_task, 1)
        prompts = [e["prompt"] for e in entries]
    else:
        entries, base = None, list(cfg.model.prompts) or list(cfg.eval.prompts)
        prompts = [base[i % len(base)] for i in range(images)]
    return ImageSet(prompts, sample_seeds(cfg.eval.seed, len(prompts)), entries)


def held_out_prompts(cfg: DictConfig, calib_prompts: Sequence[str], n: int) -> list[str]:
    """``n`` evaluation prompts that are not calibration prompts (one per GenEval task on the testbed)."""
    if cfg.model.world == "shapes":
        from diffq.testbed.prompts import evaluation_metadata

        pool = [e["prompt"] for e in balanced_entries(list(evaluation_metadata()), 2, 1)]
    else:
        pool = list(cfg.model.prompts) or list(cfg.eval.prompts)
    kept = list(dict.fromkeys(p for p in pool if p not in set(calib_prompts)))[:n]
    if len(kept) < n:
        raise ConfigError(f"only {len(kept)} evaluation prompts differ from the calibration prompts; "
                          f"lower --held-out to {len(kept)} or set eval.prompts")
    return kept


def geneval_of(images: torch.Tensor, entries: list[dict[str, Any]]) -> tuple[float, float]:
    """GenEval-shapes overall score and its standard error (one image per entry)."""
    from diffq.testbed.detector import ShapesDetector
    from diffq.testbed.evaluate import to_uint8

    r = score(entries, ShapesDetector()(to_uint8(images)), 1)
    return r.overall, standard_errors(task_outcomes(r))["overall_se"]


def compose_cfg(overrides: Sequence[str]) -> DictConfig:
    """The job config with command-line overrides, as ``python -m diffq`` composes it."""
    register_configs()
    with initialize_config_module("diffq.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def check_presets(presets: Sequence[str]) -> None:
    """ConfigError for a preset name ``conf/quant/`` does not have."""
    unknown = [p for p in presets if p not in diffq.presets()]
    if unknown:
        raise ConfigError(f"unknown preset(s) {unknown}; available: {', '.join(diffq.presets())}")


def compare(overrides: Sequence[str], presets: Sequence[str] = DEFAULT_PRESETS, *, held_out: int = 2,
            images_per_task: int = 6, images: int = 8, repeats: int = 10, rounds: int = 5
            ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Quantize the configured denoiser with every tool and measure it; returns (rows, skipped peers)."""
    check_presets(presets)
    if min(held_out, images_per_task, images, repeats, rounds) < 1:
        raise ConfigError("--held-out, --images-per-task, --images, --repeats and --rounds must be positive")
    cfg = compose_cfg(overrides)
    peers, skipped = peer_tools()
    for package, why in skipped.items():
        print(f"skipped {package}: {why}")
    tools = [diffq_tool(p) for p in presets] + peers
    pipe = load_model(cfg, torch.device("cpu"))  # with the sampler's scheduler, as the job loads it
    pipe.set_progress_bar_config(disable=True)
    _, fp = denoiser_of(pipe)
    smp, family = sampling_of(cfg), cfg.model.family
    sampling = {"steps": smp.steps, "guidance": smp.guidance, "resolution": smp.resolution,
                "batch_size": smp.batch_size, "call_kwargs": smp.call_kwargs}
    calib_prompts = calibration.calibration_prompts(list(cfg.model.prompts) or list(cfg.calib.prompts), None,
                                                    cfg.calib.num_prompts)
    samples, _ = calibration.load_or_capture(
        pipe, family, model_key=model_key(cfg), prompts=calib_prompts, seed=cfg.calib.seed, steps=smp.steps,
        guidance=smp.guidance, resolution=smp.resolution, keep_steps=cfg.calib.num_steps,
        batch_size=cfg.calib.batch_size, call_kwargs=smp.call_kwargs,
        cache_dir=cfg.paths.cache_dir if cfg.calib.cache else None)
    calib = [s.kwargs for s in samples]
    prompts = held_out_prompts(cfg, calib_prompts, held_out)
    seeds = sample_seeds(cfg.eval.seed + 1, held_out)
    if set(seeds) & set(sample_seeds(cfg.calib.seed, len(calib_prompts))):
        raise ConfigError("held-out seeds overlap the calibration seeds: use another eval.seed")
    calls = capture_trajectories(pipe, family, prompts, seeds, keep_steps=smp.steps,
                                 **{**sampling, "batch_size": held_out})
    coef = x0_coefficients(pipe, family, calls)
    latent = next(iter(calls[0].kwargs))
    latents = torch.stack([c.kwargs[latent].double() for c in calls])
    steps = torch.tensor([c.step for c in calls])
    timing_call = calls[len(calls) // 2].kwargs
    ref = denoiser_outputs(fp, calls)
    evalset = image_set(cfg, images_per_task, images)
    fp_images = generate_images(pipe, family, evalset.prompts, evalset.seeds, progress=False, **sampling)
    print(f"model {cfg.model.name}: {len(calib)} calibration calls ({len(calib_prompts)} prompts), held-out "
          f"{len(calls)} calls ({held_out} other prompts and seeds, every step), {len(fp_images)} images")
    rows = [{"tool": "fp", "config": "-", **_geneval_cols(fp_images, evalset), "step_ratio": 1.0}]
    warm: set[str] = set()
    for tool in tools:
        if tool.package not in warm:  # imports, Hydra start-up and first-call costs stay out of the timing
            tool.quantize(copy.deepcopy(fp), calib[:1])
            warm.add(tool.package)
        model = copy.deepcopy(fp)
        t0 = time.perf_counter()
        model = tool.quantize(model, calib)
        quant_s = time.perf_counter() - t0
        cov = count_coverage(model, timing_call)
        set_denoiser(pipe, model)
        try:
            q_images = generate_images(pipe, family, evalset.prompts, evalset.seeds, progress=False, **sampling)
        finally:
            set_denoiser(pipe, fp)
        rows.append({"tool": tool.package, "config": tool.config, "coverage": cov.describe(),
                     "weights": f"{cov.weights}/{cov.layers}",
                     **{f"inputs_{k}": cov.inputs[k] for k in ("linear", "conv", "other")},
                     **{f"outputs_{k}": cov.outputs[k] for k in ("linear", "conv", "other")},
                     **output_errors(ref, denoiser_outputs(model, calls), latents, coef, steps),
                     "psnr_db": float(psnr(fp_images, q_images).mean()), **_geneval_cols(q_images, evalset),
                     "quant_s": quant_s, "step_ratio": step_ratio(fp, model, timing_call, repeats, rounds)})
        print(f"{tool.package} {tool.config}: done ({quant_s:.1f} s to quantize, "
              f"{time.perf_counter() - t0:.0f} s in all)")
    return rows, skipped


def _geneval_cols(images: torch.Tensor, evalset: ImageSet) -> dict[str, float]:
    if evalset.entries is None:
        return {"geneval": math.nan, "geneval_se": math.nan}
    overall, se = geneval_of(images, evalset.entries)
    return {"geneval": overall, "geneval_se": se}


COLUMNS = ("tool", "config", "weights", "inputs_linear", "inputs_conv", "inputs_other", "outputs_linear",
           "outputs_conv", "outputs_other", "sqnr_eps_db", "sqnr_x0_db", "psnr_db", "geneval", "geneval_se",
           "quant_s", "step_ratio", "coverage", "sqnr_eps_steps", "sqnr_x0_steps")


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, list):
        return ";".join(f"{v:.{digits}f}" for v in value)
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return "" if value is None else str(value)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The rows as CSV (per-step SQNR as ``;``-separated lists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows([_fmt(r.get(c), 3) for c in COLUMNS] for r in rows)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The main table (one row per tool and configuration) and the per-step SQNR tables, as markdown."""
    head = ("tool", "config", "coverage", "SQNR eps dB", "SQNR x0 dB", "PSNR dB", "GenEval ± se", "quant s",
            "step x FP")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gen = "" if math.isnan(r["geneval"]) else f"{r['geneval']:.3f} ± {r['geneval_se']:.3f}"
        cells = (r["tool"], r["config"], r.get("coverage", ""), _fmt(r.get("sqnr_eps_db")), _fmt(r.get("sqnr_x0_db")),
                 _fmt(r.get("psnr_db")), gen, _fmt(r.get("quant_s"), 1), _fmt(r["step_ratio"]))
        lines.append("| " + " | ".join(cells) + " |")
    quantized = [r for r in rows if "sqnr_eps_steps" in r]
    for space in ("eps", "x0"):
        n = len(quantized[0][f"sqnr_{space}_steps"]) if quantized else 0
        lines += ["", f"SQNR {space} (dB) per sampler step (0 = first, most noise):", "",
                  "| tool | config | " + " | ".join(map(str, range(n))) + " |", "|" + "---|" * (n + 2)]
        lines += [f"| {r['tool']} | {r['config']} | " + " | ".join(f"{v:.1f}" for v in r[f"sqnr_{space}_steps"])
                  + " |" for r in quantized]
    return "\n".join(lines)


def main() -> None:
    """Parse the arguments, run the comparison, print the tables and write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="hydra overrides (model=..., calib.num_prompts=...)")
    parser.add_argument("--out", type=Path, default=Path("assets/peers/peers.csv"))
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="diffq presets, comma-separated")
    parser.add_argument("--held-out", type=int, default=2, help="held-out prompts (one trajectory each)")
    parser.add_argument("--images-per-task", type=int, default=6, help="GenEval-shapes images per task")
    parser.add_argument("--images", type=int, default=8, help="images for PSNR on models without a world")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per step-time measurement")
    parser.add_argument("--rounds", type=int, default=5, help="paired FP / quantized timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, _ = compare(args.overrides, [p for p in args.presets.split(",") if p], held_out=args.held_out,
                      images_per_task=args.images_per_task, images=args.images, repeats=args.repeats,
                      rounds=args.rounds)
    print(format_table(rows))
    write_csv(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
