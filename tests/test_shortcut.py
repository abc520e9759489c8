"""Q-Diffusion shortcut splitting: the up path's concatenation gets one activation range per half."""
from __future__ import annotations

import copy

import torch

from diffq.export import export_quantized, load_quantized
from diffq.layers import iter_quantizers
from diffq.methods import rtn
from diffq.model_quant import SplitQuantizer
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec
from tests.helpers import A8, KEEP_FP, denoiser, pipeline_and_calib

W4 = {"format": "int", "bits": 4, "granularity": "channel", "symmetric": True}


def _split_copy():
    pipe, calib = pipeline_and_calib("sd")
    model = copy.deepcopy(denoiser(pipe))
    specs = resolve_spec(quantizable_layers(model, "sd"), W4, A8, KEEP_FP, ROLES)
    stats = rtn.apply(model, specs, calib, {"split_shortcut": True}, device=torch.device("cpu"), dtype=torch.float32)
    return model, specs, calib, stats


def test_halves_get_their_own_ranges():
    model, _, calib, stats = _split_copy()
    modules = dict(model.named_modules())
    split = {n: m for n, m in modules.items() if isinstance(getattr(m, "input_quantizer", None), SplitQuantizer)}
    assert stats["shortcut_splits"] == len(split) > 0
    assert all(n.startswith("up_blocks.") and n.endswith(("conv1", "conv_shortcut")) for n in split)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0]))
             for n, m in split.items()]
    acts = [q for _, q in iter_quantizers(model) if q.kind == "act"]
    for q in acts:  # as during activation calibration: quantized weights, activations passing through
        q.enabled = False
    with torch.no_grad():
        for s in calib:
            model(**s.to("cpu"), return_dict=False)
    for q in acts:
        q.enabled = True
    for h in hooks:
        h.remove()
    for name, layer in split.items():
        q = layer.input_quantizer
        x = torch.cat(seen[name])
        assert 0 < q.k < x.shape[1]
        for part, half in zip(q.parts, (x[:, : q.k], x[:, q.k :])):  # asymmetric min-max over each half
            lo, hi = min(float(half.min()), 0.0), max(float(half.max()), 0.0)
            assert torch.allclose(part.scale.flatten(), torch.tensor([(hi - lo) / 255]), rtol=1e-5)
        assert not torch.allclose(q.parts[0].scale, q.parts[1].scale)


def test_split_model_exports_and_reloads_bit_exact(tmp_path):
    model, specs, calib, _ = _split_copy()
    with torch.no_grad():
        expected = model(**calib[0].to("cpu"), return_dict=False)[0]
    path = export_quantized(model, specs, tmp_path / "m", {})
    fresh = copy.deepcopy(denoiser(pipeline_and_calib("sd")[0]))
    load_quantized(path.parent, fresh)
    assert any(isinstance(getattr(m, "input_quantizer", None), SplitQuantizer) for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(fresh(**calib[0].to("cpu"), return_dict=False)[0], expected)
