"""The worlds registry: the testbed registers its world, the layers below reach it only by name,
and its training examples are the one source of FID references and finetuning data."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from diffq.errors import ConfigError
from diffq.eval import fid as fid_mod
from diffq.eval.suite import check_eval, geneval_backend
from diffq.finetune.stage import training_prompts, validation_prompts
from diffq.testbed.assets import asset_path
from diffq.testbed.prompts import evaluation_metadata, training_example
from diffq.testbed.world import render
from diffq.worlds import WORLDS, get_world, world_asset, world_names, world_of

PACKAGE = Path(__file__).resolve().parents[1] / "diffq"


def test_registry_lists_the_testbed_world():
    assert "shapes" in world_names() and "shapes" in WORLDS
    world = get_world("shapes")
    assert world.name == "shapes" and type(world).__module__.startswith("diffq.testbed.")
    assert world.evaluation_metadata() == list(evaluation_metadata())
    assert type(world.detector()).__name__ == "ShapesDetector"


def test_unknown_world_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown model.world 'nowhere'; registered: .*shapes"):
        get_world("nowhere")


def test_training_examples_are_deterministic_and_the_testbed_renders():
    world = get_world("shapes")
    a, b, c = (world.training_examples(6, seed) for seed in (3, 3, 4))
    assert a.captions == b.captions and np.array_equal(a.images, b.images)
    assert a.captions != c.captions
    assert a.images.dtype == np.uint8 and a.images.shape == (6, 32, 32, 3)
    rng = np.random.default_rng(3)
    scenes = [training_example(rng) for _ in range(6)]
    assert a.captions == [e.caption for e in scenes]
    assert np.array_equal(a.images, np.stack([render(e.scene) for e in scenes]))


def test_fid_references_and_finetuning_data_are_the_same_pixels(monkeypatch):
    examples = get_world("shapes").training_examples(5, 7)
    expected = torch.from_numpy(examples.images).permute(0, 3, 1, 2)
    assert torch.equal(fid_mod.reference_images("shapes", 5, seed=7), expected)
    seen = []
    monkeypatch.setattr(fid_mod, "extract_features", lambda images, *a, **k: seen.append(images) or images.float())
    extractor = type("Extractor", (), {"resize": "tf_bilinear", "source": "test"})()
    fid_mod.reference_features("shapes", 5, extractor, None, seed=7)
    assert torch.equal(seen[0], expected)
    data = {"source": "images", "prompts": "world", "num_prompts": 5, "seed": 7, "val_prompts": 5, "val_seed": 7,
            "prompts_file": None}
    captions, images = training_prompts({"data": data}, [], "shapes")
    assert captions == examples.captions and np.array_equal(images, examples.images)
    assert validation_prompts({"data": data}, [], [], "shapes") == examples.captions


def test_assets_resolve_and_belong_to_their_world(compose, tmp_path):
    assert world_asset("shapes", "unet_pipeline") == asset_path("unet_pipeline")
    model = compose("model=testbed_unet").model
    assert model.pretrained == asset_path("unet_pipeline") and model.clip_model == asset_path("clip")
    assert world_of(model.pretrained).name == "shapes" and world_of(tmp_path) is None


def test_geneval_backend_follows_the_world(compose):
    ev = compose("model=testbed_unet", "eval=geneval_shapes").eval
    assert geneval_backend(ev) == "shapes"
    assert geneval_backend(compose("model=tiny_sd15", "eval.geneval.metadata=/x.jsonl").eval) == "mask2former"
    with pytest.raises(ConfigError, match=r"eval.geneval.backend 'yolo'.*shapes"):
        check_eval(compose("model=testbed_unet", "eval.geneval.backend=yolo").eval)


def _violations(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and node.value == "shapes":
            out.append(f"{path}:{node.lineno}: string constant 'shapes'")
        elif isinstance(node, ast.Import):
            out += [f"{path}:{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("diffq.testbed")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            if any(n == "diffq.testbed" or n.startswith("diffq.testbed.") for n in names):
                out.append(f"{path}:{node.lineno}: from {node.module} import ...")
    return out


def test_nothing_outside_the_testbed_names_or_imports_it():
    files = [p for p in PACKAGE.rglob("*.py") if "testbed" not in p.relative_to(PACKAGE).parts]
    assert len(files) > 20 and PACKAGE / "worlds.py" in files
    assert [v for p in sorted(files) for v in _violations(p)] == []
