"""Timestep-aware activation quantizers: one range per group of sampler steps, picked by the call's timestep."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffq.calib import CalibSample
from diffq.errors import CalibrationError, ConfigError
from diffq.export import export_quantized, load_quantized
from diffq.methods import rtn
from diffq.methods.reconstruct import reconstruct
from diffq.roles import ROLES
from diffq.spec import resolve_spec
from diffq.tensor_quant import TensorQuant
from diffq.timestep_groups import TimestepGroupedQuantizer, grouped_quantizers, router_of, set_boundaries
from tests.helpers import A8, KEEP_FP, W8, outputs, quantized_copy, rel_error

A4_GROUPS = {**A8, "bits": 4, "timestep_groups": 2, "timestep_init": "shared"}  # the tiny calib has 2 steps
CPU = torch.device("cpu")


class Toy(nn.Module):
    """A denoiser-shaped toy: ``forward(sample, timestep)`` through one Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, return_dict: bool = True) -> tuple:
        return (self.proj(sample),)


def _toy(groups: int, init: str = "own") -> tuple[Toy, list[CalibSample]]:
    """A toy quantized with int8 inputs in ``groups`` timestep groups; timestep t's inputs span [-t/100, t/100]."""
    model = Toy()
    act = {**A8, "symmetric": True, "timestep_groups": groups, "timestep_init": init}
    specs = resolve_spec({"proj": ("other", model.proj)}, W8, act, [], ROLES)
    gen = torch.Generator().manual_seed(0)
    calib = []
    for t in (900.0, 700.0, 300.0, 100.0):
        x = torch.rand(2, 4, generator=gen) * 2 - 1
        x[0, 0] = 1.0
        calib.append(CalibSample({"sample": x * t / 100, "timestep": torch.tensor(t)}, 0))
    rtn.apply(model, specs, calib, {}, device=CPU, dtype=torch.float32)
    return model, calib


def test_each_group_is_calibrated_on_its_own_timesteps_only():
    model, _ = _toy(2)
    (q,) = grouped_quantizers(model)
    assert q.boundaries.tolist() == [500.0]  # between 700 (last of the noisy half) and 300
    # symmetric int8 min-max: scale = amax / 127; group 0 saw |x| <= 9, group 1 |x| <= 3
    assert q.parts[0].scale.item() == pytest.approx(9 / 127, rel=1e-6)
    assert q.parts[1].scale.item() == pytest.approx(3 / 127, rel=1e-6)


def test_the_call_timestep_picks_the_group_row_by_row():
    model, _ = _toy(2)
    (q,) = grouped_quantizers(model)
    x = torch.linspace(-3, 3, 8).reshape(2, 4)
    router = router_of(model)
    for t, g in ((999.0, 0), (501.0, 0), (499.0, 1), (0.0, 1)):
        router.route(torch.tensor([t, t]))
        assert torch.equal(q(x), q.parts[g](x))
    router.route(torch.tensor([900.0, 100.0]))  # a batch mixing steps: each row its own group
    mixed = q(x)
    assert torch.equal(mixed[0], q.parts[0](x[:1])[0]) and torch.equal(mixed[1], q.parts[1](x[1:])[0])
    assert not torch.equal(mixed[0], q.parts[1](x[:1])[0])
    with torch.no_grad():  # through the denoiser's own timestep argument
        out = model(x, torch.tensor(100.0))[0]
    assert torch.equal(out, nn.functional.linear(q.parts[1](x), model.proj.weight_fq, model.proj.bias))


def test_boundaries_split_the_distinct_timesteps_in_sampling_order():
    model, _ = _toy(4, "shared")
    (q,) = grouped_quantizers(model)
    assert q.boundaries.tolist() == [800.0, 500.0, 200.0]
    with pytest.raises(CalibrationError, match="raise calib.num_steps"):
        set_boundaries(model, [torch.tensor(900.0), torch.tensor(100.0), torch.tensor(900.0)])


def test_groups_calibrated_on_their_own_need_two_steps_each():
    with pytest.raises(CalibrationError, match="raise calib.num_steps to at least 8.*timestep_init=shared"):
        _toy(4)  # 4 calibration steps for 4 groups: each range would be one step's


