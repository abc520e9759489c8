"""Shapes-world detector: GenEval accuracy on ground-truth renders, exact scenes, boxes, chance levels."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from diffq.errors import ConfigError
from diffq.eval.geneval import chance_levels, score
from diffq.testbed.detector import ShapesDetector, detect, pixel_colors
from diffq.testbed.groundtruth import render_entry, scene_for
from diffq.testbed.prompts import TASKS, evaluation_metadata, training_example
from diffq.testbed.world import BACKGROUND, COLORS, render

IMAGES_PER_PROMPT = 4


@pytest.fixture(scope="module")
def eval_renders() -> np.ndarray:
    rng = np.random.default_rng(11)
    return np.stack([render_entry(e, rng) for e in evaluation_metadata() for _ in range(IMAGES_PER_PROMPT)])


def test_accuracy_on_ground_truth_renders_of_every_task(eval_renders: np.ndarray):
    result = score(evaluation_metadata(), ShapesDetector()(eval_renders), IMAGES_PER_PROMPT)
    print("detector accuracy on ground truth:", {t: round(a, 4) for t, a in result.tasks.items()})
    assert set(result.tasks) == set(TASKS)
    assert min(result.tasks.values()) >= 0.98, [(p.prompt, p.reasons) for p in result.prompts if not all(p.correct)]


def test_accuracy_survives_noise_and_blur(eval_renders: np.ndarray):
    """Generated images are not clean renders: Gaussian blur 0.6 px and noise sigma 8 of 255."""
    images = ndimage.gaussian_filter(eval_renders[::2].astype(np.float32), (0, 0.6, 0.6, 0))
    images += np.random.default_rng(0).normal(0, 8, images.shape)
    result = score(evaluation_metadata(), ShapesDetector()(np.clip(images, 0, 255).round().astype(np.uint8)), 2)
    assert min(result.tasks.values()) >= 0.95, result.tasks


def test_exact_objects_and_boxes_on_training_scenes():
    rng = np.random.default_rng(5)
    scenes = [training_example(rng).scene for _ in range(500)]
    exact, box_err, drawn_err = 0, [], []
    for scene in scenes:
        dets = detect(render(scene))
        exact += Counter((d.cls, d.color) for d in dets) == Counter((o.shape, o.color) for o in scene.objects)
        for o in scene.objects:
            same = [d for d in dets if (d.cls, d.color) == (o.shape, o.color)]
            if same:
                box = np.array(min(same, key=lambda d: abs(d.box[0] - o.box[0]) + abs(d.box[1] - o.box[1])).box)
                box_err.append(np.abs(box - o.box).max())
                half = o.size * (0.9 if o.shape == "square" else 1.0)  # squares are drawn at 0.9 of the half-extent
                drawn_err.append(np.abs(box - [o.cx - half, o.cy - half, o.cx + half, o.cy + half]).max())
    assert exact / len(scenes) >= 0.99
    assert max(box_err) <= 1.0 and max(drawn_err) <= 0.5


def test_chance_levels_are_far_below_one():
    result = chance_levels(evaluation_metadata(), render_entry, ShapesDetector(), np.random.default_rng(3), 4)
    print("chance levels:", {t: round(a, 4) for t, a in result.tasks.items()}, "overall", round(result.overall, 4))
    assert set(result.tasks) == set(TASKS)
    # two_object: 1 of the 5 other prompts names the same pair in the other order (expected 0.2)
    assert max(result.tasks.values()) <= 0.4 and result.overall <= 0.1


def test_blended_edge_pixels_keep_their_colour():
    bg, yellow = np.array(BACKGROUND, float), np.array(COLORS["yellow"], float)
    image = np.round(bg + np.array([0.2, 0.5, 0.9])[:, None] * (yellow - bg)).astype(np.uint8)[None]
    best, coverage = pixel_colors(image)
    assert [list(COLORS)[k] for k in best[0]] == ["yellow"] * 3  # half-yellow is nearer green than yellow
    np.testing.assert_allclose(coverage[0], [0.2, 0.5, 0.9], atol=0.01)


def test_specks_background_and_bad_input():
    image = np.zeros((32, 32, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
    assert detect(image) == []
    image[4:6, 4:5] = COLORS["red"]  # a 2-pixel speck
    assert detect(image) == []
    image[10:16, 10:16] = COLORS["blue"]
    (square,) = detect(image)
    assert (square.cls, square.color, square.box, int(square.mask.sum())) == ("square", "blue", (10, 10, 16, 16), 36)
    with pytest.raises(ConfigError, match="uint8 RGB image"):
        detect(image.astype(np.float32))
    with pytest.raises(ConfigError, match=r"batch \[N, H, W, 3\]"):
        ShapesDetector()(image)


def test_ground_truth_scenes_follow_their_entries():
    rng = np.random.default_rng(0)
    for e in evaluation_metadata():
        scene = scene_for(e, rng)
        assert Counter(o.shape for o in scene.objects) == Counter({c["class"]: c["count"] for c in e["include"]})
        for clause in e["include"]:
            if "color" in clause:
                assert any((o.shape, o.color) == (clause["class"], clause["color"]) for o in scene.objects)
    with pytest.raises(ConfigError, match="does not draw"):
        scene_for({"include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}, rng)
    with pytest.raises(ConfigError, match="at most 4"):
        scene_for({"include": [{"class": "circle", "count": 5}], "prompt": "a photo of five circles"}, rng)
