"""``Quantizer``: a number format + granularity + scale state, fake-quantizing with an STE.

Every tensor is handled through a grouped view ``[rows, groups, group_size]``: weights
``[out, ...]`` become ``[out, 1, K]`` (tensor / channel) or ``[out, K/g, g]`` (group / block),
activations (feature axis moved last, other axes flattened into tokens) become ``[N, 1, C]``
or ``[N, C/g, g]``. Scales broadcast against that view: tensor ``[1, 1, 1]``, weight channel
``[out, 1, 1]``, activation channel ``[1, 1, C]``, token ``[N, 1, 1]``, group ``[rows, G, 1]``.
"""
from __future__ import annotations

import math
import re
from typing import Literal

import torch
from torch import Tensor, nn

from diffq.errors import CalibrationError, ConfigError
from diffq.formats import BinaryFormat, BlockFormat, Format, IntFormat, NVFP4Format

__all__ = ["Quantizer"]

_EPS = 1e-12  # smallest scale: all-zero channels quantize to exact zeros, 1/scale stays finite
_OBSERVERS = ("minmax", "percentile", "mse", "absmean", "absmedian")
_RESERVOIR_ROWS = 4096
_QUANTILE_MAX = 2**24
_MSE_ALPHAS = torch.cat([torch.linspace(0.1, 1.2, 100), torch.ones(1)])  # 1.0 = plain min-max


def _parse_granularity(granularity: str) -> tuple[str, int | None]:
    if granularity in ("tensor", "channel", "token", "block"):
        return granularity, None
    m = re.fullmatch(r"group:(\d+)", granularity)
    if m and int(m[1]) > 0:
        return "group", int(m[1])
    raise ConfigError(
        f"unknown granularity {granularity!r}; use tensor, channel, token, group:<g> (e.g. group:64) or block"
    )


def _flatten(v: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, list[int]]:
    """``v`` as [kept, reduced] plus the keepdim shape of the kept axes."""
    keep = [d for d in range(v.dim()) if d not in dims]
    kept_shape = [v.shape[d] if d in keep else 1 for d in range(v.dim())]
    return v.permute(*keep, *dims).reshape(math.prod(kept_shape), -1), kept_shape


