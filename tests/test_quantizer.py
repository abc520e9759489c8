"""Quantizer: granularities, observers, scale maths, fused == generic, STE/LSQ, export codes."""
from __future__ import annotations

import copy

import pytest
import torch

import diffq.observers as observers_module
from diffq.errors import CalibrationError, ConfigError
from diffq.eval.cost import quantizer_bits
from diffq.export import decode_tensor, encode_tensor
from diffq.formats import (
    BinaryFormat,
    FPFormat,
    IntFormat,
    MXFP4Format,
    NVFP4Format,
    TernaryFormat,
)
from diffq.quantizer import Quantizer

INT8, INT4, UINT8 = IntFormat(8), IntFormat(4), IntFormat(8, signed=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def student_t(*shape: int, seed: int = 0, df: float = 3.0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df).sample(shape)


def weight_q(fmt, granularity: str = "channel", w: torch.Tensor | None = None, **kw) -> Quantizer:  # type: ignore[no-untyped-def]
    q = Quantizer(fmt, kind="weight", granularity=granularity, **kw)
    if w is not None:
        q.calibrate_weight(w)
    return q


def act_q(fmt, granularity: str = "tensor", batches: list[torch.Tensor] | None = None, **kw) -> Quantizer:  # type: ignore[no-untyped-def]
    q = Quantizer(fmt, kind="act", granularity=granularity, **kw)
    if batches is not None:
        q.begin_calibration()
        for b in batches:
            assert q(b) is b
        q.end_calibration()
    return q


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().item()


def test_int8_per_channel_weight_error_bound() -> None:
    w = torch.randn(32, 16, 3, 3, generator=gen()) * torch.logspace(-3, 1, 32)[:, None, None, None]
    q = weight_q(INT8, w=w)
    assert q.scale.shape == (32, 1, 1)
    amax = w.reshape(32, -1).abs().amax(1)
    assert torch.allclose(q.scale.flatten(), amax / 127)
    err = (q(w) - w).reshape(32, -1).abs().amax(1)
    assert (err <= q.scale.flatten() / 2 * (1 + 1e-5)).all()
    assert set(q.state_dict()) == {"scale"}


def test_group_shape_and_error_on_heavy_tails() -> None:
    w = student_t(64, 256, df=2.0)
    per_channel = weight_q(INT4, w=w)
    grouped = weight_q(INT4, "group:32", w=w)
    assert grouped.scale.shape == (64, 8, 1)
    assert torch.allclose(grouped.scale, w.reshape(64, 8, 32).abs().amax(2, keepdim=True) / 7)
    assert mse(grouped(w), w) < 0.7 * mse(per_channel(w), w)


def test_group_must_divide_k() -> None:
    q = weight_q(INT4, "group:48")
    q.name = "blocks.0.ff"
    with pytest.raises(ConfigError, match=r"group size 48 does not divide K=64.*blocks\.0\.ff.*group:32"):
        q.calibrate_weight(torch.randn(8, 64))


def test_bad_granularity_configs() -> None:
    with pytest.raises(ConfigError, match="'token' is for activations"):
        Quantizer(INT8, kind="weight", granularity="token")
    with pytest.raises(ConfigError, match="unknown granularity 'row'"):
        Quantizer(INT8, kind="weight", granularity="row")
    with pytest.raises(ConfigError, match="need granularity=block"):
        Quantizer(NVFP4Format(), kind="weight", granularity="channel")
    with pytest.raises(ConfigError, match="use group:<g>"):
        Quantizer(INT8, kind="act", granularity="block")
    with pytest.raises(ConfigError, match="unsigned int format"):
        Quantizer(INT8, kind="act", symmetric=False)
    with pytest.raises(ConfigError, match="unknown observer 'max'"):
        Quantizer(INT8, kind="act", observer="max")
    with pytest.raises(ConfigError, match="learnable"):
        Quantizer(INT8, kind="act", granularity="token", learnable=True)


def test_dynamic_per_token() -> None:
    x = torch.randn(2, 50, 64, generator=gen()) * torch.logspace(-2, 2, 50)[None, :, None]
    q = act_q(INT8, "token")
    assert q.dynamic
    out = q(x)
    _, params = encode_tensor(q, x)
    amax = x.reshape(100, 64).abs().amax(1)
    assert torch.allclose(params["scale"].flatten(), amax / 127)
    err = (out - x).abs().amax(-1).flatten()
    assert (err <= params["scale"].flatten() / 2 * (1 + 1e-5)).all()
    per_tensor = act_q(INT8, "tensor", dynamic=True)
    small = x[:, :10]  # small tokens are crushed by one shared scale, not per token
    assert mse(q(x)[:, :10], small) < 1e-3 * mse(per_tensor(x)[:, :10], small)


def test_dynamic_group_activations_nchw() -> None:
    x = torch.randn(2, 64, 4, 4, generator=gen())
    q = act_q(INT4, "group:16", feature_axis=1)
    codes, params = encode_tensor(q, x)
    assert codes.shape == (32, 64) and params["scale"].shape == (32, 4, 1)
    assert torch.equal(q(x), decode_tensor(q, codes, params))
    assert quantizer_bits(q) == 4 + 16 / 16


def test_asymmetric_beats_symmetric_on_shifted_data() -> None:
    batches = [torch.rand(256, 32, generator=gen(i)) * 3 for i in range(3)]
    asym = act_q(UINT8, "tensor", batches, symmetric=False)
    sym = act_q(INT8, "tensor", batches)
    assert asym.zero_point.item() == 0 and asym.scale.item() == pytest.approx(batches[0].max().item() / 255, rel=0.01)
    x = batches[0]
    assert mse(asym(x), x) < 0.35 * mse(sym(x), x)
    shifted = [b - 1.0 for b in batches]  # min < 0 < max -> nonzero zero point
    asym2 = act_q(UINT8, "tensor", shifted, symmetric=False)
    assert 70 < asym2.zero_point.item() < 100
    assert mse(asym2(shifted[0]), shifted[0]) < 0.5 * mse(sym(shifted[0]), shifted[0])


def fused_vs_generic_cases() -> list[tuple[Quantizer, torch.Tensor]]:
    w = torch.randn(48, 40, generator=gen(1))
    x = torch.randn(4, 24, 5, 5, generator=gen(2))
    cases = [
        (weight_q(INT8, "tensor", w=w), w),
        (weight_q(INT8, "channel", w=w), w),
        (weight_q(INT4, "channel", w=w), w),
        (weight_q(UINT8, "channel", w=w, symmetric=False), w),
        (act_q(INT8, "tensor", [x], feature_axis=1), x),
        (act_q(INT8, "channel", [x], feature_axis=1), x),
        (act_q(UINT8, "channel", [x], feature_axis=1, symmetric=False), x),
    ]
    # exact ties: scale a power of two, values at (k + 1/2) * scale
    tie_w = (torch.randint(-130, 130, (16, 64), generator=gen(3)) + 0.5) * 2.0**-5
    q = weight_q(INT8, "tensor", w=torch.full((16, 64), 127 * 2.0**-5))
    assert q.scale.item() == 2.0**-5
    cases.append((q, tie_w))
    for quant, data in cases[:4]:  # ties at random scales: x = (k + 1/2) / (1 / scale)
        inv = 1.0 / quant.scale.reshape(-1, 1)
        k = torch.randint(-128, 128, data.shape, generator=gen(4)).float()
        cases.append((quant, ((k + 0.5) / inv).reshape(data.shape)))
    return cases


def _torch_fake_quant(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """torch's own fused fake-quant kernels: the reference our int arithmetic must equal."""
    fmt = q.fmt
    scale = q.scale.reshape(-1).float()
    zp = (q.zero_point if not q.symmetric else torch.zeros_like(q.scale)).reshape(-1).to(torch.int32)
    if q.granularity == "tensor":
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, fmt.qmin, fmt.qmax)
    if q.kind == "weight":
        out = torch.fake_quantize_per_channel_affine(x.reshape(x.shape[0], -1), scale, zp, 0, fmt.qmin, fmt.qmax)
        return out.reshape(x.shape)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, q.layout.feature_axis % x.dim(), fmt.qmin, fmt.qmax)


