"""Packed low-bit checkpoints: one self-describing safetensors file per quantized denoiser.

Quantized weights are stored as integer codes really packed to their storage width (int8 as
``int8``, FP8 as ``float8`` tensors, 4-bit codes two per byte, 2-bit codes four per byte,
1-bit codes eight per byte) next to the scales needed to decode them. Everything else
(biases, norms, FP layers, activation-quantizer ranges, side branches' ``A`` and ``B`` in their
dtype) is stored as is. The JSON header holds the model class and config, the per-layer spec, the
layout of every packed tensor and each side branch's rank and scale, so :func:`load_denoiser`
rebuilds the quantized model without pickle and bit-exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import diffusers
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from diffq.errors import CheckpointError
from diffq.files import write_safetensors
from diffq.formats import Format
from diffq.layers import add_side_branch, half_of, layer_table, side_branches
from diffq.model_quant import input_splits, prepare
from diffq.quantizer import Quantizer
from diffq.registry import Registry
from diffq.spec import LayerSpec
from diffq.weight_sources import PackedCodes

log = logging.getLogger(__name__)

FORMAT_TAG = "diffq.quantized"
FORMAT_VERSION = 2  # 2: scales stored in their own formats, convolution groups along input channels
WEIGHTS_NAME = "diffusion_model.safetensors"
_FLOAT8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of ``bits`` (1, 2 or 4) bits into bytes, little end first."""
    per_byte = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    return (flat.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    return ((packed.view(-1, 1) >> shifts) & mask).reshape(-1)[:count]


def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """Pack trits (uint8 codes 0..2) five to a byte, ``sum_i c_i 3**i`` (1.6 bits a trit)."""
    flat = codes.reshape(-1).to(torch.int16)
    pad = (-flat.numel()) % 5
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 5) * _POWERS3).sum(dim=1).to(torch.uint8)


