"""FP low-bit method: per-layer format / clipping search, learned FP rounding, FP exports."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

from diffq.errors import CalibrationError, ConfigError
from diffq.eval.cost import quantizer_bits, weight_bits
from diffq.export import WEIGHTS_NAME, export_quantized, load_quantized, read_metadata
from diffq.formats import FPFormat
from diffq.layers import layer_table, quantize_layer_
from diffq.methods import get_method
from diffq.methods.adaround import AdaRound
from diffq.methods.fp_search import LAYOUTS, alpha_grid, candidate_formats, search_act, search_weight
from diffq.methods.reconstruct import reconstruct
from diffq.quantizer import Quantizer
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import TensorQuant, format_spec_table, resolve_spec
from tests.helpers import KEEP_FP, denoiser, outputs, pipeline_and_calib, rel_error

CPU = torch.device("cpu")
W4 = {"format": "fp", "bits": 4, "granularity": "channel"}
A8 = {"format": "fp", "bits": 8, "granularity": "tensor"}
SEARCH = {"alphas": 16}
RECON = {"iters": 30, "lr": 3e-3, "reg_weight": 0.01, "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2,
         "act_iters": 5, "act_lr": 4e-4, "fine_grained_weight": 1.0, "fbr_regularizer": False, "qdrop": 0.0, "seed": 0}


def _searched(weight=W4, act=A8, rules=KEEP_FP, search=SEARCH):
    pipe, calib = pipeline_and_calib("sd")
    model = copy.deepcopy(denoiser(pipe))
    specs = resolve_spec(quantizable_layers(model, "sd"), weight, act, rules, ROLES)
    stats = get_method("fp_search")(model, specs, calib, {"search": search}, device=CPU, dtype=torch.float32)
    return model, specs, calib, stats


@pytest.fixture(scope="module")
def fp_w4a8_rtn():
    return _searched()


# ------------------------------------------------------------------------------- grids


def _enumerated(exp: int, man: int) -> list[float]:
    """Every finite non-negative value of ExMy from the definition (OCP reserved codes excluded)."""
    bias = 2 ** (exp - 1) - 1
    values = {d / 2**man * 2.0 ** (1 - bias) for d in range(2**man)}
    values |= {(1 + d / 2**man) * 2.0 ** (p - bias) for p in range(1, 2**exp) for d in range(2**man)}
    if (exp, man) == (4, 3):
        values.discard(480.0)  # S.1111.111 is NaN
    if (exp, man) == (5, 2):
        values = {v for v in values if v < 65536}  # top exponent: inf / NaN
    return sorted(values)


@pytest.mark.parametrize("layout", [lay for bits in (4, 8) for lay in LAYOUTS[bits]])
def test_every_searched_layout_has_its_exact_grid(layout):
    fmt = FPFormat(*layout)
    grid = fmt.grid()
    assert grid.tolist() == _enumerated(*layout)
    assert fmt.maxval == grid[-1]
    assert torch.equal(fmt.round(grid), grid) and torch.equal(fmt.round(-grid), -grid)
    mids = (grid[1:] + grid[:-1]) / 2  # ties: to the even significand (M = 0: the larger power of two)
    if fmt.man:
        assert torch.all(fmt.to_codes(fmt.round(mids)).int() % 2 == 0)
    else:
        assert torch.equal(fmt.round(mids), torch.cat([grid[:1], grid[2:]]))
    assert torch.equal(fmt.round(torch.tensor([1e9, -1e9])), torch.tensor([fmt.maxval, -fmt.maxval]))
    spread = 10.0 ** torch.arange(-4, 4).repeat(2500)
    x = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(0)) * spread,
                   mids, -mids, grid, -grid, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    fast, ref = fmt.round_bits(x), fmt.round_generic(x)  # the fast path is the formula, bit for bit
    assert torch.equal(fast, ref) and torch.equal(fast.signbit(), ref.signbit())
    if layout in ((4, 3), (5, 2)):
        dtype = torch.float8_e4m3fn if layout == (4, 3) else torch.float8_e5m2
        every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
        assert torch.equal(grid, every[torch.isfinite(every) & (every >= 0)].unique())
    assert [f.name for f in candidate_formats(TensorQuant(format="fp", bits=layout[0] + layout[1] + 1))] == \
        [FPFormat(*lay).name for lay in LAYOUTS[layout[0] + layout[1] + 1]]


# ------------------------------------------------------------------------------- search


def _on_grid(layout: tuple[int, int], shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random values of ``layout``'s grid (each row holding its largest value), random signs."""
    grid = FPFormat(*layout).grid()
    grid = grid[grid >= grid[-1] * 2.0**-16]  # E5M2's subnormals would need a larger range than the others
    idx = torch.randint(0, len(grid), shape, generator=gen)
    idx[..., 0] = len(grid) - 1
    signs = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return grid[idx] * signs


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_search_picks_the_layout_the_weights_are_on(bits):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    gram = x.T @ x
    formats = candidate_formats(TensorQuant(format="fp", bits=bits))
    for layout in LAYOUTS[bits]:
        w = _on_grid(layout, (8, 64), gen) * torch.rand(8, 1, generator=gen)  # per-channel magnitudes
        q = Quantizer(FPFormat(2, 1), kind="weight", granularity="channel")
        q.calibrate_weight(w)
        grid = alpha_grid({"alpha_min": 0.1, "alpha_max": 1.2, "alphas": 12})
        fmt, scale, err = search_weight(q, w, gram, formats, grid)
        assert (fmt.exp, fmt.man) == layout
        assert err < 1e-10 * float((w @ gram * w).sum())
        q.set_format(fmt)
        q.set_params(scale=scale)
        assert torch.allclose(q(w), w, rtol=1e-6, atol=0)  # alpha = 1 reproduces the weights