def test_int_path_equals_torch_fused_kernels_bit_exact() -> None:
    for q, x in fused_vs_generic_cases():
        ours = q(x)
        assert torch.equal(ours, _torch_fake_quant(q, x)), q.extra_repr()
        assert torch.equal(ours, decode_tensor(q, *encode_tensor(q, x))), q.extra_repr()
        lsq = copy.deepcopy(q)
        lsq.make_learnable()  # LSQ takes the STE path with autograd
        assert torch.equal(lsq(x), ours)


def test_mse_observer_beats_minmax_at_4_bits() -> None:
    w = student_t(64, 128, seed=1)
    minmax = weight_q(INT4, w=w)
    searched = weight_q(INT4, w=w, observer="mse")
    assert (searched.scale <= minmax.scale * 1.2 + 1e-9).all()
    assert mse(searched(w), w) < 0.9 * mse(minmax(w), w)
    fp4 = weight_q(FPFormat(2, 1), w=w, observer="mse")
    assert mse(fp4(w), w) < mse(weight_q(FPFormat(2, 1), w=w)(w), w)
    batches = [student_t(3000, 16, seed=s) for s in range(3)]  # 9000 rows > 4096-row reservoir
    a_mm, a_mse = act_q(INT4, "channel", batches), act_q(INT4, "channel", batches, observer="mse")
    x = torch.cat(batches)
    assert mse(a_mse(x), x) < 0.8 * mse(a_mm(x), x)