def test_shared_groups_start_from_one_calibration_and_train_apart():
    model, calib = _toy(4, "shared")
    (q,) = grouped_quantizers(model)
    assert [p.scale.item() for p in q.parts] == [pytest.approx(9 / 127, rel=1e-6)] * 4  # every call's range
    for part in q.parts:
        part.make_learnable()
    router = router_of(model)
    router.route(torch.tensor([100.0, 100.0]))  # a call at the last step trains only the last group's step size
    q(calib[3].kwargs["sample"].requires_grad_(True)).square().sum().backward()
    grads = [p.scale.grad for p in q.parts]
    assert grads[3] is not None and grads[3].abs().item() > 0 and all(g is None for g in grads[:3])


def test_timestep_groups_are_for_static_activations_only():
    with pytest.raises(ConfigError, match="static activation quantizers"):
        resolve_spec({"proj": ("other", nn.Linear(4, 4))}, {**W8, "timestep_groups": 2}, A8, [], ROLES)
    with pytest.raises(ConfigError, match="dynamic activations"):
        resolve_spec({"proj": ("other", nn.Linear(4, 4))}, W8, {**A8, "granularity": "token", "timestep_groups": 2},
                     [], ROLES)
    assert TensorQuant.from_mapping({**A4_GROUPS, "timestep_init": "own"}, "act").describe() == "uint4/tensor/asym/t2"
    assert TensorQuant.from_mapping(A4_GROUPS, "act").describe() == "uint4/tensor/asym/t2s"
    with pytest.raises(ConfigError, match="unknown timestep_init 'nope'"):
        resolve_spec({"proj": ("other", nn.Linear(4, 4))}, W8, {**A4_GROUPS, "timestep_init": "nope"}, [], ROLES)


def test_grouped_model_exports_and_reloads_bit_exactly(tmp_path):
    fp, grouped, specs, calib = quantized_copy("sd", act=A4_GROUPS)
    for q in grouped_quantizers(grouped):  # trained apart: each group's step sizes differ, as finetuning leaves them
        for g, part in enumerate(q.parts):
            part.set_params(scale=part.params()["scale"] * (1 + 0.1 * g))
    _, plain, _, _ = quantized_copy("sd", act={**A8, "bits": 4})
    assert all(isinstance(q, TimestepGroupedQuantizer) for q in grouped_quantizers(grouped))
    ref = outputs(fp, calib)
    out = outputs(grouped, calib)
    assert rel_error(ref, out) != rel_error(ref, outputs(plain, calib))  # the groups' own ranges are used
    export_quantized(grouped, specs, tmp_path / "model")
    reloaded = load_quantized(tmp_path / "model", copy.deepcopy(fp))
    assert all(torch.equal(a, b) for a, b in zip(out, outputs(reloaded, calib)))


RC = {"iters": 20, "lr": 1e-3, "reg_weight": 0.01, "beta_start": 20.0, "beta_end": 2.0, "warmup": 0.2,
      "act_iters": 10, "act_lr": 4e-4, "fine_grained_weight": 1.0, "fbr_regularizer": False, "qdrop": 0.0,
      "unit": "block", "batch_size": 4, "seed": 0}


def test_reconstruction_routes_each_rows_timestep(monkeypatch):
    model, calib = _toy(2)
    for s in calib:  # each row carries its own timestep in its first feature
        s.kwargs["sample"][:, 0] = s.kwargs["timestep"] / 1000
    seen = []
    forward = TimestepGroupedQuantizer.forward
    monkeypatch.setattr(TimestepGroupedQuantizer, "forward",
                        lambda self, x: seen.append((x[:, 0] * 1000, self.timesteps)) or forward(self, x))
    reconstruct(model, calib, {**RC, "iters": 5, "act_iters": 5, "batch_size": 3}, "layer", device=CPU,
                dtype=torch.float32)
    mixed = [t for _, t in seen if t.unique().numel() > 1]
    assert mixed, "batch_size 3 over 4 samples of 2 rows must mix timesteps in one batch"
    for rows, routed in seen:  # shuffled minibatches: every row is quantized with its own timestep
        assert torch.allclose(rows, routed, atol=1e-3)


def test_block_reconstruction_of_a_grouped_unet_improves_its_units():
    _, model, _, calib = quantized_copy("sd", act=A4_GROUPS)
    stats = reconstruct(model, calib, RC, "block", device=CPU, dtype=torch.float32)
    kept = [u for u in stats["recon_loss"].values() if u["kept"] == "recon"]
    assert kept and all(u["recon"] < u["rtn"] for u in kept)


def test_specs_without_groups_build_plain_quantizers():
    _, model, _, _ = quantized_copy("sd", act=A8, rules=KEEP_FP)
    assert grouped_quantizers(model) == [] and router_of(model) is None