def test_act_search_picks_the_layout_the_inputs_are_on():
    gen = torch.Generator().manual_seed(1)
    formats = candidate_formats(TensorQuant(format="fp", bits=4))
    for layout in LAYOUTS[4]:
        layer = nn.Linear(32, 16)
        x = _on_grid(layout, (4, 64, 32), gen) * 0.37
        quantize_layer_(layer, None, Quantizer(FPFormat(2, 1), kind="act", granularity="tensor"))
        fmt, scale, err = search_act(layer, [x], x.abs().amax().view(1, 1, 1), formats, alpha_grid(
            {"alpha_min": 0.1, "alpha_max": 1.2, "alphas": 12}))
        assert (fmt.exp, fmt.man) == layout and err < 1e-8
        assert torch.allclose(scale * fmt.maxval, x.abs().amax().view(1, 1, 1))


def test_search_lowers_the_error_and_writes_the_layouts_into_the_spec(fp_w4a8_rtn):
    model, specs, calib, stats = fp_w4a8_rtn
    pipe, _ = pipeline_and_calib("sd")
    fp = denoiser(pipe)
    ref = outputs(fp, calib)
    plain = copy.deepcopy(fp)  # E2M1 everywhere, min-max
    plain_specs = resolve_spec(quantizable_layers(plain, "sd"), W4, A8, KEEP_FP, ROLES)
    get_method("rtn")(plain, plain_specs, calib, {}, device=CPU, dtype=torch.float32)
    searched_err, plain_err = rel_error(ref, outputs(model, calib)), rel_error(ref, outputs(plain, calib))
    assert searched_err < 0.8 * plain_err
    s = stats["fp_search"]
    quantized = [sp for sp in specs if sp.quantized]
    assert sum(s["weight_formats"].values()) == sum(s["act_formats"].values()) == len(quantized)
    layers = layer_table(model)
    for sp in quantized:  # the spec says what the quantizers do
        assert (sp.weight.exp, sp.weight.man) == (layers[sp.name].weight_quantizer.fmt.exp,
                                                  layers[sp.name].weight_quantizer.fmt.man)
        assert layers[sp.name].input_quantizer.fmt.name == sp.act.build_format().name
    table = format_spec_table(specs)
    assert any(f"{name}/channel" in table for name in s["weight_formats"])
    assert 4.0 < weight_bits(model)["effective_weight_bits"] < 5.0


def test_pinned_layout_searches_only_the_clipping():
    rules = [*KEEP_FP, {"roles": ["ffn_up"], "weight": {"exp": 3, "man": 0}},
             {"roles": ["attn_qkv"], "act": {"exp": 4, "man": 3}}]
    model, specs, _, _ = _searched(rules=rules, search={"alphas": 8})
    by_role = {}
    for sp in specs:
        if sp.quantized:
            by_role.setdefault(sp.role, set()).add(((sp.weight.exp, sp.weight.man), (sp.act.exp, sp.act.man)))
    assert {w for w, _ in by_role["ffn_up"]} == {(3, 0)}
    assert {a for _, a in by_role["attn_qkv"]} == {(4, 3)}
    ffn = [layer for n, layer in layer_table(model).items() if n.endswith("ff.net.0.proj")]
    assert ffn and all(layer.weight_quantizer.fmt == FPFormat(3, 0) for layer in ffn)


