"""Deploy a quantized denoiser: each quantized layer becomes a real low-bit layer where a backend has a
kernel for its formats, and stays diffq's simulated (fake-quant) layer otherwise.

A *lowering* is one way to run a layer for real (a registered :class:`Lowering`, one file each under
:mod:`diffq.deployment.lowerings`): which formats it takes, why it does not apply to a given layer and
device, and how it builds the layer from diffq's own grid values and scales (:mod:`diffq.deployment.grid`).
:func:`deploy_denoiser` tries a backend's lowerings in registration order and returns the coverage
table: every quantized layer, with the kernel it got or the reason it stays simulated.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from diffq.attention import QuantAttnProcessor, attention_modules
from diffq.deployment.grid import ActRange, WeightGrid, act_range, weight_grid
from diffq.errors import ConfigError
from diffq.layers import dequantize_layer_, layer_table
from diffq.registry import Registry
from diffq.weight_sources import WeightSource

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "LOWERINGS", "DeployReport", "Lowering", "Placement", "deploy_denoiser", "replace_weight"]

KERNEL, DEQUANT, SIMULATED = "kernel", "dequantized per call", "simulated"
BACKENDS = {"torchao": "torchao"}  # backend name -> the package it needs


@dataclass(frozen=True)
class Lowering:
    """One way to run a quantized layer on a real kernel.

    ``why_not(layer, act, device)`` is None when it applies, else the reason it does not;
    ``build(layer, grid, act)`` turns the layer (in place, or by returning a replacement module) into
    its deployed form; ``compute`` is :data:`KERNEL` (low-bit compute) or :data:`DEQUANT` (low-bit
    storage, the weight decoded in each call); ``tensor`` names what the weight becomes."""

    backend: str
    rank: int  # tried in increasing order: kernels before storage-only forms
    formats: tuple[str, ...]
    ops: tuple[type, ...]
    compute: str
    tensor: str
    why_not: Callable[[nn.Module, ActRange | None, torch.device], str | None]
    build: Callable[[nn.Module, WeightGrid, ActRange | None], nn.Module]


LOWERINGS: Registry[Lowering] = Registry("deploy lowering", "diffq.deployment.lowerings")


@dataclass(frozen=True)
class Placement:
    """One row of the coverage table: a quantized layer and how the deployment runs it."""

    layer: str
    op: str
    weight: str
    act: str
    compute: str
    how: str


@dataclass
class DeployReport:
    """What :func:`deploy_denoiser` did: a :class:`Placement` for every quantized layer."""

    backend: str
    device: str
    rows: list[Placement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what runs simulated beside the layers (attention matmuls)

    def count(self, compute: str) -> int:
        """How many layers run as ``compute`` (kernel, dequantized per call or simulated)."""
        return sum(r.compute == compute for r in self.rows)

    def table(self) -> str:
        """The coverage table as text (spec.txt's "deployment" section)."""
        head = (f"deployment: backend {self.backend} on {self.device}: {self.count(KERNEL)} kernel, "
                f"{self.count(DEQUANT)} {DEQUANT}, {self.count(SIMULATED)} simulated")
        width = max([len(r.layer) for r in self.rows] + [5])
        lines = [head, *self.notes, f"{'layer':<{width}}  {'op':<7} {'weight':<18} {'act':<26} {'compute':<21} how"]
        lines += [f"{r.layer:<{width}}  {r.op:<7} {r.weight:<18} {r.act:<26} {r.compute:<21} {r.how}"
                  for r in self.rows]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """JSON form (metrics.json)."""
        return {"backend": self.backend, "device": self.device, "notes": self.notes, "kernel": self.count(KERNEL),
                "dequantized": self.count(DEQUANT), "simulated": self.count(SIMULATED),
                "layers": [asdict(r) for r in self.rows]}


def mark_deployed(model: nn.Module, report: DeployReport) -> None:
    """Record on ``model`` the deployment it went through (read back by :func:`deployment_of`)."""
    model.__dict__["_diffq_deployment"] = report


def deployment_of(model: nn.Module) -> DeployReport | None:
    """The report of the deployment ``model`` went through (None: not deployed)."""
    return model.__dict__.get("_diffq_deployment")


def replace_weight(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """Turn a quantized layer back into its plain class (nn.Linear / nn.Conv2d) holding ``weight``
    (a torchao tensor): what plain diffusers with torchao loads and runs."""
    dequantize_layer_(layer)
    del layer._parameters["weight"]
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


class HeldWeight(WeightSource):
    """A simulated layer's weight held as a torchao int8-held tensor (diffq's grid values and scales)
    and decoded in each call: the layer keeps diffq's exact fake-quant numerics, input quantizer
    included, at the memory of its codes."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.tensor = tensor

    def weight(self, layer: nn.Module) -> torch.Tensor:
        return self.tensor.dequantize()

    def shape(self, layer: nn.Module) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202  (.to(device) moves the held tensor too)
        self.tensor = fn(self.tensor)
        return self


def _keep_simulated(layer: nn.Module) -> str:
    """Leave ``layer`` on diffq's fake-quant with one weight in memory: its codes, int8-held, where its
    grid allows (what ``how`` then says), else its fake-quant weight in place of the FP one."""
    if layer.weight_quantizer is None or layer.weight.numel() == 0:  # FP, or held as packed codes
        return ""
    from diffq.deployment.lowerings.torchao_intx import BITS, intx_weight

    try:
        grid = weight_grid(layer)
    except ValueError:
        grid = None
    if grid is not None and grid.format in BITS:
        layer.use_source(HeldWeight(intx_weight(grid, layer.weight.dtype)))
        layer.weight = nn.Parameter(torch.empty(0, dtype=layer.weight.dtype, device=layer.weight.device),
                                    requires_grad=False)
        return " (weight held as int8 codes)"
    learned = layer.weight_source.learned
    layer.weight.data = layer.quantized_weight().detach().to(layer.weight.dtype)
    layer.cache_weight(layer.weight.data, learned=learned)
    return ""


def _describe_weight(layer: nn.Module) -> str:
    wq = layer.weight_quantizer
    return "fp" if wq is None else f"{wq.fmt.name}/{wq.layout.granularity}"


def _describe_act(layer: nn.Module) -> str:
    q = layer.input_quantizer
    if q is None:
        return "fp"
    part = q.parts[0] if hasattr(q, "parts") else q
    mode = "dynamic" if part.dynamic else "static"
    sym = "sym" if getattr(part, "symmetric", True) else "asym"
    return f"{part.fmt.name}/{part.layout.granularity} {mode} {sym}"


def _blocker(layer: nn.Module) -> str | None:
    """Why no kernel can run ``layer`` whatever its formats (None: nothing in the way)."""
    if layer.weight_quantizer is None:
        return "weight stays floating point"
    if layer.side is not None:
        return "low-rank side branch beside the quantized weight"
    if layer.bos_weight is not None:
        return "BOS-aware K/V projection (token 0 through an FP weight)"
    return None


def _choose(layer: nn.Module, backend: str, device: torch.device) -> tuple[Lowering | None, str]:
    """The first lowering of ``backend`` that applies to ``layer``, or None and the reason."""
    blocked = _blocker(layer)
    if blocked:
        return None, blocked
    try:
        grid_fmt, act = layer.weight_quantizer.fmt.name, act_range(layer)
    except ValueError as e:
        return None, str(e)
    candidates = sorted((low for name in LOWERINGS.names() if (low := LOWERINGS.get(name)).backend == backend
                         and grid_fmt in low.formats and isinstance(layer, low.ops)), key=lambda low: low.rank)
    if not candidates:
        return None, f"no {backend} kernel for {grid_fmt} weights in a {type(layer).__name__.removeprefix('Quant')}"
    reasons = []
    for low in candidates:
        reason = low.why_not(layer, act, device)
        if reason is None:
            return low, low.tensor
        reasons.append(reason)
    return None, reasons[0]


def check_backend(backend: str) -> None:
    """ConfigError naming the fix when ``backend`` is unknown or its package is not installed."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown deploy backend {backend!r}; available: {', '.join(BACKENDS)}")
    if importlib.util.find_spec(BACKENDS[backend]) is None:
        raise ConfigError(f"deploy={backend} needs the {BACKENDS[backend]} package: pip install -e '.[deploy]'")


@torch.no_grad()
def deploy_denoiser(model: nn.Module, backend: str = "torchao", device: torch.device | None = None) -> DeployReport:
    """Lower every quantized layer of ``model`` that ``backend`` has a kernel for (in place); the
    others stay simulated, their FP weight dropped (they compute with the cached fake-quant weight)."""
    check_backend(backend)
    device = device or next(model.parameters()).device
    layers = layer_table(model)
    if not layers:
        raise ConfigError("the denoiser has no quantized layers (already deployed, or never quantized): quantize it "
                          "with diffq.quantize or load an export with diffq.load_denoiser before deploying")
    plans = {name: _choose(layer, backend, device) for name, layer in layers.items()}
    report = DeployReport(backend, str(device))
    attention = [n for n, m in attention_modules(model).items() if isinstance(m.processor, QuantAttnProcessor)]
    if attention:
        report.notes.append(f"attention matmuls of {len(attention)} modules: simulated (diffq's quantized attention "
                            "processors; plain diffusers runs them in floating point)")
    for name, layer in layers.items():
        low, how = plans[name]
        row = dict(layer=name, op=type(layer).__name__.removeprefix("Quant"), weight=_describe_weight(layer),
                   act=_describe_act(layer))
        if low is None:
            held = _keep_simulated(layer)
            report.rows.append(Placement(**row, compute=SIMULATED, how=how + held))
            continue
        built = low.build(layer, weight_grid(layer), act_range(layer))
        if built is not layer:
            model.set_submodule(name, built)
        report.rows.append(Placement(**row, compute=low.compute, how=how))
    log.info("deployed with %s: %d layers on kernels, %d dequantized per call, %d simulated", backend,
             report.count(KERNEL), report.count(DEQUANT), report.count(SIMULATED))
    return report
