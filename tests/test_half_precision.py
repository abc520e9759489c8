"""Every method runs on float16/bfloat16 denoisers (every real-model config loads them so);
tiny models in bfloat16 on CPU."""
from __future__ import annotations

import copy

import pytest
import torch

from diffq.methods import get_method
from diffq.methods.reconstruct import reconstruct
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec
from tests.helpers import KEEP_FP, denoiser, pipeline_and_calib, rel_error

CPU = torch.device("cpu")
BF16 = torch.bfloat16
QUICK = {"iters": 20, "lr": 3e-3, "reg_weight": 0.01, "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2,
         "act_iters": 5, "act_lr": 4e-4, "fine_grained_weight": 1.0, "fbr_regularizer": True, "qdrop": 0.5,
         "seed": 0, "unit": "block", "batch_size": 4}
INT = ({"format": "int", "bits": 8, "granularity": "channel"}, {"format": "int", "bits": 8, "symmetric": False})
FP = ({"format": "fp", "bits": 8, "granularity": "channel"}, {"format": "fp", "bits": 8})


@torch.no_grad()
def _outputs(model, calib):
    return [model(**s.to(CPU, BF16), return_dict=False)[0].float() for s in calib]


def _bf16(family: str):
    pipe, calib = pipeline_and_calib(family)
    fp = copy.deepcopy(denoiser(pipe)).to(BF16)
    return fp, copy.deepcopy(fp), calib


@pytest.mark.parametrize("family,method,formats,recon", [
    ("sd", "rtn", INT, None),
    ("sd", "fp_search", FP, None),
    ("sd", "rtn", INT, "block"),
    ("sd", "rtn", INT, "fbr"),
    ("flux", "rtn", INT, "layer"),
    ("flux", "fp_search", FP, "block"),
])
def test_methods_run_in_bfloat16(family, method, formats, recon):
    fp, model, calib = _bf16(family)
    specs = resolve_spec(quantizable_layers(model, family), *formats, KEEP_FP, ROLES)
    get_method(method)(model, specs, calib, {"search": {"alphas": 8, "act_inputs": 2}}, device=CPU, dtype=BF16)
    if recon:
        stats = reconstruct(model, calib, QUICK, recon, device=CPU, dtype=BF16)
        assert stats["recon_units"] > 0
    assert next(model.parameters()).dtype == BF16
    ref, out = _outputs(fp, calib), _outputs(model, calib)
    assert all(o.isfinite().all() for o in out)
    assert 0 < rel_error(ref, out) < 0.1


def test_timestep_groups_and_binarydm_run_in_bfloat16():
    fp, model, calib = _bf16("sd")
    grouped = ({"format": "int", "bits": 8, "granularity": "channel"},
               {"format": "int", "bits": 8, "symmetric": False, "timestep_groups": 2,
                "timestep_init": "shared"})
    specs = resolve_spec(quantizable_layers(model, "sd"), *grouped, KEEP_FP, ROLES)
    get_method("rtn")(model, specs, calib, {}, device=CPU, dtype=BF16)
    assert reconstruct(model, calib, QUICK, "block", device=CPU, dtype=BF16)["recon_units"] > 0
    ref = _outputs(fp, calib)
    assert 0 < rel_error(ref, _outputs(model, calib)) < 0.1

    binary = ({"format": "binary", "bits": 2, "granularity": "channel"},
              {"format": "int", "bits": 8, "symmetric": True})
    errors = {}
    for dtype in (torch.float32, BF16):
        pipe, calib = pipeline_and_calib("sd")
        fp = copy.deepcopy(denoiser(pipe)).to(dtype)
        m = copy.deepcopy(fp)
        specs = resolve_spec(quantizable_layers(m, "sd"), *binary, KEEP_FP, ROLES)
        stats = get_method("binarydm")(m, specs, calib, {}, device=CPU, dtype=dtype)
        assert stats["binary_layers"] > 0
        with torch.no_grad():
            ref, out = ([model(**s.to(CPU, dtype), return_dict=False)[0].float() for s in calib] for model in (fp, m))
        assert all(o.isfinite().all() for o in out)
        errors[dtype] = rel_error(ref, out)
    # bf16 binarises as well as float32 (its rounding flips a few second-basis signs, nothing more)
    assert 0 < errors[BF16] < errors[torch.float32] + 0.05, errors