def test_percentile_clips_outliers(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4096, 64, generator=gen())
    x[0, :4] = 1000.0
    pct = act_q(INT8, "tensor", [x], observer="percentile", percentile=99.9)
    minmax = act_q(INT8, "tensor", [x])
    assert pct.scale.item() < minmax.scale.item() / 100
    assert pct.scale.item() * 127 == pytest.approx(torch.quantile(x.abs().flatten(), 0.999).item(), rel=1e-5)
    inliers = x[1:]
    assert mse(pct(inliers), inliers) < 1e-3 * mse(minmax(inliers), inliers)
    asym = act_q(UINT8, "tensor", [x + 3], observer="percentile", percentile=99.0, symmetric=False)
    hi = torch.quantile((x + 3).flatten(), 0.99).item()
    assert asym.scale.item() == pytest.approx(hi / 255, rel=1e-5)
    monkeypatch.setattr(observers_module, "QUANTILE_MAX", 10_000)  # strided subsample
    sub = act_q(INT8, "tensor", [x], observer="percentile", percentile=99.9)
    assert sub.scale.item() == pytest.approx(pct.scale.item(), rel=0.1)


def test_minmax_global_and_ema() -> None:
    batches = [torch.tensor([[1.0, -0.5]]), torch.tensor([[3.0, 0.2]])]
    assert act_q(INT8, "tensor", batches).scale.item() == pytest.approx(3 / 127)
    assert act_q(INT8, "tensor", batches, momentum=0.5).scale.item() == pytest.approx(2 / 127)


def test_absmean_ternary_scale() -> None:
    w = torch.randn(16, 64, generator=gen())
    per_tensor = weight_q(TernaryFormat(), "tensor", w=w, observer="absmean")
    assert per_tensor.scale.item() == pytest.approx(w.abs().mean().item(), rel=1e-6)
    per_channel = weight_q(TernaryFormat(), "channel", w=w, observer="absmean")
    assert torch.allclose(per_channel.scale.flatten(), w.abs().mean(1))
    out = per_channel(w)
    s = per_channel.scale.reshape(-1, 1)
    assert torch.equal(out / s, (w / s).round().clamp(-1, 1))
    median = weight_q(TernaryFormat(), "channel", w=w, observer="absmedian")
    assert torch.allclose(median.scale.flatten(), w.abs().median(1).values)


