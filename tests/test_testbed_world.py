"""Shapes world and its GenEval-format prompts: determinism, geometry, palette, held-out evaluation set."""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from scipy import ndimage

from diffq.eval.geneval import check_entry, score_image
from diffq.testbed.detector import detect
from diffq.testbed.groundtruth import scene_for
from diffq.testbed.prompts import TASKS, Example, evaluation_metadata, evaluation_prompts, training_example, vocabulary
from diffq.testbed.world import BACKGROUND, COLORS, MIN_GAP, NUMBERS, PLURALS, RELATIONS, render

WORD_NUMBERS = {word: n for n, word in NUMBERS.items()}
SINGULAR = {plural: shape for shape, plural in PLURALS.items()}


@pytest.fixture(scope="module")
def training() -> list[Example]:
    rng = np.random.default_rng(7)
    return [training_example(rng) for _ in range(20_000)]


def test_render_is_deterministic_given_the_seed():
    a, b, c = (training_example(np.random.default_rng(seed)) for seed in (3, 3, 4))
    assert a == b and a != c
    np.testing.assert_array_equal(render(a.scene), render(b.scene))
    assert render(a.scene).shape == (32, 32, 3) and render(a.scene).dtype == np.uint8


def test_objects_never_overlap(training: list[Example]):
    rng = np.random.default_rng(1)
    scenes = [ex.scene for ex in training[:1000]] + [scene_for(e, rng) for e in evaluation_metadata()]
    gaps = [max(b.box[0] - a.box[2], a.box[0] - b.box[2], b.box[1] - a.box[3], a.box[1] - b.box[3])
            for s in scenes for a, b in itertools.combinations(s.objects, 2)]
    assert len(gaps) > 500 and min(gaps) >= MIN_GAP - 1e-9


def test_only_background_and_palette_away_from_edges(training: list[Example]):
    images = np.stack([render(ex.scene) for ex in training[:300]]).astype(np.int16)
    size = (1, 3, 3, 1)
    flat = (ndimage.maximum_filter(images, size) == ndimage.minimum_filter(images, size)).all(-1)
    palette = np.array([BACKGROUND, *COLORS.values()])
    known = (images[:, :, :, None, :] == palette).all(-1).any(-1)
    assert flat.mean() > 0.8 and known[flat].all()
    # edge pixels are blends background + a (colour - background), up to rounding
    x = images - palette[0]
    dirs = palette[1:] - palette[0]
    a = np.clip(x @ dirs.T / (dirs**2).sum(1), 0, 1)
    residual = np.linalg.norm(x[..., None, :] - a[..., None] * dirs, axis=-1).min(-1)
    assert residual.max() <= np.sqrt(3) / 2


def test_evaluation_set_schema_and_tasks():
    entries = evaluation_metadata()
    assert len(entries) >= 200 and len(evaluation_prompts()) == len(entries)
    assert {e["tag"] for e in entries} == set(TASKS)
    for i, e in enumerate(entries):
        check_entry(e, f"entry {i}")
        assert set(e) <= {"tag", "include", "exclude", "prompt"} and e["prompt"].startswith("a photo of ")
        if e["tag"] == "counting":
            (inc,), (exc,) = e["include"], e["exclude"]
            assert exc == {"class": inc["class"], "count": inc["count"] + 1}
        if e["tag"] == "position":
            assert e["include"][1]["position"][1] == 0 and "position" not in e["include"][0]


def test_no_evaluation_prompt_among_training_captions(training: list[Example]):
    captions = {ex.caption for ex in training}
    assert len(captions) > 1000 and not captions & evaluation_prompts()


def test_vocabulary_covers_all_captions(training: list[Example]):
    words = {w for text in [*evaluation_prompts(), *(ex.caption for ex in training[:2000])] for w in text.split()}
    assert words <= set(vocabulary())


def _caption_entry(caption: str) -> dict:
    """GenEval entry for a training caption of the world's grammar."""
    def phrase(text: str) -> dict:
        first, *color, noun = text.split()
        count = 1 if first == "a" else WORD_NUMBERS[first]
        clause = {"class": SINGULAR.get(noun, noun), "count": count}
        return {**clause, "color": color[0]} if color else clause

    body = caption.removeprefix("a photo of ")
    for rel in RELATIONS:
        if f" {rel} " in body:
            second, first = body.split(f" {rel} ")
            return {"tag": "position", "include": [phrase(first), {**phrase(second), "position": [rel, 0]}]}
    parts = [phrase(p) for p in body.split(" and ")]
    exclude = [{"class": parts[0]["class"], "count": parts[0]["count"] + 1}] if parts[0]["count"] > 1 else []
    return {"tag": "counting" if exclude else "two_object", "include": parts, "exclude": exclude}


def test_training_captions_match_their_scenes(training: list[Example]):
    assert _caption_entry("a photo of three red circles") == {
        "tag": "counting", "include": [{"class": "circle", "count": 3, "color": "red"}],
        "exclude": [{"class": "circle", "count": 4}]}
    for ex in training[:500]:
        assert re.fullmatch(r"a photo of [a-z ]+", ex.caption)
        ok, reason = score_image(_caption_entry(ex.caption), detect(render(ex.scene)))
        assert ok, (ex.caption, reason)