class Quantizer(nn.Module):
    """Fake-quantizer of one weight or activation tensor (see the module docstring for shapes).

    ``observer``: minmax (global, or EMA ``running = m*running + (1-m)*batch`` with
    ``momentum=m``), percentile (per-batch quantile averaged over batches), mse (search of
    ``alpha*range``, alpha in [0.1, 1.2]), absmean / absmedian (the scale itself is mean / median
    ``|x|``, BitNet's ternary rule). Token, group and block activation quantizers are dynamic.
    """

    def __init__(
        self,
        fmt: Format,
        *,
        kind: Literal["weight", "act"],
        granularity: str = "tensor",
        symmetric: bool = True,
        observer: str = "minmax",
        percentile: float = 99.99,
        momentum: float | None = None,
        dynamic: bool = False,
        feature_axis: int = -1,
        learnable: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("weight", "act"):
            raise ConfigError(f"quantizer kind must be 'weight' or 'act' (got {kind!r})")
        if observer not in _OBSERVERS:
            raise ConfigError(f"unknown observer {observer!r}; valid observers: {', '.join(_OBSERVERS)}")
        if not 0.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (0, 100] (got {percentile}); e.g. 99.99")
        self.fmt = fmt
        self.kind = kind
        self.granularity, self.group = _parse_granularity(granularity)
        self.symmetric = symmetric
        self.observer = observer
        self.percentile = percentile
        self.momentum = momentum
        self.feature_axis = feature_axis
        self.dynamic = dynamic or (kind == "act" and self.granularity in ("token", "group", "block"))
        self.learnable = False
        self.enabled = True
        self.name = ""
        self._check_config()
        if isinstance(fmt, BlockFormat):
            self.group = fmt.block_size
            self.dynamic = self.dynamic or kind == "act"
        self.register_buffer("scale", torch.empty(0))
        if not symmetric:
            self.register_buffer("zero_point", torch.empty(0))
        if isinstance(fmt, NVFP4Format):
            self.register_buffer("tensor_scale", torch.empty(0))
        if isinstance(fmt, BinaryFormat):
            self.sigma = nn.Parameter(torch.empty(fmt.bases, 0))
        self._calibrating = False
        self._stats: dict[str, Tensor] = {}
        self._shape: tuple[int, ...] | None = None
        self._gen = torch.Generator().manual_seed(0)
        if learnable:
            self.make_learnable()

    def _check_config(self) -> None:
        fmt, gran = self.fmt, self.granularity
        if gran == "token" and self.kind == "weight":
            raise ConfigError("granularity 'token' is for activations; use tensor, channel or group:<g> for weights")
        if isinstance(fmt, BlockFormat) != (gran == "block"):
            raise ConfigError(
                f"format {fmt.name} with granularity {gran!r}: block formats (nvfp4, mxfp4) need "
                "granularity=block and granularity=block needs a block format; use group:<g> otherwise"
            )
        if isinstance(fmt, BlockFormat) and self.observer != "minmax":
            raise ConfigError(f"{fmt.name} sets its block scales from the block max; use observer=minmax")
        if isinstance(fmt, BinaryFormat) and (self.kind != "weight" or gran != "channel"):
            raise ConfigError(f"{fmt.name} quantizes weights per output channel; use kind=weight, granularity=channel")
        if not self.symmetric and not (isinstance(fmt, IntFormat) and not fmt.signed):
            raise ConfigError(
                f"asymmetric quantization needs an unsigned int format (got {fmt.name}); "
                "use make_format('int', bits, symmetric=False) or set symmetric=true"
            )
        if not self.symmetric and self.observer in ("absmean", "absmedian"):
            raise ConfigError(f"observer {self.observer} is symmetric only; set symmetric=true or use minmax")
        if self.dynamic and self.observer == "mse":
            raise ConfigError("observer mse searches once at calibration; use minmax or percentile with dynamic ranges")

    # ----------------------------------------------------------------- views
    def _grouped_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        if self.kind == "weight":
            rows, k = shape[0], math.prod(shape[1:])
        else:
            k = shape[self.feature_axis]
            rows = math.prod(shape) // max(k, 1)
        gs = self.group or k
        if k % gs:
            divisor = max(d for d in range(1, gs + 1) if k % d == 0)
            raise ConfigError(
                f"group size {gs} does not divide K={k} (features of layer {self.name or '<unnamed>'}); "
                f"use a divisor of {k}, e.g. group:{divisor}, or skip this layer"
            )
        return rows, k // gs, gs

    def _view(self, x: Tensor) -> Tensor:
        shape = self._grouped_shape(tuple(x.shape))
        if self.kind == "act":
            x = x.movedim(self.feature_axis, -1)
        return x.reshape(shape)

    def _unview(self, v: Tensor, shape: tuple[int, ...]) -> Tensor:
        if self.kind == "weight":
            return v.reshape(shape)
        axis = self.feature_axis % len(shape)
        moved = [*shape[:axis], *shape[axis + 1 :], shape[axis]]
        return v.reshape(moved).movedim(-1, axis)

    @property
    def _reduce(self) -> tuple[int, ...]:
        """Axes of the grouped view that one scale covers."""
        if self.granularity == "tensor":
            return (0, 1, 2)
        if self.granularity == "channel" and self.kind == "act":
            return (0, 1)
        return (2,)

    # ------------------------------------------------------------ range maths
    def _batch_range(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """(lo, hi) of one tensor per kept group, by the observer's statistic."""
        dims = self._reduce
        if self.observer in ("minmax", "mse"):
            if self.symmetric:
                hi = v.abs().amax(dims, keepdim=True)
                return -hi, hi
            return v.amin(dims, keepdim=True), v.amax(dims, keepdim=True)
        flat, kept = _flatten(v, dims)
        if self.observer == "percentile":
            flat = flat[:, :: math.ceil(flat.numel() / _QUANTILE_MAX)]
            p = self.percentile / 100.0
            if self.symmetric:
                hi = torch.quantile(flat.abs(), p, dim=1)
                return -hi.reshape(kept), hi.reshape(kept)
            lo, hi = torch.quantile(flat, torch.tensor([1.0 - p, p], device=flat.device), dim=1)
            return lo.reshape(kept), hi.reshape(kept)
        hi = flat.abs().mean(1) if self.observer == "absmean" else flat.abs().median(1).values
        return -hi.reshape(kept), hi.reshape(kept)

    def _qparams_from_range(self, lo: Tensor, hi: Tensor) -> dict[str, Tensor]:
        fmt = self.fmt
        if isinstance(fmt, BlockFormat):
            amax = torch.maximum(-lo, hi)
            params = {"scale": fmt.block_scales(amax, amax.amax())}
            if isinstance(fmt, NVFP4Format):
                params["tensor_scale"] = fmt.tensor_scale(amax.amax())
            return params
        if self.observer in ("absmean", "absmedian"):
            return {"scale": hi.clamp_min(_EPS)}
        if self.symmetric:
            return {"scale": (torch.maximum(-lo, hi) / fmt.maxval).clamp_min(_EPS)}
        assert isinstance(fmt, IntFormat)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_min(_EPS)
        zero_point = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax)
        return {"scale": scale, "zero_point": zero_point}

    def _grid(self, v: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Grid values (int: codes incl. zero point) of ``v``; when a gradient is needed, STE on
        rounding, zero outside the grid's range (inclusive bounds, like the fused kernels)."""
        fmt = self.fmt
        y = v * (1.0 / params["scale"])  # reciprocal-multiply, exactly as torch's fake_quantize kernels
        if isinstance(fmt, IntFormat):
            q = torch.round(y.detach())
            if "zero_point" in params:
                q.add_(params["zero_point"])
            inside = (q >= fmt.qmin) & (q <= fmt.qmax) if y.requires_grad else None
            q.clamp_(fmt.qmin, fmt.qmax)
        else:
            inside = y.detach().abs() <= fmt.maxval if y.requires_grad else None
            q = fmt.round(y.detach())
        return q if inside is None else q + (y - y.detach()) * inside

    @staticmethod
    def _dequant(q: Tensor, params: dict[str, Tensor]) -> Tensor:
        if q.requires_grad:
            q = q - params["zero_point"] if "zero_point" in params else q
            return q * params["scale"]
        if "zero_point" in params:  # q is a fresh temporary: work in place (this is the hot path)
            q.sub_(params["zero_point"])
        return q.mul_(params["scale"])

    def _params(self, v: Tensor) -> dict[str, Tensor]:
        """Quantization parameters for the grouped view ``v``: stored (static) or from ``v`` (dynamic)."""
        if isinstance(self.fmt, BinaryFormat):
            if self.sigma.numel() == 0:
                raise self._uncalibrated()
            return {"sigma": self.sigma}
        if self.dynamic:
            return self._qparams_from_range(*self._batch_range(v))
        if self.scale.numel() == 0:
            raise self._uncalibrated()
        names = ("scale", "zero_point", "tensor_scale")
        return {n: getattr(self, n) for n in names if isinstance(getattr(self, n, None), Tensor)}

    def _uncalibrated(self) -> CalibrationError:
        fix = "calibrate_weight(weight)" if self.kind == "weight" else "begin_calibration(), forward batches, end_calibration()"
        return CalibrationError(
            f"quantizer of layer {self.name or '<unnamed>'} ({self.extra_repr()}) is used before calibration; "
            f"fix: run {fix} or load a calibrated state_dict"
        )

    # ------------------------------------------------------------ calibration
    @property
    def needs_calibration(self) -> bool:
        """True when the quantizer has static state to set from data (i.e. it is not dynamic)."""
        return not self.dynamic

    def begin_calibration(self) -> None:
        """Start observing: forward records statistics and returns its input unchanged."""
        self._calibrating = True
        self._stats = {}
        self._gen.manual_seed(0)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Record the statistics of one batch (raises CalibrationError on NaN/Inf)."""
        if not torch.isfinite(x).all():
            what = "weights" if self.kind == "weight" else "activations"
            raise CalibrationError(
                f"NaN/Inf in {what} of layer {self.name or '<unnamed>'} during calibration: no range can be "
                "set from non-finite values; fix: check the calibration data and run the model in float32 "
                "(float16 overflows)"
            )
        self._shape = tuple(x.shape)
        if self.dynamic:
            return
        v = self._view(x.float())
        stats = self._stats
        if self.observer == "mse" or isinstance(self.fmt, BinaryFormat):
            self._keep_sample(v)
        lo, hi = self._batch_range(v)
        if "lo" not in stats:
            stats.update(lo=lo, hi=hi, count=torch.ones(()))
        elif self.observer in ("minmax", "mse") and self.momentum is None:
            stats.update(lo=torch.minimum(stats["lo"], lo), hi=torch.maximum(stats["hi"], hi))
        elif self.observer in ("minmax", "mse"):
            m = self.momentum
            stats.update(lo=m * stats["lo"] + (1 - m) * lo, hi=m * stats["hi"] + (1 - m) * hi)
        else:
            stats.update(lo=stats["lo"] + lo, hi=stats["hi"] + hi, count=stats["count"] + 1)

    def _keep_sample(self, v: Tensor) -> None:
        """Weights: keep the tensor. Activations: uniform reservoir of up to 4096 rows (smallest random keys)."""
        if self.kind == "weight":
            self._stats["sample"] = v
            return
        keys = torch.rand(v.shape[0], generator=self._gen)
        if "sample" in self._stats:
            v = torch.cat([self._stats["sample"], v])
            keys = torch.cat([self._stats["keys"], keys])
        if v.shape[0] > _RESERVOIR_ROWS:
            keep = keys.topk(_RESERVOIR_ROWS, largest=False).indices
            v, keys = v[keep], keys[keep]
        self._stats.update(sample=v, keys=keys)

    @torch.no_grad()
    def end_calibration(self) -> None:
        """Turn the observed statistics into the static scale (and zero point / sigma)."""
        self._calibrating = False
        stats, self._stats = self._stats, {}
        if self.dynamic:
            return
        name = self.name or "<unnamed>"
        if "lo" not in stats:
            raise CalibrationError(
                f"quantizer of layer {name} observed no data during calibration; fix: make sure the "
                "calibration batches are not empty and reach this layer between begin_calibration() and "
                "end_calibration()"
            )
        if isinstance(self.fmt, BinaryFormat):
            sample = stats["sample"]
            self.sigma = nn.Parameter(self.fmt.init_sigma(sample.reshape(sample.shape[0], -1)))
            return
        lo, hi = stats["lo"] / stats["count"], stats["hi"] / stats["count"]
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise CalibrationError(
                f"calibration statistics of layer {name} are NaN/Inf (overflow); fix: check the calibration "
                "data and run the model in float32"
            )
        if self.observer == "mse":
            lo, hi = self._mse_search(stats["sample"], lo, hi)
        for key, value in self._qparams_from_range(lo, hi).items():
            setattr(self, key, nn.Parameter(value) if key == "scale" and self.learnable else value)

    def _mse_search(self, v: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Per kept group, the ``alpha`` in [0.1, 1.2] (and 1.0) minimising the fake-quant squared error."""
        dims = [d + 1 for d in self._reduce]
        chunk = max(1, _QUANTILE_MAX // max(v.numel(), 1))
        candidates = _MSE_ALPHAS.to(v.device)
        errors = []
        for alphas in candidates.split(chunk):
            a = alphas.view(-1, 1, 1, 1)
            params = self._qparams_from_range(a * lo, a * hi)
            err = self._dequant(self._grid(v[None], params), params) - v
            errors.append(err.square().sum(dims, keepdim=True))
        best = candidates[torch.cat(errors).argmin(0)]
        return best * lo, best * hi

    def calibrate_weight(self, w: Tensor) -> None:
        """Set the static scale of a weight quantizer from the weight itself."""
        self.begin_calibration()
        self.observe(w.detach())
        self.end_calibration()

    def make_learnable(self) -> None:
        """Turn the scale into an LSQ-trained ``nn.Parameter`` (now, or at the end of calibration)."""
        if self.dynamic or isinstance(self.fmt, (BlockFormat, BinaryFormat)):
            raise ConfigError(
                f"learnable (LSQ) scales need a static scaled format; {self.extra_repr()} has none to learn"
            )
        self.learnable = True
        if self.scale.numel() and not isinstance(self.scale, nn.Parameter):
            self.scale = nn.Parameter(self.scale.detach().clone())

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (identity while calibrating or when ``enabled`` is False)."""
        if self._calibrating:
            self.observe(x)
            return x
        self._shape = tuple(x.shape)
        if not self.enabled:
            return x
        if self.kind == "act" and self.granularity == "tensor" and not (self.dynamic or self.learnable):
            # static per-tensor activations: scalar params, no view (a view of NCHW would copy twice)
            params = {k: t.reshape(()) for k, t in self._params(x).items()}
            return self._dequant(self._grid(x.float(), params), params).to(x.dtype)
        v = self._view(x.float())
        params = self._params(v)
        if isinstance(self.fmt, BinaryFormat):
            out = self.fmt.fake_quant(v.reshape(v.shape[0], -1), params["sigma"])
        else:
            if self.learnable:
                s = params["scale"]
                g = (v.numel() / s.numel() * self.fmt.maxval) ** -0.5
                params["scale"] = s.detach() + (s * g - (s * g).detach())  # value s, gradient scaled by g
            out = self._dequant(self._grid(v, params), params)
        out = self._unview(out, tuple(x.shape)).to(x.dtype)
        # keep the input's layout: a moved-axis view would send the next conv down another kernel
        return out.contiguous() if x.is_contiguous() else out

    # ----------------------------------------------------------------- export
    @torch.no_grad()
    def quantize_codes(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """uint8 codes [rows, features] of ``x`` and the params (incl. ``shape``) that ``dequantize_codes`` needs."""
        v = self._view(x.float())
        params = {k: t.detach().clone() for k, t in self._params(v).items()}
        if isinstance(self.fmt, BinaryFormat):
            codes = self.fmt.to_codes(self.fmt.signs(v.reshape(v.shape[0], -1), params["sigma"]))
        else:
            codes = self.fmt.to_codes(self._grid(v, params))
        params["shape"] = torch.tensor(x.shape, dtype=torch.int64)
        return codes.reshape(v.shape[0], -1), params

    @torch.no_grad()
    def dequantize_codes(self, codes: Tensor, params: dict[str, Tensor]) -> Tensor:
        """float32 tensor of the original shape, equal to ``forward(x)`` for float32 ``x``."""
        shape = self._shape = tuple(int(s) for s in params["shape"])
        if isinstance(self.fmt, BinaryFormat):
            out = self.fmt.combine(self.fmt.from_codes(codes), params["sigma"])
        else:
            q = self.fmt.from_codes(codes).reshape(self._grouped_shape(shape))
            out = self._dequant(q, params)
        return self._unview(out, shape)

    # ------------------------------------------------------------- accounting
    def bits_per_element(self, shape: tuple[int, ...] | None = None) -> float:
        """Bits per element incl. scale (and zero-point) overhead; static activation scales are free.

        ``shape`` (of the quantized tensor) defaults to the last one seen (calibration, forward or
        dequantize_codes); tensor/channel/token granularities need it.
        """
        fmt = self.fmt
        if isinstance(fmt, BlockFormat):
            return fmt.bits_per_element()
        if self.kind == "act" and not self.dynamic:
            return fmt.bits_per_element(None)
        if self.granularity == "group":
            group_size = self.group
        else:
            shape = shape or self._shape
            if shape is None:
                raise CalibrationError(
                    f"bits_per_element of layer {self.name or '<unnamed>'} needs the tensor shape; "
                    "pass shape=... or calibrate first"
                )
            view = self._grouped_shape(tuple(shape))
            group_size = math.prod(view[d] for d in self._reduce)
        zero_bits = fmt.bits if isinstance(fmt, IntFormat) and not self.symmetric else 0
        return fmt.bits_per_element(group_size, zero_bits=zero_bits)

    def extra_repr(self) -> str:
        gran = f"group:{self.group}" if self.granularity == "group" else self.granularity
        parts = [self.fmt.name, gran, "sym" if self.symmetric else "asym", self.observer]
        parts += ["dynamic"] * self.dynamic + ["learnable"] * self.learnable
        return " ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Resize the (empty before calibration) scale / zero-point / sigma to the stored shapes."""
        for key in ("scale", "zero_point", "tensor_scale", "sigma"):
            stored, current = state_dict.get(prefix + key), getattr(self, key, None)
            if isinstance(stored, Tensor) and isinstance(current, Tensor) and stored.shape != current.shape:
                fresh = torch.empty_like(stored, dtype=current.dtype)
                is_param = isinstance(current, nn.Parameter) or (key == "scale" and self.learnable)
                setattr(self, key, nn.Parameter(fresh) if is_param else fresh)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
