"""Per-layer FP format and clipping search (LLM-FP4 / Kuzmin et al.), scored by layer output error.

For every quantized layer with an FP weight format whose layout is left open (``exp``/``man``
unset), each layout of its bit-width (4 bits: E3M0, E2M1, E1M2; 8 bits: E5M2, E4M3, E3M4) and each
clipping ratio ``alpha`` of the grid (maxval = alpha * amax) is scored by the exact error of the
layer's output on the calibration inputs,

    err_c(fmt, alpha) = dw_c^T H dw_c,   dw_c = Q(w_c) - w_c,   H = sum_x x x^T

(``x`` the layer's FP inputs; for convolutions the unfolded patches). The error separates per
output channel, so every channel takes its own alpha (per-channel or group weights; one alpha for
per-tensor weights) and the layer the layout with the least total. Input activations of FP
format are searched next, on a few captured inputs: layout and one clipping ratio of the static
range (dynamic ranges: layout only), by the error of the layer's output with its chosen quantized
weight against the FP output. A layout pinned in the config (``exp``/``man`` set, e.g. by a rule)
keeps its layout and searches only alpha. The chosen layouts are written back into the layer
specs, so spec.txt, the metrics and exports carry them.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffq.calib import CalibSample
from diffq.errors import CalibrationError, ConfigError
from diffq.eval.cost import count_layer_inputs
from diffq.formats import FPFormat
from diffq.methods import METHODS, SETTINGS
from diffq.methods.common import calibrate_activations, calibrate_weights, split_shortcuts
from diffq.model_quant import float_mode, prepare
from diffq.quantizer import Quantizer
from diffq.settings import typed
from diffq.spec import LayerSpec, TensorQuant

log = logging.getLogger(__name__)

# layouts (exp, man) a search tries per bit-width
LAYOUTS: dict[int, tuple[tuple[int, int], ...]] = {
    8: ((5, 2), (4, 3), (3, 4)),
    6: ((3, 2), (2, 3)),
    5: ((3, 1), (2, 2)),
    4: ((3, 0), (2, 1), (1, 2)),
    3: ((2, 0), (1, 1)),
}
_EPS = 1e-12
_CHUNK_ELEMENTS = 2**24  # candidates evaluated together stay under this many elements


@SETTINGS.register("search")
@dataclass
class SearchConfig:
    """Per-layer FP format and scale search (``quant.search``, method ``fp_search``)."""

    weight: bool = True  # search the weight format and per-channel clipping of FP layers
    act: bool = True  # search the input-activation format (and clipping of static ranges)
    alpha_min: float = 0.1  # clipping grid: maxval = alpha * amax, alpha in [alpha_min, alpha_max] (and 1)
    alpha_max: float = 1.2
    alphas: int = 100  # points of the clipping grid
    act_inputs: int = 4  # calibration calls whose layer inputs score the activation candidates
    memory_mb: int = 2048  # statistics held at once; layers are searched in chunks under it


def candidate_formats(tq: TensorQuant) -> list[FPFormat]:
    """The layouts a search tries for ``tq``: its own when pinned, else every layout of its bit-width."""
    if tq.exp is not None or tq.man is not None:
        fmt = tq.build_format()
        assert isinstance(fmt, FPFormat)
        return [fmt]
    if tq.bits not in LAYOUTS:
        raise ConfigError(f"no FP layouts to search for {tq.bits} bits: use bits in {sorted(LAYOUTS)} "
                          "or pin the layout with exp/man")
    return [FPFormat(e, m) for e, m in LAYOUTS[tq.bits]]


def alpha_grid(search: SearchConfig | Mapping[str, Any]) -> Tensor:
    """Clipping ratios: ``alphas`` points in [alpha_min, alpha_max], plus 1 (plain min-max)."""
    search = typed(SearchConfig, search, "quant.search")
    lo, hi, n = float(search.alpha_min), float(search.alpha_max), int(search.alphas)
    if not 0 < lo <= hi or n < 1:
        raise ConfigError(f"quant.search: need 0 < alpha_min <= alpha_max and alphas >= 1 (got {lo}, {hi}, {n})")
    return torch.cat([torch.linspace(lo, hi, n), torch.ones(1)]).unique()


def _searchable(q: Any, tq: TensorQuant | None) -> bool:
    return (isinstance(q, Quantizer) and tq is not None and tq.format == "fp"
            and (q.kind == "weight" or q.granularity in ("tensor", "channel", "token")))


def _patch_rows(layer: nn.Module, x: Tensor) -> Tensor | None:
    """The rows ``r`` with ``output = r @ W.flatten(1).T`` (None for convs unfold cannot express)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return None
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class _Stats:
    """What the search of one layer needs from the calibration pass."""

    gram: Tensor | None = None  # sum of x x^T over input rows (weights)
    unfoldable: bool = True
    inputs: list[Tensor] = field(default_factory=list)  # a few whole inputs (activations)
    amax: Tensor | None = None  # static activation range, shaped like the quantizer's scale


