"""Calibration sets from every step: streamed pool, EDA-DM / random selection, assembly, cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffq import calib as calibration
from diffq.calib import capture as capture_mod
from diffq.calib.capture import capture_trajectories
from diffq.calib.select import assemble, capture_pool, edadm_counts, largest_remainder, select_items, trajectory_count
from diffq.errors import ConfigError
from diffq.models import build_tiny_pipeline, sample_seeds

PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a cat", "a photo of a dog",
           "a photo of a green triangle"]


@pytest.fixture(scope="module", params=["sd", "flux"])
def pool(request, tmp_path_factory):
    family = request.param
    pipe = build_tiny_pipeline(family)
    kwargs = {"max_sequence_length": 16} if family == "flux" else {}
    seeds = sample_seeds(0, len(PROMPTS))
    sampling = dict(steps=3, guidance=4.0, resolution=32, batch_size=2, call_kwargs=kwargs)
    folder = tmp_path_factory.mktemp(f"pool_{family}")
    capture_pool(pipe, family, PROMPTS, seeds, folder, hook="auto", **sampling)
    reference = capture_trajectories(pipe, family, PROMPTS, seeds, keep_steps=99, **sampling)
    return family, pipe, folder, reference, sampling


def test_largest_remainder_sums_and_respects_the_cap():
    counts = largest_remainder(np.array([3.6, 2.2, 0.2, 4.0]), 10, cap=4)
    assert counts.sum() == 10 and counts.max() <= 4 and counts.tolist() == [4, 2, 0, 4]
    assert largest_remainder(np.array([9.0, 1.0]), 10, cap=6).tolist() == [6, 4]  # excess moves on
    with pytest.raises(ConfigError, match="at most 6 fit"):
        largest_remainder(np.array([9.0, 1.0]), 10, cap=3)


def test_edadm_weights_follow_density_and_diversity():
    torch.manual_seed(0)
    base = torch.randn(1, 2, 8, 4, 4)
    near = base + 0.01 * torch.randn(6, 2, 8, 4, 4)  # six steps with nearly the same features (dense)
    far = -base + 0.01 * torch.randn(2, 2, 8, 4, 4)  # two opposite steps (diverse w.r.t. the rest)
    features = torch.cat([near, far])
    density_only = edadm_counts(features, 80, lam=0.0, radius=0.1, radius_quantile=0.3, cap=100)
    diversity_only = edadm_counts(features, 80, lam=100.0, radius=None, radius_quantile=0.3, cap=100)
    assert density_only.sum() == diversity_only.sum() == 80
    assert density_only[:6].min() > density_only[6:].max()  # 5 neighbours within r vs 1
    # the relative radius (a quantile of the pairwise distances) sees the same clusters here
    relative = edadm_counts(features, 80, lam=0.0, radius=None, radius_quantile=0.5, cap=100)
    assert relative[:6].min() > relative[6:].max()
    assert diversity_only[6:].min() > diversity_only[:6].max()
    again = edadm_counts(features, 80, lam=5.0, radius=0.5, radius_quantile=0.3, cap=100)
    assert np.array_equal(again, edadm_counts(features, 80, lam=5.0, radius=0.5, radius_quantile=0.3, cap=100))


def test_selection_is_deterministic_distinct_and_bounded():
    counts = np.array([3, 0, 5, 2])
    items = select_items("edadm", 10, trajectories=5, calls=4, seed=1, counts=counts)
    assert items == select_items("edadm", 10, trajectories=5, calls=4, seed=1, counts=counts)
    assert len(set(items)) == 10 and [sum(c == i for c, _ in items) for i in range(4)] == counts.tolist()
    rand = select_items("all_steps_random", 20, trajectories=5, calls=4, seed=0)
    assert len(set(rand)) == 20
    with pytest.raises(ConfigError, match="larger than the captured pool of 20"):
        select_items("all_steps_random", 21, trajectories=5, calls=4, seed=0)


def test_assembled_items_are_the_captured_rows(pool):
    family, _, folder, reference, _ = pool
    trajectories, calls = trajectory_count(folder)
    assert trajectories == len(PROMPTS) and calls == len(reference) // 3  # 3 batches of 2, 2, 1 prompts
    items = select_items("all_steps_random", trajectories * calls, trajectories, calls, seed=0)
    samples = assemble(folder, items, batch_size=8)
    key = "sample" if family == "sd" else "hidden_states"
    assert [s.step for s in samples] == list(range(calls))
    # call i of the assembled set holds trajectory j's rows exactly as captured in its own batch
    for s in samples:
        got = s.kwargs[key]
        batches = [reference[b * calls + s.step].kwargs[key] for b in range(3)]
        branches = got.shape[0] // trajectories
        per_batch = [b.reshape(branches, -1, *b.shape[1:]) for b in batches]
        expected = torch.cat(per_batch, 1).reshape(-1, *got.shape[1:])
        assert torch.equal(got, expected)
    if family == "flux":  # position ids have no batch dimension and are shared
        assert samples[0].kwargs["txt_ids"].shape == reference[0].kwargs["txt_ids"].shape


def test_calibration_set_is_cached_and_the_pool_reused(pool, tmp_path, monkeypatch):
    family, pipe, _, _, sampling = pool
    runs = {"n": 0}
    real = capture_mod.generate_images

    def counting(*args, **kwargs):
        runs["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr("diffq.calib.select.generate_images", counting)
    common = dict(model_key={"family": family}, prompts=PROMPTS, seed=3, keep_steps=2, cache_dir=str(tmp_path),
                  **sampling)
    first, hit = calibration.load_or_capture(pipe, family, selection="edadm", **common)
    assert not hit and runs["n"] == 3 and sum(s.kwargs[next(iter(s.kwargs))].shape[0] for s in first) > 0
    again, hit = calibration.load_or_capture(pipe, family, selection="edadm", **common)
    assert hit and runs["n"] == 3
    assert all(torch.equal(a.kwargs[k], b.kwargs[k]) for a, b in zip(first, again)
               for k in a.kwargs if torch.is_tensor(a.kwargs[k]))
    other, hit = calibration.load_or_capture(pipe, family, selection="edadm", edadm={"lam": 0.0}, **common)
    assert not hit and runs["n"] == 3  # a changed key re-selects, from the same pool
    _, hit = calibration.load_or_capture(pipe, family, selection="all_steps_random", num_samples=4, **common)
    assert not hit and runs["n"] == 3
    with pytest.raises(ConfigError, match="unknown calib.selection"):
        calibration.load_or_capture(pipe, family, selection="best", **common)
