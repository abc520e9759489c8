"""``Quantizer``: fake-quantizes one tensor by tying a :class:`~diffq.layout.Layout` (grouped view),
an :mod:`observer <diffq.observers>` (calibration statistics) and a :mod:`format <diffq.formats>`
(parameters, rounding, gradient rule); it holds the calibrated state (``scale``, and ``zero_point``,
``tensor_scale`` or a learnable ``sigma`` when the format needs them) and runs calibration."""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from diffq.errors import CalibrationError, ConfigError
from diffq.formats import Format
from diffq.layout import Granularity, Layout
from diffq.observers import make_observer

__all__ = ["Quantizer"]


class Quantizer(nn.Module):
    """Fake-quantizer of one tensor: ``format`` x ``granularity`` (tensor, channel, token, group:g,
    block) x ``observer`` (minmax, percentile, mse, absmean, absmedian, twn, lsq; ``percentile`` and
    ``momentum`` are observer options). Token, group and block activation quantizers are dynamic.
    """

    def __init__(self, fmt: Format, *, kind: Literal["weight", "act"], granularity: str = "tensor",
                 symmetric: bool = True, observer: str = "minmax", dynamic: bool = False, feature_axis: int = -1,
                 learnable: bool = False, name: str = "", storage_dtype: torch.dtype | None = None,
                 **observer_options: float | None) -> None:
        super().__init__()
        gran = Granularity.parse(granularity)
        self.layout = Layout(kind, gran, feature_axis, fmt.block_size if gran.kind == "block" else None)
        fmt.check_usage(kind=kind, granularity=gran.kind, symmetric=symmetric, observer=observer)
        self.fmt, self.kind, self.symmetric, self.name = fmt, kind, symmetric, name
        self.storage_dtype = storage_dtype  # parameters hold what an export in this dtype stores (weights)
        self.dynamic = dynamic or (kind == "act" and gran.kind in ("token", "group", "block"))
        self.observer = make_observer(observer, self.layout, symmetric, dynamic=self.dynamic, **observer_options)
        self.observer_name = observer
        self.learnable, self.enabled = False, True
        self.follows = False  # weights: the scale is recomputed from the tensor at every forward (follow_weight)
        self.set_params(**{key: torch.empty(0) for key in self._calibrated_keys()})
        self._calibrating = False
        self._scalar_cache: tuple[tuple[Tensor, ...], tuple[tuple[int, int], ...], tuple[float, ...]] | None = None
        self.last_shape: tuple[int, ...] | None = None  # shape of the last tensor seen (for bit accounting)
        if learnable:
            self.make_learnable()

    @property
    def granularity(self) -> str:
        """Granularity kind: tensor, channel, token, group or block."""
        return self.layout.granularity.kind

    @property
    def calibrating(self) -> bool:
        """True between :meth:`begin_calibration` and :meth:`end_calibration`."""
        return self._calibrating

    @property
    def needs_calibration(self) -> bool:
        """True when the quantizer has state to set from data (static, or a calibrated part of a dynamic one)."""
        return bool(self._calibrated_keys())

    def _calibrated_keys(self) -> tuple[str, ...]:
        return self.fmt.calibrated_params(self.kind) if self.dynamic else self.fmt.param_names(self.symmetric)

    # -------------------------------------------------------------- parameters
    def view(self, x: Tensor) -> Tensor:
        """``x`` (as float32) in the grouped view its scales broadcast against."""
        return self.layout.view(x.float(), self.name)

    def unview(self, v: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`view` for a tensor of ``shape``."""
        return self.layout.unview(v, shape)

    def qparams(self, v: Tensor) -> dict[str, Tensor]:
        """Quantization parameters for the grouped view ``v``: stored (static) or from ``v`` (dynamic)."""
        calibrated = self._calibrated_keys()
        if calibrated and getattr(self, calibrated[0]).numel() == 0:
            fix = ("calibrate_weight(weight)" if self.kind == "weight"
                   else "begin_calibration(), forward, end_calibration()")
            raise CalibrationError(f"quantizer of layer {self.name or '<unnamed>'} ({self.extra_repr()}) is used "
                                   f"before calibration; fix: run {fix} or load a calibrated state_dict")
        if self.follows:
            return self.storable_params(v.detach())
        stored = {n: getattr(self, n) for n in calibrated}
        if self.dynamic:
            return self.observer.params(self.fmt, *self.observer.batch_range(v), given=stored)
        trained = self.storage_dtype is not None and any(p.requires_grad for p in stored.values())
        return self.fmt.storable(stored, self.storage_dtype) if trained else stored

    def params(self) -> dict[str, Tensor]:
        """The stored (calibrated or trained) parameters, detached."""
        return {k: getattr(self, k).detach() for k in self._calibrated_keys()}

    def set_params(self, **params: Tensor) -> None:
        """Install calibrated parameters (``scale`` stays a trained Parameter when learnable), rounded
        to what their storage holds when the quantizer has a ``storage_dtype``."""
        complete = set(params) == set(self.fmt.param_names(self.symmetric))
        if self.storage_dtype is not None and complete and all(v.numel() for v in params.values()):
            params = self.fmt.storable(params, self.storage_dtype)
        for key, value in params.items():
            trainable = key == "sigma" or (key == "scale" and self.learnable)
            if key in self._parameters or trainable:
                self._parameters.pop(key, None)
                self._buffers.pop(key, None)
                setattr(self, key, nn.Parameter(value.detach().clone()))
            else:
                self._buffers[key] = value.detach()

    def storable_params(self, v: Tensor) -> dict[str, Tensor]:
        """The static parameters calibrating on the grouped view ``v`` alone would store (what
        :meth:`calibrate_weight` sets for that tensor)."""
        params = self.fmt.params_from_tensor(v) or self.observer.params(self.fmt, *self.observer.batch_range(v))
        params = {k: params[k] for k in self.fmt.param_names(self.symmetric)}
        return self.fmt.storable(params, self.storage_dtype) if self.storage_dtype is not None else params

    def follow_weight(self, on: bool = True) -> None:
        """Recompute the scale from the weight at every forward, with no gradient to it (BitNet b1.58's
        ``gamma = mean|W|`` on the latent weight), instead of using the stored one (store the final
        scale with :meth:`calibrate_weight` before turning it off)."""
        if on and (self.kind != "weight" or self.dynamic or self.fmt.block_size
                   or self.fmt.param_names(self.symmetric)[0] != "scale"):
            raise ConfigError(f"a scale that follows the weight needs a static scaled weight format; "
                              f"{self.extra_repr()} has none")
        self.follows = on

    def set_format(self, fmt: Format) -> None:
        """Use another format with the same parameters' layout (a searched FP layout, say)."""
        if type(fmt).param_names is not type(self.fmt).param_names or fmt.block_size != self.fmt.block_size:
            raise ConfigError(f"cannot switch {self.fmt.name} to {fmt.name}: their parameters differ")
        self.fmt = fmt

    def make_learnable(self) -> None:
        """Turn the scale into an LSQ-trained ``nn.Parameter`` (now, or at the end of calibration)."""
        if self.dynamic or self.fmt.block_size or self.fmt.param_names(self.symmetric)[0] != "scale":
            raise ConfigError(f"learnable (LSQ) scales need a static scaled format; "
                              f"{self.extra_repr()} has none to learn")
        self.learnable = True
        if self.scale.numel() and not isinstance(self.scale, nn.Parameter):
            self.set_params(scale=self.scale)

    # ------------------------------------------------------------- calibration
    def begin_calibration(self) -> None:
        """Start observing: forward records statistics and returns its input unchanged."""
        self._calibrating = True
        self.observer.reset()
        self._tensor: Tensor | None = None

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Record the statistics of one batch (raises CalibrationError on NaN/Inf)."""
        if not torch.isfinite(x).all():
            what = "weights" if self.kind == "weight" else "activations"
            raise CalibrationError(f"NaN/Inf in {what} of layer {self.name or '<unnamed>'} during calibration: no "
                                   "range can be set from non-finite values; fix: check the calibration data and run "
                                   "the model in float32 (float16 overflows)")
        self.last_shape = tuple(x.shape)
        if not self.needs_calibration:
            return
        v = self.view(x)
        if self.dynamic:  # only per-tensor parameters are calibrated: keep the global range
            lo, hi = self.observer.batch_range(v)
            self.observer.update_range(lo.amin().reshape(1, 1, 1), hi.amax().reshape(1, 1, 1))
        else:
            self.observer.update(v)
        self._tensor = v if self.kind == "weight" else None

    @torch.no_grad()
    def end_calibration(self) -> None:
        """Turn the observed statistics into the static parameters."""
        self._calibrating = False
        if not self.needs_calibration:
            return
        name = self.name or "<unnamed>"
        if self.observer.count == 0:
            raise CalibrationError(f"quantizer of layer {name} observed no data during calibration; fix: make sure the "
                                   "calibration batches are not empty and reach this layer between "
                                   "begin_calibration() and end_calibration()")
        lo, hi = self.observer.result()
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise CalibrationError(f"calibration statistics of layer {name} are NaN/Inf (overflow); fix: check the "
                                   "calibration data and run the model in float32")
        from_tensor = self.fmt.params_from_tensor(self._tensor) if self._tensor is not None else None
        params = from_tensor or self.observer.finish(self.fmt)
        self._tensor = None
        self.observer.reset()
        self.set_params(**{k: params[k] for k in self._calibrated_keys()})

    def calibrate_weight(self, w: Tensor) -> None:
        """Set the static parameters of a weight quantizer from the weight itself."""
        self.begin_calibration()
        self.observe(w.detach())
        self.end_calibration()

    # ----------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (identity while calibrating or when ``enabled`` is False)."""
        if self._calibrating:
            self.observe(x)
            return x
        self.last_shape = tuple(x.shape)
        if not self.enabled:
            return x
        fast = self._fast_fake_quant(x)
        if fast is not None:
            return fast.to(x.dtype)
        if self.kind == "act" and self.granularity == "tensor" and not (self.dynamic or self.learnable):
            # static per-tensor activations: scalar params, no view (a view of NCHW would copy twice)
            params = {k: t.reshape(()) for k, t in self.qparams(x).items()}
            return self.fmt.fake_quant(x.float(), params).to(x.dtype)
        v = self.view(x)
        params = self.qparams(v)
        if self.learnable:
            s = params["scale"]
            g = (v.numel() / s.numel() * self.fmt.maxval) ** -0.5
            params["scale"] = s.detach() + (s * g - (s * g).detach())  # value s, gradient scaled by g
        out = self.unview(self.fmt.fake_quant(v, params), tuple(x.shape)).to(x.dtype)
        # keep the input's layout: a moved-axis view would send the next conv down another kernel
        return out.contiguous() if x.is_contiguous() else out

    def _fast_fake_quant(self, x: Tensor) -> Tensor | None:
        """The format's fast path for static per-tensor activations (scalar parameters, fewer passes), bit-exact
        with the generic one; None where it does not apply: a gradient is needed, the quantizer is not calibrated
        or is not static per-tensor, the format has no fast path."""
        if self.kind != "act" or self.granularity != "tensor" or self.dynamic or self.storage_dtype is not None:
            return None
        if self.learnable and not x.is_contiguous():  # the generic path would return another memory layout
            return None
        scalars = self._scalars()
        if scalars is None or (torch.is_grad_enabled() and (x.requires_grad or self._params_need_grad())):
            return None
        return self.fmt.fast_fake_quant(x, *scalars)

    def _params_need_grad(self) -> bool:
        return any(getattr(self, k).requires_grad for k in self._calibrated_keys())

    def _scalars(self) -> tuple[float, float, float | None] | None:
        """``(scale, float32 1/scale, zero point or None)`` as Python floats, cached until a parameter changes
        (a new tensor, a new storage or an in-place write: its version); None unless every parameter is a
        calibrated scalar ``scale`` / ``zero_point``."""
        keys = self._calibrated_keys()
        tensors = tuple(getattr(self, k) for k in keys)
        stamp = tuple((t.data_ptr(), t._version) for t in tensors)
        cache = self._scalar_cache
        if cache is not None and stamp == cache[1] and all(a is b for a, b in zip(cache[0], tensors)):
            return cache[2]  # type: ignore[return-value]
        if keys not in (("scale",), ("scale", "zero_point")) or any(t.numel() != 1 for t in tensors):
            return None
        scale = tensors[0].detach().reshape(())
        values = (float(scale), float(1.0 / scale), float(tensors[1]) if len(tensors) > 1 else None)
        self._scalar_cache = (tensors, stamp, values)
        return values

    def extra_repr(self) -> str:
        parts = [self.fmt.name, str(self.layout.granularity), "sym" if self.symmetric else "asym", self.observer_name]
        parts += ["dynamic"] * self.dynamic + ["learnable"] * self.learnable + ["follows"] * self.follows
        return " ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Resize the (empty before calibration) parameters to the stored shapes."""
        for key in self._calibrated_keys():
            stored, current = state_dict.get(prefix + key), getattr(self, key)
            if isinstance(stored, Tensor) and stored.shape != current.shape:
                self.set_params(**{key: torch.empty_like(stored, dtype=current.dtype)})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