def _collect(model: nn.Module, layers: Mapping[str, nn.Module], plan: Mapping[str, tuple[bool, bool]],
             calib: Sequence[CalibSample], keep: set[int], device: torch.device,
             dtype: torch.dtype) -> dict[str, _Stats]:
    """One FP pass over the calibration set gathering each layer's statistics."""
    stats = {n: _Stats() for n in plan}
    call = [0]

    def hook(name: str):
        weight, act = plan[name]

        def run(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            st = stats[name]
            if weight:
                rows = _patch_rows(module, x)
                if rows is None:
                    st.unfoldable = False
                else:
                    g = rows.T @ rows
                    st.gram = g if st.gram is None else st.gram.add_(g)
            if act:
                q = module.input_quantizer
                if not q.dynamic:
                    a = q.view(x).abs().amax(q.layout.reduce_dims, keepdim=True)
                    st.amax = a if st.amax is None else torch.maximum(st.amax, a)
                if call[0] in keep:
                    st.inputs.append(x.to(dtype))
        return run

    hooks = [layers[n].register_forward_pre_hook(hook(n)) for n in plan]
    try:
        with float_mode(model), torch.no_grad():
            for i, sample in enumerate(calib):
                call[0] = i
                model(**sample.to(device, dtype), return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    for name, st in stats.items():
        bad = st.gram is not None and not torch.isfinite(st.gram).all()
        bad = bad or (st.amax is not None and not torch.isfinite(st.amax).all())
        if bad:
            raise CalibrationError(f"NaN/Inf in the calibration inputs of layer {name}: no FP format can be searched "
                                   "from them; fix: check the calibration data and run the model in float32")
    return stats


def _coarse_to_fine(n: int) -> tuple[Tensor, Tensor]:
    """(coarse grid indices, offsets around the best coarse point): about 3*sqrt(n) of the n points
    are scored instead of all n (the output error is close to unimodal in alpha)."""
    stride = max(1, round(n**0.5))
    coarse = torch.unique(torch.cat([torch.arange(0, n, stride), torch.tensor([n - 1])]))
    return coarse, torch.arange(-stride + 1, stride)


@torch.no_grad()
def search_weight(q: Quantizer, weight: Tensor, gram: Tensor | None, formats: Sequence[FPFormat],
                  alphas: Tensor) -> tuple[FPFormat, Tensor, float]:
    """(layout, scale, output error) minimising ``sum_c dw_c^T gram dw_c`` (``gram=None``: weight MSE)
    over the layouts and, per output channel (one for per-tensor weights), the clipping grid."""
    w = weight.detach().float()
    v = q.view(w)  # [rows, groups, group size]
    amax = v.abs().amax(q.layout.reduce_dims, keepdim=True)
    w2 = v.reshape(w.shape[0], -1)  # the view's element order (convolution groups: channels-last)
    if gram is not None:  # the Gram matrix in the same order
        order = q.view(torch.arange(w[0].numel(), dtype=torch.float32, device=w.device).reshape(1, *w.shape[1:]))
        perm = order.flatten().long()
        gram = gram[perm][:, perm]
    alphas = alphas.to(w.device)
    rows = 1 if q.granularity == "tensor" else w.shape[0]
    coarse, offsets = _coarse_to_fine(len(alphas))

    def errors(fmt: FPFormat, idx: Tensor) -> Tensor:  # idx [J, rows] -> output error [J, out]
        out = []
        for part in idx.split(max(1, _CHUNK_ELEMENTS // max(1, w.numel()))):
            scale = (alphas[part].view(*part.shape, 1, 1) * amax / fmt.maxval).clamp_min(_EPS)
            dw = (fmt.round(v[None] * (1.0 / scale)) * scale).reshape(len(part), *w2.shape) - w2
            out.append(((dw @ gram) * dw).sum(-1) if gram is not None else dw.square().sum(-1))
        return torch.cat(out)

    def pick(idx: Tensor, err: Tensor) -> tuple[Tensor, Tensor]:  # best index and its error per row
        if rows == 1:
            err = err.sum(1, keepdim=True)
        j = err.argmin(0, keepdim=True)
        return idx.expand(-1, rows).gather(0, j)[0], err.gather(0, j)[0]

    best: tuple[float, FPFormat, Tensor] | None = None
    for fmt in formats:
        centre, _ = pick(coarse[:, None], errors(fmt, coarse[:, None]))
        fine = (centre[None] + offsets[:, None]).clamp(0, len(alphas) - 1)
        choice, err = pick(fine, errors(fmt, fine))
        total = float(err.sum())
        if best is None or total < best[0]:
            best = (total, fmt, (alphas[choice].view(-1, 1, 1) * amax / fmt.maxval).clamp_min(_EPS))
    assert best is not None
    return best[1], best[2], best[0]


def _layer_output(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)


def _broadcast(q: Quantizer, scale: Tensor, ndim: int) -> Tensor:
    """A static activation scale (``[1, 1, 1]`` or ``[1, 1, C]``) shaped to broadcast against the input."""
    if scale.numel() == 1:
        return scale.reshape(())
    shape = [1] * ndim
    shape[q.layout.feature_axis % ndim] = scale.numel()
    return scale.reshape(shape)


@torch.no_grad()
def search_act(layer: nn.Module, inputs: Sequence[Tensor], amax: Tensor | None, formats: Sequence[FPFormat],
               alphas: Tensor) -> tuple[FPFormat, Tensor | None, float]:
    """(layout, static scale or None, output error) of the layer's input quantizer, the layer
    computing with its quantized weight, against the FP output on ``inputs``."""
    q: Quantizer = layer.input_quantizer
    wq, w = layer.quantized_weight(), layer.weight
    targets = [_layer_output(layer, x, w) for x in inputs]
    coarse, offsets = _coarse_to_fine(len(alphas))

    def errors(fmt: FPFormat, idx: Tensor) -> Tensor:  # idx [J] -> output error [J]
        err = torch.zeros(len(idx), device=alphas.device)
        for x, t in zip(inputs, targets):
            s_base = _broadcast(q, amax / fmt.maxval, x.dim())
            for part in torch.arange(len(idx)).split(max(1, _CHUNK_ELEMENTS // max(1, 2 * x.numel()))):
                s = (alphas[idx[part]].view(-1, *[1] * x.dim()) * s_base).clamp_min(_EPS)
                xq = (fmt.round(x[None].float() * (1.0 / s)) * s).to(x.dtype)
                out = _layer_output(layer, xq.reshape(-1, *x.shape[1:]), wq).reshape(len(part), *t.shape)
                err[part] += (out - t[None]).float().square().flatten(1).sum(1)
        return err

    best: tuple[float, FPFormat, Tensor | None] | None = None
    for fmt in formats:
        if q.dynamic:  # the range follows each input: only the layout is searched
            saved = q.fmt
            q.set_format(fmt)
            try:
                total = sum(float((_layer_output(layer, q(x), wq) - t).square().sum()) for x, t in zip(inputs, targets))
            finally:
                q.set_format(saved)
            scale = None
        else:
            centre = coarse[int(errors(fmt, coarse).argmin())]
            fine = (centre + offsets).clamp(0, len(alphas) - 1).unique()
            err = errors(fmt, fine)
            i = int(err.argmin())
            total, scale = float(err[i]), (alphas[fine[i]] * amax / fmt.maxval).clamp_min(_EPS)
        if best is None or total < best[0]:
            best = (total, fmt, scale)
    assert best is not None
    return best[1], best[2], best[0]


def _plan_chunks(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> list[list[str]]:
    """Consecutive groups of layers whose statistics fit in ``budget`` bytes (a larger layer goes alone)."""
    chunks: list[list[str]] = [[]]
    used = 0
    for n in names:
        if chunks[-1] and used + sizes[n] > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(n)
        used += sizes[n]
    return [c for c in chunks if c]


def _stat_bytes(layer: nn.Module, weight: bool, act: bool, input_numel: int, n_keep: int) -> int:
    k = int(layer.weight[0].numel())
    return 4 * ((k * k if weight else 0) + (input_numel * n_keep if act else 0))


def _plan(layers: Mapping[str, nn.Module], by_name: Mapping[str, LayerSpec],
          search: SearchConfig) -> dict[str, tuple[bool, bool]]:
    """Layer name -> (search its weight, search its input) for every layer with something to search."""
    plan = {}
    for name, layer in layers.items():
        s = by_name[name]
        w = bool(search.weight) and _searchable(layer.weight_quantizer, s.weight)
        a = bool(search.act) and _searchable(layer.input_quantizer, s.act)
        if w or a:
            plan[name] = (w, a)
    return plan


def _set_weight(layer: nn.Module, spec: LayerSpec, st: _Stats, alphas: Tensor) -> tuple[str, Tensor]:
    """Search and install the weight layout and scale; (layout name, chosen alpha per channel)."""
    wq = layer.weight_quantizer
    fmt, scale, err = search_weight(wq, layer.weight, st.gram if st.unfoldable else None,
                                    candidate_formats(spec.weight), alphas)
    wq.set_format(fmt)
    wq.set_params(scale=scale)
    spec.weight = replace(spec.weight, exp=fmt.exp, man=fmt.man)
    amax = wq.view(layer.weight.detach()).abs().amax(wq.layout.reduce_dims, keepdim=True)
    log.debug("%s weight: %s, output error %.4g", spec.name, fmt.name, err)
    return fmt.name, (scale * fmt.maxval / amax.clamp_min(_EPS))[amax > 0]


def _set_act(layer: nn.Module, spec: LayerSpec, st: _Stats, alphas: Tensor) -> str:
    """Search and install the input layout (and static scale); the layout name."""
    aq = layer.input_quantizer
    fmt, scale, err = search_act(layer, st.inputs, st.amax, candidate_formats(spec.act), alphas)
    aq.set_format(fmt)
    if scale is not None:
        aq.set_params(scale=scale)
    spec.act = replace(spec.act, exp=fmt.exp, man=fmt.man)
    log.debug("%s input: %s, output error %.4g", spec.name, fmt.name, err)
    return fmt.name


@METHODS.register("fp_search")
def apply(
    model: nn.Module, specs: Sequence[LayerSpec], calib: Sequence[CalibSample], cfg: Any, *,
    device: torch.device, dtype: torch.dtype, context: Any = None,
) -> dict[str, Any]:
    """Quantize ``model`` in place like RTN, with every open FP layout and clipping searched per layer
    (``cfg["search"]``); the chosen layouts are written into ``specs``."""
    search = typed(SearchConfig, cfg.get("search"), "quant.search")
    if not calib:
        raise CalibrationError("the FP format search needs calibration samples: "
                               "raise calib.num_prompts / calib.num_steps")
    t0 = time.perf_counter()
    layers = prepare(model, specs, cfg.get("attn"))
    n_splits = split_shortcuts(model, calib, device, dtype) if cfg.get("split_shortcut") else 0
    calibrate_weights(layers, freeze=False)
    by_name = {s.name: s for s in specs}
    plan = _plan(layers, by_name, search)
    alphas = alpha_grid(search).to(device)
    n_keep = max(1, int(search.act_inputs))
    keep = set(np.linspace(0, len(calib) - 1, min(n_keep, len(calib))).round().astype(int).tolist())
    sizes = count_layer_inputs(model, list(plan), calib[0], device, dtype).counts
    for n in [n for n in plan if n not in sizes]:  # never called by the denoiser: nothing to score
        log.warning("layer %s receives no input in a denoiser call: its FP format is not searched", n)
        del plan[n]
    budget = int(search.memory_mb) * 2**20
    chunks = _plan_chunks(list(plan), {n: _stat_bytes(layers[n], *plan[n], sizes[n], len(keep)) for n in plan}, budget)
    chosen: dict[str, Counter] = {"weight": Counter(), "act": Counter()}
    searched_acts, ratios = [], []
    with tqdm(total=len(plan), desc="FP format search", unit="layer") as progress:
        for chunk in chunks:
            stats = _collect(model, layers, {n: plan[n] for n in chunk}, calib, keep, device, dtype)
            for name in chunk:
                do_weight, do_act = plan[name]
                if do_weight:
                    fmt_name, ratio = _set_weight(layers[name], by_name[name], stats[name], alphas)
                    chosen["weight"][fmt_name] += 1
                    ratios.append(ratio.cpu())
                if do_act and stats[name].inputs:
                    chosen["act"][_set_act(layers[name], by_name[name], stats[name], alphas)] += 1
                    searched_acts.append(layers[name].input_quantizer)
                progress.update()
            del stats
    for layer in layers.values():
        if layer.weight_quantizer is not None:
            layer.freeze(keep_original=cfg.get("keep_fp_weights", True))
    n_act = calibrate_activations(model, calib, device, dtype, skip=searched_acts)
    all_ratios = torch.cat(ratios) if ratios else torch.zeros(0)
    summary = {
        "weight_formats": dict(sorted(chosen["weight"].items())),
        "act_formats": dict(sorted(chosen["act"].items())),
        "mean_weight_alpha": round(float(all_ratios.mean()), 4) if all_ratios.numel() else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("FP format search over %d layers: weights %s, inputs %s (%.1f s)", len(plan),
             summary["weight_formats"] or "-", summary["act_formats"] or "-", summary["seconds"])
    return {"layers_quantized": len(layers), "act_quantizers_calibrated": n_act + len(searched_acts),
            "shortcut_splits": n_splits, "fp_search": summary}


def check_specs(specs: Sequence[LayerSpec], cfg: Mapping[str, Any]) -> None:
    """ConfigError, before calibration, for timestep-grouped inputs the search would have to search
    group by group (it searches one format and range per layer input)."""
    if typed(SearchConfig, cfg.get("search"), "quant.search").act:
        grouped = [s.name for s in specs if s.quantized and s.act is not None and s.act.timestep_groups > 1]
        if grouped:
            raise ConfigError(f"method fp_search searches one activation format per layer, but {grouped[:3]} have "
                              "timestep_groups > 1: set quant.search.act=false or drop timestep_groups")


apply.check_specs = check_specs