_POWERS3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16)
_BASE3_DIGITS = ((torch.arange(256, dtype=torch.int16).view(-1, 1) // _POWERS3) % 3).to(torch.uint8)  # byte -> trits


def unpack_base3(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_base3`: the first ``count`` trits (a 256-entry table lookup per byte)."""
    return _BASE3_DIGITS.to(packed.device)[packed.long()].reshape(-1)[:count]


@dataclass(frozen=True)
class Codec:
    """How the uint8 codes of a format are stored in the safetensors file and read back."""

    accepts: Callable[[Format], bool]
    encode: Callable[[Tensor, Format], Tensor]
    decode: Callable[[Tensor, Mapping[str, Any]], Tensor]


CODECS: Registry[Codec] = Registry("export codec")  # the first codec accepting a format stores it
CODECS.register("float8")(Codec(
    accepts=lambda fmt: fmt.name in _FLOAT8,
    encode=lambda codes, fmt: codes.contiguous().view(_FLOAT8[fmt.name]),
    decode=lambda stored, layout: stored.view(torch.uint8).reshape(layout["shape"]),
))
CODECS.register("int8")(Codec(
    accepts=lambda fmt: fmt.storage_bits == 8,
    encode=lambda codes, fmt: codes.contiguous().view(torch.int8),
    decode=lambda stored, layout: stored.view(torch.uint8).reshape(layout["shape"]),
))
CODECS.register("packed")(Codec(
    accepts=lambda fmt: fmt.storage_bits in (1, 2, 4),
    encode=lambda codes, fmt: pack_bits(codes, fmt.storage_bits),
    decode=lambda stored, layout: unpack_bits(stored, int(layout["bits"]), math.prod(layout["shape"])).reshape(
        layout["shape"]),
))
# chosen by name only (save_denoiser(codec="base3")): 1.6 bits a ternary weight instead of 2, slower to unpack
CODECS.register("base3")(Codec(
    accepts=lambda fmt: fmt.name == "ternary",
    encode=lambda codes, fmt: pack_base3(codes),
    decode=lambda stored, layout: unpack_base3(stored, math.prod(layout["shape"])).reshape(layout["shape"]),
))
AUTO_CODECS = ("float8", "int8", "packed")  # tried in order when no codec is named
PACKED_STORAGE = ("packed", "base3")  # sub-byte storages a loaded model can keep packed in memory (packed=true)


@torch.no_grad()
def encode_tensor(q: Quantizer, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """uint8 codes ``[rows, features]`` of ``x`` under ``q`` and the params (incl. ``shape``) that
    :func:`decode_tensor` needs."""
    v = q.view(x)
    params = {k: t.detach().clone() for k, t in q.qparams(v).items()}
    codes = q.fmt.encode(v, params)
    params["shape"] = torch.tensor(x.shape, dtype=torch.int64)
    return codes, params


@torch.no_grad()
def decode_tensor(q: Quantizer, codes: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """float32 tensor of the original shape, equal to ``q(x)`` for float32 ``x``."""
    shape = tuple(int(s) for s in params["shape"])
    values = {k: v for k, v in params.items() if k != "shape"}
    return q.unview(q.fmt.decode(codes, values, q.layout.grouped_shape(shape)), shape)


def _encode_codes(codes: Tensor, fmt: Format, codec: str | None = None) -> tuple[Tensor, dict[str, Any]]:
    layout = {"shape": list(codes.shape), "bits": fmt.storage_bits, "format": fmt.name}
    for name in ([codec] if codec and CODECS.get(codec).accepts(fmt) else []) + list(AUTO_CODECS):
        if CODECS.get(name).accepts(fmt):
            return CODECS.get(name).encode(codes, fmt), {**layout, "storage": name}
    raise CheckpointError(f"no export codec stores {fmt.name} codes of {fmt.storage_bits} bits; "
                          f"registered codecs: {', '.join(CODECS.names())}")


def _decode_codes(stored: Tensor, layout: Mapping[str, Any]) -> Tensor:
    return CODECS.get(layout["storage"]).decode(stored, layout)


def _json_config(model: nn.Module) -> dict[str, Any]:
    """The model's config as JSON values; diffusers' ``_use_default_values`` (built from a set, so in
    a different order in each process) sorted."""
    config = json.loads(json.dumps(dict(model.config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
    if isinstance(config.get("_use_default_values"), list):
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return config


def save_denoiser(
    model: nn.Module, specs: list[LayerSpec], folder: str | os.PathLike, attn: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None, codec: str | None = None,
) -> Path:
    """Write the quantized ``model`` (a diffusers denoiser) to ``folder``; returns the file path.
    ``codec`` names a codec for the formats it accepts (``base3`` for ternary weights); the others
    are stored by the first of :data:`AUTO_CODECS` that accepts them."""
    if codec is not None:
        CODECS.get(codec)
    layers = layer_table(model)
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    written = set()  # state-dict keys the packed layers hold (weights and their quantizers' parameters)
    for name, layer in layers.items():
        wq = layer.weight_quantizer
        if wq is None:
            continue
        src = layer.weight_source  # a learned rounding's grid values re-quantize to themselves
        codes, params = encode_tensor(wq, (src.weight(layer) if src.learned else layer.weight).detach())
        params.pop("shape")
        half = wq.storage_dtype or half_of(layer.weight.dtype)
        stored, layout = _encode_codes(codes, wq.fmt, codec)
        tensors[f"{name}.weight.codes"] = stored
        layout["params"] = sorted(params)
        layout["param_dtype"] = str(half).removeprefix("torch.")
        layout["weight_shape"] = list(layer.weight.shape)
        layout["weight_dtype"] = str(layer.weight.dtype).removeprefix("torch.")
        for key, value in wq.fmt.to_storage(params, half).items():
            tensors[f"{name}.weight.params.{key}"] = value
        packed[name] = layout
        written |= {f"{name}.weight", *(f"{name}.weight_quantizer.{key}" for key in params)}
    for key, value in model.state_dict().items():
        if key not in written and value.numel() > 0:
            tensors[key] = value
    meta = {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "class_name": type(model).__name__ if not hasattr(model, "_diffq_base") else model._diffq_base.__name__,
        "config": _json_config(model),
        "specs": [s.to_dict() for s in specs],
        "attn": None if attn is None else json.loads(json.dumps(attn, default=str)),
        "packed": packed,
        "splits": input_splits(model),
        "side": {n: {"rank": b.rank, "scale": b.scale} for n, b in side_branches(model).items()},
        "extra": dict(extra or {}),
    }
    path = Path(folder) / WEIGHTS_NAME
    write_safetensors(path, tensors, meta)
    log.info("exported %d quantized layers to %s (%.2f MB)", len(packed), path, path.stat().st_size / 2**20)
    return path


def packable_layers(meta: Mapping[str, Any]) -> list[str]:
    """The layers of an export (its metadata) stored sub-byte, which ``packed=true`` keeps packed."""
    return [name for name, layout in meta["packed"].items() if layout["storage"] in PACKED_STORAGE]


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of an exported checkpoint (file or folder)."""
    path = _resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("diffq")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({e}); "
                              "re-export it with export=true") from e
    if raw is None:
        raise CheckpointError(f"{path} has no diffq metadata: it was not written by diffq's export")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT_TAG or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is a {meta.get('format')} v{meta.get('version')} file; expected {FORMAT_TAG} "
                              f"v{FORMAT_VERSION}: re-export it with this diffq version (export=true)")
    return meta


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise CheckpointError(f"quantized checkpoint {p} does not exist; export one with `python -m diffq export=true`")
    return p


def _check_matches(model: nn.Module, meta: Mapping[str, Any]) -> None:
    cls = getattr(model, "_diffq_base", type(model)).__name__
    if cls != meta["class_name"]:
        raise CheckpointError(f"checkpoint holds a {meta['class_name']} but the model is a {cls}: "
                              "load it into the same model")
    mine = _json_config(model)
    diffs = sorted(k for k, v in meta["config"].items() if not k.startswith("_") and k in mine and mine[k] != v)
    if diffs:
        raise CheckpointError(
            f"checkpoint config differs from the model in {diffs[:5]}: it was exported from another model "
            "(use the same model config, or load without passing a model)"
        )


def _assign(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        param = module._parameters[attr]
        param.data = value.to(param.device, param.dtype if value.is_floating_point() else value.dtype)
    elif attr in module._buffers or hasattr(module, attr):
        old = module._buffers.get(attr)
        if old is not None and old.is_floating_point() and value.is_floating_point():
            value = value.to(old.dtype)  # the model's dtype (a lossless upcast for quantizer parameters)
        module._buffers[attr] = value
    else:
        raise CheckpointError(f"checkpoint tensor {key} has no place in the model: it was exported from another model")


class PackedWeight(nn.Module):
    """A layer's weight kept as its packed codes (the packed inference backend): unpacked at each
    forward, so only the codes and the scales stay resident."""

    def __init__(self, stored: Tensor, layout: Mapping[str, Any]) -> None:
        super().__init__()
        self.register_buffer("stored", stored, persistent=False)
        self.layout = dict(layout)
        self.shape = tuple(layout["weight_shape"])
        self.dtype = getattr(torch, layout["weight_dtype"])

    def forward(self, q: Quantizer) -> Tensor:
        """The weight, decoded with the quantizer's parameters (equal to the unpacked load)."""
        codes = _decode_codes(self.stored, self.layout).to(self.stored.device)
        w = decode_tensor(q, codes, {**q.params(), "shape": torch.tensor(self.shape)})
        return w.to(self.dtype).contiguous()


@torch.no_grad()
def load_denoiser(path: str | os.PathLike, model: nn.Module | None = None, packed: bool = False) -> nn.Module:
    """Rebuild an exported quantized denoiser (into ``model`` when given, else from its config).

    ``packed``: weights stored by a sub-byte codec (2-bit, base-3, 4-bit packing) stay packed in
    memory and are unpacked layer by layer at forward time (:class:`PackedWeight`); the model then
    runs quantized only (no float mode, no re-export).

    Into a ``model`` of another floating dtype than the export's (a float32 export into a bfloat16
    pipeline, or the reverse) the weights are decoded from their codes and cast to the model's dtype."""
    file = _resolve(path)
    meta = read_metadata(file)
    dtype = None if model is None else next(model.parameters()).dtype
    if model is None:
        cls = getattr(diffusers, meta["class_name"], None)
        if cls is None:
            raise CheckpointError(f"diffusers has no class {meta['class_name']}; "
                                  "upgrade diffusers to load this checkpoint")
        model = cls.from_config(meta["config"])
    else:
        _check_matches(model, meta)
    specs = [LayerSpec.from_dict(d) for d in meta["specs"]]
    prepare(model, specs, meta["attn"], meta.get("splits", {}))
    for name, side in meta.get("side", {}).items():  # zero branches; A and B are read below
        add_side_branch(model.get_submodule(name), int(side["rank"]), float(side["scale"]))
    try:
        with safe_open(str(file), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is corrupt ({e}); re-export it with export=true") from e
    layers = layer_table(model)
    for name, layout in meta["packed"].items():
        if name not in layers:
            raise CheckpointError(f"checkpoint layer {name} is not a quantized layer of the model")
        raw = stored.pop(f"{name}.weight.codes")
        layer = layers[name]
        wq = layer.weight_quantizer
        params = wq.fmt.from_storage({k: stored.pop(f"{name}.weight.params.{k}") for k in layout["params"]})
        wq.set_params(**params)
        if dtype is not None:
            layout = {**layout, "weight_dtype": str(dtype).removeprefix("torch.")}
        if packed and layout["storage"] in PACKED_STORAGE:
            codes = PackedWeight(raw, layout)
            layer.use_source(PackedCodes(codes))
            layer.weight = nn.Parameter(torch.empty(0, dtype=codes.dtype), requires_grad=False)
            continue
        codes = _decode_codes(raw, layout)
        w = decode_tensor(wq, codes, {**params, "shape": torch.tensor(layout["weight_shape"])})
        w = w.to(getattr(torch, layout["weight_dtype"])).contiguous()
        layer.weight.data = w
        layer.cache_weight(layer.weight.data)
    expected = {k for k, v in model.state_dict().items() if v.numel() > 0} - {f"{n}.weight" for n in meta["packed"]}
    missing = sorted(k for k in expected - set(stored) if "quantizer" not in k)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}: "
                              "the file is truncated or from another model")
    for key, value in stored.items():
        _assign(model, key, value)
    return model.eval()


def export_quantized(*args: Any, **kwargs: Any) -> Path:
    """The former name of :func:`save_denoiser` (kept for one release; it warns)."""
    warnings.warn("diffq.export_quantized is now diffq.save_denoiser (the pair of diffq.load_denoiser)",
                  DeprecationWarning, stacklevel=2)
    return save_denoiser(*args, **kwargs)


def load_quantized(*args: Any, **kwargs: Any) -> nn.Module:
    """The former name of :func:`load_denoiser` (kept for one release; it warns)."""
    warnings.warn("diffq.load_quantized is now diffq.load_denoiser (the pair of diffq.save_denoiser)",
                  DeprecationWarning, stacklevel=2)
    return load_denoiser(*args, **kwargs)
