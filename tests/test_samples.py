"""Evaluation images on disk: GenEval layout, resume after an interruption, disjoint shards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffq.distributed import Shard
from diffq.errors import CheckpointError, ConfigError
from diffq.eval.samples import SampleFolder, generate_samples
from diffq.models import build_tiny_pipeline, sample_seeds

ENTRIES = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
           {"prompt": "a photo of a red circle"}, {"prompt": "a photo of two dogs"}]
K = 3  # images per prompt
SAMPLING = dict(steps=2, guidance=3.0, resolution=32, call_kwargs={})


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_pipeline("sd")
    p.set_progress_bar_config(disable=True)
    return p


def _folder(root, setting=None) -> SampleFolder:
    return SampleFolder(root, ENTRIES, K, setting or {"model": "tiny-sd", "steps": 2})


def _generate(pipe, folder, shard=Shard(), batch_size=2) -> int:
    return generate_samples(pipe, "sd", folder, sample_seeds(0, len(folder)), shard=shard, batch_size=batch_size,
                            desc="test", **SAMPLING)


class Interrupt(Exception):
    pass


def test_layout_is_geneval_official(pipe, tmp_path):
    folder = _folder(tmp_path / "s")
    assert _generate(pipe, folder) == 9
    assert sorted(str(p.relative_to(folder.root)) for p in folder.root.rglob("*.png"))[:4] == [
        "00000/samples/00000.png", "00000/samples/00001.png", "00000/samples/00002.png", "00001/samples/00000.png"]
    assert json.loads((folder.root / "00000" / "metadata.jsonl").read_text()) == ENTRIES[0]
    images = folder.load()
    assert images.shape == (9, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(images * 255, (images * 255).round())  # exactly the PNG's uint8 values


def test_interrupted_generation_resumes_without_regenerating(pipe, tmp_path, monkeypatch):
    reference = _folder(tmp_path / "ref")
    _generate(pipe, reference)
    folder = _folder(tmp_path / "run")
    calls = {"n": 0}
    original = type(pipe).__call__

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt  # the process dies in the middle of the third batch
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", interrupted)
    with pytest.raises(Interrupt):
        _generate(pipe, folder)
    assert len(list(folder.root.rglob("*.png"))) == 4 and not list(folder.root.rglob(".*tmp*"))
    monkeypatch.setattr(type(pipe), "__call__", original)

    counted = {"n": 0}

    def counting(self, *args, **kwargs):
        counted["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    assert _generate(pipe, folder) == 5  # only the missing images: batches 3-5 of 2, 2, 1
    assert counted["n"] == 3
    assert torch.equal(folder.load(), reference.load())  # identical to the uninterrupted run
    assert _generate(pipe, folder) == 0 and counted["n"] == 3  # complete: nothing to do


def test_shards_are_disjoint_and_make_the_single_process_result(pipe, tmp_path):
    single = _folder(tmp_path / "one")
    _generate(pipe, single, batch_size=1)
    shared = _folder(tmp_path / "two")
    made = [_generate(pipe, shared, Shard(rank, 2), batch_size=1) for rank in (0, 1)]
    assert made == [5, 4] and Shard(1, 2).ids(9) == [1, 3, 5, 7]
    assert torch.equal(shared.load(), single.load())


def test_a_folder_of_another_setting_is_refused(pipe, tmp_path):
    _generate(pipe, _folder(tmp_path / "s"))
    with pytest.raises(ConfigError, match="another setting"):
        _generate(pipe, _folder(tmp_path / "s", {"model": "tiny-sd", "steps": 3}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        _folder(tmp_path / "other").prepare()


def test_missing_or_corrupt_images_are_named(pipe, tmp_path):
    folder = _folder(tmp_path / "s")
    _generate(pipe, folder)
    folder.path(4).unlink()
    with pytest.raises(CheckpointError, match="1 of 9 samples are missing"):
        folder.load()
    _generate(pipe, folder)
    folder.path(4).write_bytes(b"not a png")
    with pytest.raises(CheckpointError, match="00001/samples/00001.png is unreadable"):
        folder.load()


def test_cli_job_resumes_its_quantized_samples(compose, tmp_path):
    from diffq.job import run

    overrides = ["model=tiny_sd15", "eval.grid=false", "calib.num_prompts=2", "calib.num_steps=2", "model.steps=4"]
    first = run(compose(*overrides), tmp_path)
    assert first["samples"]["generated_quant"] == len(first["prompts"])
    (tmp_path / "samples" / "00001" / "samples" / "00000.png").unlink()
    again = run(compose(*overrides), tmp_path)
    assert again["samples"]["generated_quant"] == 1 and again["samples"]["generated_fp"] == 0
    assert again["fidelity"]["psnr"]["per_image"] == first["fidelity"]["psnr"]["per_image"]
    complete = run(compose(*overrides), tmp_path)  # nothing to generate: bits still counted on one call
    assert complete["samples"]["generated_quant"] == 0
    for m in (again, complete):
        assert np.isclose(m["cost"]["effective_act_bits"], first["cost"]["effective_act_bits"])


@pytest.mark.slow
def test_two_processes_split_the_samples_and_agree_with_one(tmp_path):
    """``torchrun --nproc_per_node 2 -m diffq`` (gloo on CPU): disjoint shards, same metrics as one process."""
    import os
    import shutil
    import subprocess
    import sys

    args = ["model=tiny_sd15", "eval.images_per_prompt=3", "calib.num_prompts=2", "calib.num_steps=2", "model.steps=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DIFFQ_CACHE_DIR": str(tmp_path / "cache")}
    torchrun = [shutil.which("torchrun") or "torchrun", "--nproc_per_node", "2"]
    runs = {}
    for name, launcher in (("one", [sys.executable]), ("two", torchrun)):
        env["DIFFQ_CACHE_DIR"] = str(tmp_path / f"cache_{name}")
        res = subprocess.run([*launcher, "-m", "diffq", *args, f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["two"]["samples"]["processes"] == 2 and runs["two"]["samples"]["generated_quant"] == 6
    assert runs["two"]["fidelity"]["psnr"]["per_image"] == runs["one"]["fidelity"]["psnr"]["per_image"]


def test_cached_fp_samples_notice_retrained_weights(tmp_path):
    """The FP sample / calibration cache keys carry a fingerprint of a local model folder."""
    import os

    from diffq.models import weights_fingerprint

    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "model.safetensors"
    weights.write_bytes(b"v1")
    first = weights_fingerprint(str(tmp_path))
    assert first == weights_fingerprint(str(tmp_path)) and weights_fingerprint("org/hub-id") is None
    weights.write_bytes(b"v2-retrained")
    os.utime(weights, ns=(1, 1))
    assert weights_fingerprint(str(tmp_path)) != first


def test_grid_columns_spread_over_the_tasks():
    from diffq.eval.grids import spread_indices
    from diffq.testbed.prompts import evaluation_metadata

    entries = list(evaluation_metadata())
    k = 2
    prompts = [e["prompt"] for e in entries for _ in range(k)]
    tags = [e["tag"] for e in entries for _ in range(k)]
    ids = spread_indices(prompts, tags, 8)
    tasks = list(dict.fromkeys(tags))
    assert len(tasks) == 6 and [tags[i] for i in ids[:6]] == tasks  # one per task first, in order
    assert len(set(prompts[i] for i in ids)) == 8 and all(i % k == 0 for i in ids)  # distinct prompts, first images
    assert spread_indices(["a", "a", "b"], [None] * 3, 3) == [0, 2, 1]  # fewer prompts: then the other images