def test_lsq_learns_scale() -> None:
    w = student_t(32, 64)
    q = weight_q(INT4, w=w, learnable=True)
    assert isinstance(q.scale, torch.nn.Parameter)
    loss = (q(w) - w).square().mean()
    loss.backward()
    assert q.scale.grad is not None and q.scale.grad.isfinite().all() and q.scale.grad.abs().sum() > 0
    start = loss.item()
    opt = torch.optim.Adam([q.scale], lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        loss = (q(w) - w).square().mean()
        loss.backward()
        opt.step()
    assert mse(q(w), w) < 0.9 * start


def test_ste_gradient_inside_and_outside() -> None:
    q = act_q(INT8, "tensor", [torch.tensor([[1.27]])])  # scale 0.01, range [-1.27, 1.27]
    x = torch.tensor([-3.0, -1.27, -0.5, 0.0, 0.333, 1.27, 1.3, 5.0], requires_grad=True)
    q(x).sum().backward()
    expected = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    assert torch.equal(x.grad, expected)
    fp8 = act_q(FPFormat(4, 3), "tensor", [torch.tensor([[448.0]])])  # scale 1
    x = torch.tensor([-500.0, -448.0, 3.3, 448.0, 449.0], requires_grad=True)
    fp8(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


def export_cases() -> list[tuple[Quantizer, torch.Tensor]]:
    w = student_t(32, 64, seed=5) * 0.1
    conv_w = torch.randn(16, 8, 3, 3, generator=gen(6))
    act = torch.randn(2, 10, 64, generator=gen(7)) * 3
    nchw = torch.randn(2, 32, 3, 3, generator=gen(8))
    return [
        (weight_q(INT8, w=conv_w), conv_w),
        (weight_q(INT4, "group:16", w=w), w),
        (weight_q(UINT8, w=w, symmetric=False), w),
        (weight_q(FPFormat(4, 3), w=w), w),
        (weight_q(FPFormat(2, 1), "group:16", w=w), w),
        (weight_q(FPFormat(3, 2), w=w, observer="mse"), w),
        (weight_q(NVFP4Format(), "block", w=w), w),
        (weight_q(MXFP4Format(), "block", w=w), w),
        (weight_q(TernaryFormat(), w=w, observer="absmean"), w),
        (weight_q(BinaryFormat(2), w=conv_w), conv_w),
        (act_q(INT8, "token"), act),
        (act_q(UINT8, "token", symmetric=False), act),
        (act_q(FPFormat(4, 3), "channel", [nchw], feature_axis=1), nchw),
        (act_q(NVFP4Format(), "block", [act]), act),
        (act_q(MXFP4Format(), "block"), act),
    ]


def test_codes_round_trip_equals_forward() -> None:
    for q, x in export_cases():
        codes, params = encode_tensor(q, x)
        assert codes.dtype == torch.uint8
        features = x[0].numel() if q.kind == "weight" else x.shape[q.layout.feature_axis]
        assert codes.shape == (x.numel() // features, features)
        assert int(codes.max()) < 2**q.fmt.storage_bits
        out = q(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(decode_tensor(q, codes, params), out), q.extra_repr()
        assert mse(out, x) < 0.6 * x.square().mean().item(), q.extra_repr()


def test_block_formats_in_quantizer() -> None:
    w = torch.randn(8, 64, generator=gen())
    w[0, :16] = 0.0  # an all-zero block
    nv = weight_q(NVFP4Format(), "block", w=w)
    assert nv.scale.shape == (8, 4, 1) and (nv.scale > 0).all()
    assert nv.tensor_scale.item() == pytest.approx(w.abs().max().item() / (6 * 448))
    assert torch.equal(nv(w)[0, :16], torch.zeros(16))
    mx = weight_q(MXFP4Format(), "block", w=w)
    assert mx.scale.shape == (8, 2, 1)
    assert mx(w).isfinite().all() and mse(nv(w), w) < mse(mx(w), w)
    assert set(nv.state_dict()) == {"scale", "tensor_scale"}


def test_binary_quantizer() -> None:
    w = torch.randn(16, 32, generator=gen()) * 0.3
    q = weight_q(BinaryFormat(2), w=w)
    assert isinstance(q.sigma, torch.nn.Parameter) and q.sigma.shape == (2, 16)
    wp = w.clone().requires_grad_(True)
    q(wp).square().sum().backward()
    assert q.sigma.grad.abs().sum() > 0 and wp.grad.abs().sum() > 0
    assert quantizer_bits(q) == 2 * (1 + 16 / 32)
    with pytest.raises(ConfigError, match="per output channel"):
        Quantizer(BinaryFormat(2), kind="act", granularity="channel")


def test_nan_in_calibration_names_layer() -> None:
    q = act_q(INT8, "tensor")
    q.name = "up_blocks.1.attn1.to_q"
    q.begin_calibration()
    q(torch.ones(4, 8))
    with pytest.raises(CalibrationError, match=r"NaN/Inf in activations of layer up_blocks\.1\.attn1\.to_q.*fix:"):
        q(torch.tensor([[1.0, float("nan")]]))
    w = weight_q(INT8)
    with pytest.raises(CalibrationError, match="NaN/Inf in weights"):
        w.calibrate_weight(torch.tensor([[float("inf"), 1.0]]))


def test_uncalibrated_and_empty_calibration_errors() -> None:
    q = act_q(INT8, "tensor")
    q.name = "mid.conv"
    with pytest.raises(CalibrationError, match=r"layer mid\.conv.*before calibration.*fix"):
        q(torch.ones(2, 4))
    with pytest.raises(CalibrationError, match="calibrate_weight"):
        weight_q(INT8)(torch.ones(2, 4))
    q.begin_calibration()
    with pytest.raises(CalibrationError, match="observed no data"):
        q.end_calibration()
    dynamic = act_q(INT8, "token")
    dynamic.begin_calibration()
    dynamic.end_calibration()  # nothing to set: fine
    assert dynamic(torch.ones(2, 4)).shape == (2, 4)


def test_enabled_flag_and_repr() -> None:
    q = weight_q(INT8, w=torch.randn(4, 8, generator=gen()))
    x = torch.randn(4, 8, generator=gen(1))
    q.enabled = False
    assert q(x) is x
    assert q.extra_repr() == "int8 channel sym minmax"
    assert act_q(INT4, "group:32").extra_repr() == "int4 group:32 sym minmax dynamic"


def test_bits_per_element() -> None:
    w = torch.randn(32, 64, generator=gen())
    assert quantizer_bits(weight_q(INT8, w=w)) == 8 + 16 / 64
    assert quantizer_bits(weight_q(INT8, "tensor", w=w)) == 8 + 16 / (32 * 64)
    assert quantizer_bits(weight_q(INT4, "group:32")) == 4 + 16 / 32
    assert quantizer_bits(weight_q(UINT8, w=w, symmetric=False)) == 8 + 24 / 64
    assert quantizer_bits(weight_q(NVFP4Format(), "block")) == 4.5
    assert quantizer_bits(act_q(MXFP4Format(), "block")) == 4.25
    assert quantizer_bits(act_q(INT8, "tensor")) == 8
    assert quantizer_bits(act_q(INT8, "token"), (2, 10, 64)) == 8 + 16 / 64
    with pytest.raises(CalibrationError, match="needs the tensor shape"):
        quantizer_bits(weight_q(INT8))


def test_state_dict_loads_into_fresh_quantizer() -> None:
    w = torch.randn(16, 32, generator=gen())
    for make in (
        lambda: weight_q(UINT8, symmetric=False),
        lambda: weight_q(NVFP4Format(), "block"),
        lambda: weight_q(BinaryFormat(2)),
        lambda: weight_q(INT4, "group:8", learnable=True),
    ):
        calibrated, fresh = make(), make()
        calibrated.calibrate_weight(w)
        fresh.load_state_dict(calibrated.state_dict())
        assert torch.equal(fresh(w), calibrated(w))


def test_nvfp4_activations_do_not_depend_on_their_batch_companions() -> None:
    image = torch.randn(1, 10, 64, generator=gen(1))
    loud = torch.randn(3, 10, 64, generator=gen(2)) * 50  # e.g. the other CFG branch
    q = act_q(NVFP4Format(), "block", [torch.cat([image, loud])])
    assert q.needs_calibration and q.tensor_scale.numel() == 1 and set(q.state_dict()) == {"tensor_scale"}
    alone = q(image)
    assert torch.equal(q(torch.cat([image, loud]))[:1], alone)
    assert torch.equal(q(torch.cat([image, image * 0.01]))[:1], alone)
    assert mse(alone, image) < 0.02 * image.square().mean().item()


def test_conv_groups_run_along_input_channels_per_kernel_position() -> None:
    w = torch.randn(8, 32, 3, 3, generator=gen())
    w[:, :16, 1, 1] *= 100  # one group of 16 input channels at the centre tap is large
    q = weight_q(INT4, "group:16", w=w)
    assert q.scale.shape == (8, 18, 1)  # 3 x 3 positions x 2 groups of input channels
    big = q.scale.reshape(8, 3, 3, 2)
    assert (big[:, 1, 1, 0] > 50 * big[:, 0, 0, 0]).all()  # only that group's scale is large
    assert torch.equal(decode_tensor(q, *encode_tensor(q, w)), q(w))
    corner = w[:, :, 0, 0]
    assert mse(q(w)[:, :, 0, 0], corner) < 0.02 * mse(weight_q(INT4, "channel", w=w)(w)[:, :, 0, 0], corner)
    with pytest.raises(ConfigError, match="does not divide the 24 input channels"):
        weight_q(INT4, "group:16", w=torch.randn(8, 24, 2, 2))


def test_twn_ternary_observer_beats_absmean() -> None:
    w = torch.randn(64, 512, generator=gen())
    rel = {obs: ((weight_q(TernaryFormat(), w=w, observer=obs)(w) - w).norm() / w.norm()).item()
           for obs in ("twn", "absmean")}
    assert rel["twn"] == pytest.approx(0.436, abs=0.02) and rel["absmean"] == pytest.approx(0.513, abs=0.02)