# ----------------------------------------------------------------------- learned rounding


def test_fp_adaround_starts_at_rtn_and_stays_on_the_grid(fp_w4a8_rtn):
    model = fp_w4a8_rtn[0]
    for name, layer in list(layer_table(model).items())[:12]:
        q = layer.weight_quantizer
        for scale_aware in (False, True):
            r = AdaRound(q, layer.weight, scale_aware=scale_aware)
            assert torch.equal(r.hard(), q(layer.weight)), name  # hard rounding of the init = RTN
            with torch.no_grad():
                r.V.normal_(0, 1e-3 if scale_aware else 3.0)
            hard = r.hard()
            assert torch.equal(q(hard), hard), name  # every hard choice is a grid value
            down, up = r._dequant(r.down), r._dequant(r.down + r.step)
            assert torch.all((hard == down) | (hard == up))


def test_learned_fp_rounding_beats_fp_rtn(fp_w4a8_rtn):
    model, _, calib, _ = fp_w4a8_rtn
    pipe, _ = pipeline_and_calib("sd")
    ref = outputs(denoiser(pipe), calib)
    learned = copy.deepcopy(model)
    stats = reconstruct(learned, calib, RECON, "block", device=CPU, dtype=torch.float32)
    losses = stats["recon_loss"].values()
    assert sum(v["recon"] for v in losses) < 0.9 * sum(v["rtn"] for v in losses)
    assert rel_error(ref, outputs(learned, calib)) < 0.9 * rel_error(ref, outputs(model, calib))


# ----------------------------------------------------------------------------- export


