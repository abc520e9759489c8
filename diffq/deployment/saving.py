"""A deployed denoiser as a folder plain diffusers with torchao loads: ``config.json`` with a torchao
``quantization_config`` and ``diffusion_pytorch_model.safetensors`` holding torchao's flattened tensors
(safetensors, no pickle), plus ``diffq_deployment.json`` (the coverage table).

What plain diffusers runs: every torchao layer as deployed; a ternary layer as torchao's int8-held
int2 tensor (torchao has no 2-bit packed tensor; :func:`load_deployed` packs it again); a layer left
simulated as a plain layer holding its weight (int8-held codes, or its fake-quant weight), its input
unquantized (its row in ``diffq_deployment.json`` says so).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from diffq.deployment.grid import WeightGrid
from diffq.deployment.lowering import SIMULATED, DeployReport, HeldWeight, Placement, deployment_of, mark_deployed
from diffq.deployment.lowerings.ternary import KERNEL_NAME, TernaryLinear
from diffq.deployment.lowerings.torchao_intx import intx_weight
from diffq.errors import CheckpointError
from diffq.files import write_safetensors_with
from diffq.kernels.ternary import unpack_ternary

log = logging.getLogger(__name__)

__all__ = ["COVERAGE_NAME", "load_deployed", "save_deployed"]

COVERAGE_NAME = "diffq_deployment.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_DIFFQ_PARTS = ("weight_quantizer", "input_quantizer", "weight_source")


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plain diffusers expects: diffq's quantizer state dropped, ternary layers as
    torchao int2 tensors."""
    state = {k: v for k, v in model.state_dict().items()
             if not any(f".{part}." in f".{k}" for part in _DIFFQ_PARTS) and k.rpartition(".")[2] != "bos_weight"}
    for name, module in model.named_modules():
        if isinstance(getattr(module, "weight_source", None), HeldWeight):
            state[f"{name}.weight"] = module.weight_source.tensor
        if isinstance(module, TernaryLinear):
            state.pop(f"{name}.packed")
            scale = state.pop(f"{name}.scale")
            values = unpack_ternary(module.packed, module.in_features, torch.float32)
            grid = WeightGrid(values, scale[:, None], (1, module.in_features), "ternary")
            state[f"{name}.weight"] = intx_weight(grid, module.bias.dtype if module.bias is not None else torch.float32)
    return state


def save_deployed(target: Any, folder: str | os.PathLike) -> Path:
    """Write the deployed denoiser of ``target`` (pipeline or denoiser) to ``folder``; returns it."""
    from diffusers import TorchAoConfig
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict
    from torchao.quantization import Int8WeightOnlyConfig

    from diffq.models.loading import denoiser_of

    model = target if isinstance(target, nn.Module) else denoiser_of(target)[1]
    report = deployment_of(model)
    if report is None:
        raise CheckpointError("the model was not deployed: call diffq.deploy(pipe) before save_deployed")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = getattr(model, "_diffq_base", type(model)).__name__
    config["quantization_config"] = TorchAoConfig(Int8WeightOnlyConfig()).to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    flat, metadata = flatten_tensor_state_dict(_plain_state(model))
    write_safetensors_with(folder / WEIGHTS_NAME, flat, metadata)
    (folder / COVERAGE_NAME).write_text(json.dumps(report.to_dict(), indent=1))
    if report.count(SIMULATED):
        log.info("%d simulated layers saved without their input quantization: plain diffusers runs their inputs "
                 "in floating point (diffq_deployment.json lists them)", report.count(SIMULATED))
    return folder


def load_deployed(folder: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_deployed` with plain diffusers, then pack its ternary layers
    into diffq's 2-bit kernel again; the coverage report is attached (``diffq.deployment.deployment_of``)."""
    folder = Path(folder)
    if not (folder / COVERAGE_NAME).is_file():
        raise CheckpointError(f"{folder} holds no deployed model ({COVERAGE_NAME} missing): write one with "
                              "diffq.save_deployed or python -m diffq ... deploy=torchao")
    meta = json.loads((folder / COVERAGE_NAME).read_text())
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    model = cls.from_pretrained(folder, torch_dtype=_dtype_of(folder)).to(device)
    for name in (r["layer"] for r in meta["layers"] if r["how"] == KERNEL_NAME):
        module = model.get_submodule(name)
        weight = module.weight
        grid = WeightGrid(weight.qdata.float(), weight.scale.float(), (1, weight.shape[1]), "ternary")
        bias = None if module.bias is None else module.bias.detach()
        model.set_submodule(name, TernaryLinear.from_grid(grid, bias))
    report = DeployReport(meta["backend"], str(device), notes=meta.get("notes", []))
    report.rows = [Placement(**r) for r in meta["layers"]]
    mark_deployed(model, report)
    return model.eval()


def _dtype_of(folder: Path) -> torch.dtype:
    """The floating dtype the saved tensors hold (the model's)."""
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            t = f.get_slice(key)
            if t.get_dtype() in ("BF16", "F16", "F32") and key.endswith(".bias"):
                return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[t.get_dtype()]
    return torch.float32