def test_fp4_export_is_packed_and_reloads_bit_exact(fp_w4a8_rtn, tmp_path):
    model, specs, calib, _ = fp_w4a8_rtn
    export_quantized(model, specs, tmp_path)
    meta = read_metadata(tmp_path)
    layers = layer_table(model)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        for name, layout in meta["packed"].items():
            stored = f.get_tensor(f"{name}.weight.codes")
            assert stored.dtype == torch.uint8 and stored.numel() == -(-layers[name].weight.numel() // 2)
            assert layout["format"] == layers[name].weight_quantizer.fmt.name
    loaded = load_quantized(tmp_path)
    for a, b in zip(outputs(model, calib), outputs(loaded, calib)):
        assert torch.equal(a, b)


def test_fp8_export_stores_float8_tensors(tmp_path):
    rules = [*KEEP_FP, {"roles": ["ffn_up", "ffn_down"], "weight": {"exp": 5, "man": 2}}]
    model, specs, calib, _ = _searched(weight={"format": "fp", "bits": 8, "granularity": "channel", "exp": 4, "man": 3},
                                       rules=rules, search={"alphas": 8, "act": False})
    export_quantized(model, specs, tmp_path)
    meta = read_metadata(tmp_path)
    dtypes = set()
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        for name, layout in meta["packed"].items():
            dtype = f.get_tensor(f"{name}.weight.codes").dtype
            assert dtype == {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[layout["format"]]
            dtypes.add(dtype)
    assert dtypes == {torch.float8_e4m3fn, torch.float8_e5m2}
    loaded = load_quantized(tmp_path)
    for a, b in zip(outputs(model, calib), outputs(loaded, calib)):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset,bits", [("nvfp4_w4a4", 4.5), ("mxfp4_w4a4", 4.25)])
def test_block_fp4_presets_run(compose, preset, bits):
    q = compose(f"quant={preset}").quant
    pipe, calib = pipeline_and_calib("sd")
    fp = denoiser(pipe)
    model = copy.deepcopy(fp)
    specs = resolve_spec(quantizable_layers(model, "sd"), q.weight, q.act, [dict(r) for r in q.rules], ROLES)
    get_method(q.method)(model, specs, calib, {}, device=CPU, dtype=torch.float32)
    layers = layer_table(model).values()
    # element + block-scale bits, plus NVFP4's one fp32 tensor scale per weight
    assert all(bits <= quantizer_bits(layer.weight_quantizer) < bits + 32 / 256 for layer in layers)
    assert all(layer.input_quantizer.dynamic for layer in layers)
    assert rel_error(outputs(fp, calib), outputs(model, calib)) < 0.5


def test_fp_presets_compose_with_their_method(compose):
    assert compose("quant=fp_w8a8").quant.method == "fp_search"
    rtn, learned = compose("quant=fp_w4a8_rtn"), compose("quant=fp_w4a8")
    assert rtn.quant.recon == "none" and learned.quant.recon == "block" and learned.recon.name == "quick"
    assert compose("quant=fp_w4a8", "recon=fp4dit").recon.scale_aware is True


# ------------------------------------------------------------------------- bad input


def test_bad_search_settings_and_nan_inputs_stop_early():
    with pytest.raises(ConfigError, match="alpha_min"):
        alpha_grid({"alpha_min": 0.0, "alpha_max": 1.2, "alphas": 10})
    with pytest.raises(ConfigError, match="exp/man"):
        candidate_formats(TensorQuant(format="fp", bits=2))
    pipe, calib = pipeline_and_calib("sd")
    bad = [copy.deepcopy(calib[0])]
    bad[0].kwargs["sample"] = bad[0].kwargs["sample"].clone()
    bad[0].kwargs["sample"][0, 0, 0, 0] = float("nan")
    model = copy.deepcopy(denoiser(pipe))
    specs = resolve_spec(quantizable_layers(model, "sd"), W4, A8, KEEP_FP, ROLES)
    with pytest.raises(CalibrationError, match="NaN"):
        get_method("fp_search")(model, specs, bad, {"search": SEARCH}, device=CPU, dtype=torch.float32)


def test_job_writes_the_searched_layouts_to_spec_and_metrics(compose, tmp_path):
    from diffq.job import run

    cfg = compose("model=tiny_sd15", "quant=fp_w4a8_rtn", "quant.search.alphas=8", "eval.grid=false", "export=true",
                  "eval.prompts=[a photo of a red circle]", "calib.num_prompts=2", "calib.num_steps=2", "model.steps=4")
    m = run(cfg, tmp_path)
    chosen = m["calib"]["fp_search"]
    assert sum(chosen["weight_formats"].values()) == m["cost"]["layers_quantized"]
    spec = (tmp_path / "spec.txt").read_text()
    for name, count in chosen["weight_formats"].items():
        assert spec.count(f"{name}/channel") == count
    assert spec.count("fp8_e") == sum(chosen["act_formats"].values())
    formats = {s["weight"]["exp"] for s in read_metadata(tmp_path / "model")["specs"] if s["weight"] and not s["skip"]}
    assert None not in formats  # the export rebuilds the searched layouts


def test_grouped_conv_search_error_is_the_layer_output_error():
    from diffq.methods.fp_search import _patch_rows

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 8, 3, padding=1)
    x = torch.randn(4, 32, 8, 8)
    rows = _patch_rows(conv, x)
    q = Quantizer(FPFormat(2, 1), kind="weight", granularity="group:16")  # groups along input channels
    q.calibrate_weight(conv.weight)
    fmt, scale, err = search_weight(q, conv.weight, rows.T @ rows, [FPFormat(2, 1)],
                                    alpha_grid({"alpha_min": 0.1, "alpha_max": 1.2, "alphas": 12}))
    q.set_params(scale=scale)
    with torch.no_grad():
        actual = (conv._conv_forward(x, q(conv.weight), None) - conv._conv_forward(x, conv.weight, None)).square().sum()
    assert err == pytest.approx(float(actual), rel=1e-4)


def test_a_failing_act_search_leaves_no_trial_format_behind(monkeypatch):
    from diffq.methods import fp_search as fp_search_module

    layer = nn.Linear(32, 16)
    q = Quantizer(FPFormat(2, 1), kind="act", granularity="token")  # dynamic: the layout is tried in place
    quantize_layer_(layer, None, q)
    calls = {"n": 0}
    original = fp_search_module._layer_output

    def fail_on_trial(module, x, weight):
        calls["n"] += 1
        if calls["n"] > 1:  # the FP target is computed, then the first trial layout fails
            raise RuntimeError("out of memory")
        return original(module, x, weight)

    monkeypatch.setattr(fp_search_module, "_layer_output", fail_on_trial)
    with pytest.raises(RuntimeError, match="out of memory"):
        search_act(layer, [torch.randn(2, 8, 32)], None, candidate_formats(TensorQuant(format="fp", bits=4)),
                   alpha_grid({"alpha_min": 0.1, "alpha_max": 1.2, "alphas": 4}))
    assert q.fmt == FPFormat(2, 1)
