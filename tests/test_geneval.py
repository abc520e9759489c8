"""GenEval scorer: the official rules on synthetic detections, metadata loading, the real prompt set."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from diffq.errors import ConfigError
from diffq.eval.geneval import (
    Detection,
    balanced_entries,
    chance_levels,
    load_metadata,
    relative_position,
    score,
    score_image,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "geneval"
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MASK = np.zeros((32, 32), dtype=bool)


def det(cls: str, box=(0, 0, 10, 10), color: str = "red", score: float = 1.0) -> Detection:
    return Detection(cls, tuple(float(v) for v in box), MASK, color, score)


def entry(tag: str, include: list[dict], exclude: list[dict] | None = None, prompt: str = "p") -> dict:
    return {"tag": tag, "include": include, **({"exclude": exclude} if exclude else {}), "prompt": prompt}


TWO_CIRCLES = entry("counting", [{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])
RED_SQUARE = entry("colors", [{"class": "square", "count": 1, "color": "red"}])
SQUARE_LEFT_OF_CIRCLE = entry("position", [{"class": "circle", "count": 1},
                                           {"class": "square", "count": 1, "position": ["left of", 0]}])


def test_include_counts_and_exclude_make_counting_exact():
    assert score_image(TWO_CIRCLES, [det("circle"), det("circle"), det("square")]) == (True, "")
    assert score_image(TWO_CIRCLES, [det("circle")]) == (False, "expected circle>=2, found 1")
    assert score_image(TWO_CIRCLES, [det("circle")] * 3) == (False, "expected circle<3, found 3")
    assert score_image(TWO_CIRCLES, []) == (False, "expected circle>=2, found 0")
    two = entry("two_object", [{"class": "circle", "count": 1}, {"class": "square", "count": 1}])
    assert score_image(two, [det("circle"), det("square"), det("circle")])[0]  # no exclude: extra objects are fine
    assert score_image(two, [det("circle"), det("triangle")]) == (False, "expected square>=1, found 0")


def test_colour_is_checked_on_the_most_confident_objects_of_the_class():
    assert score_image(RED_SQUARE, [det("square", color="red")])[0]
    ok, reason = score_image(RED_SQUARE, [det("square", color="blue")])
    assert not ok and reason == "expected red square>=1, found 0 red; and 1 blue"
    # official rule: only the `count` most confident squares are colour-checked
    blue, red = det("square", color="blue", score=0.9), det("square", color="red", score=0.8)
    assert not score_image(RED_SQUARE, [red, blue])[0]
    assert score_image(RED_SQUARE, [red, det("square", color="blue", score=0.7)])[0]
    two_red = entry("colors", [{"class": "square", "count": 2, "color": "red"}])
    assert not score_image(two_red, [det("square", color="red"), det("square", color="white")])[0]


def test_relative_position_rule_numbers():
    a = (0, 0, 10, 10)
    assert relative_position(a, (20, 0, 30, 10)) == {"left of"}  # dx = (-20 + 2) / 20 = -0.9
    assert relative_position((20, 0, 30, 10), a) == {"right of"}
    assert relative_position(a, (0, 20, 10, 30)) == {"above"}  # y grows downward
    assert relative_position((0, 20, 10, 30), a) == {"below"}
    assert relative_position(a, (10, 10, 20, 20)) == {"left of", "above"}  # (-8, -8) / 14.1 = -0.57 each
    assert relative_position(a, (10, 5, 20, 15)) == {"left of"}  # (-8, -3) / 11.2 = (-0.72, -0.27)
    # nearly aligned: the 1.5 px offset is inside the 0.1 * (10 + 10) = 2 px margin -> no relation at all
    assert relative_position(a, (1.5, 0, 11.5, 10)) == set()
    assert relative_position(a, (1.5, 0, 11.5, 10), threshold=0.0) == {"left of"}
    assert relative_position(a, a) == set()
    # margin shrinks x only: offset (-3, -8) -> revised (-1, -6) / 8.54 -> above, not left
    assert relative_position(a, (3, 8, 13, 18)) == {"above"}


def test_position_clause_against_its_target():
    circle, left, right = det("circle", (20, 0, 30, 10)), det("square", (0, 0, 10, 10)), det("square", (40, 0, 50, 10))
    assert score_image(SQUARE_LEFT_OF_CIRCLE, [circle, left]) == (True, "")
    ok, reason = score_image(SQUARE_LEFT_OF_CIRCLE, [circle, right])
    assert not ok and reason == "expected square left of target, found right of target"
    aligned = det("square", (19, 12, 29, 22))  # below the circle, 1 px to its left: inside the margin
    ok, reason = score_image(SQUARE_LEFT_OF_CIRCLE, [circle, aligned])
    assert not ok and reason == "expected square left of target, found below target"
    ok, reason = score_image(SQUARE_LEFT_OF_CIRCLE, [left])
    assert not ok and reason == "expected circle>=1, found 0\nno target for square to be left of"


def test_score_thresholds_and_per_class_cap():
    faint = det("circle", score=0.3)  # the threshold is strict
    assert not score_image(entry("single_object", [{"class": "circle", "count": 1}]), [faint])[0]
    assert score_image(entry("single_object", [{"class": "circle", "count": 1}]), [det("circle", score=0.31)])[0]
    sure, unsure = det("circle", score=0.95), det("circle", score=0.5)
    assert score_image(TWO_CIRCLES, [sure, sure, unsure])[0]  # counting ignores detections at or below 0.9
    assert not score_image(TWO_CIRCLES, [sure, unsure])[0]
    assert score_image(TWO_CIRCLES, [sure, unsure], counting_threshold=0.4) == (True, "")
    many = [det("circle", score=0.5 + i / 100) for i in range(20)]
    capped = entry("two_object", [{"class": "circle", "count": 16}], [{"class": "circle", "count": 17}])
    assert score_image(capped, many) == (True, "")  # at most 16 circles are kept
    assert score_image(capped, many, max_objects=20) == (False, "expected circle<17, found 20")


def test_score_aggregates_tasks_unweighted():
    entries = [RED_SQUARE, TWO_CIRCLES, {**TWO_CIRCLES, "prompt": "q"}, {**TWO_CIRCLES, "prompt": "r"}]
    dets = [[det("square")], [det("square")],  # colors: 2/2
            [det("circle")] * 2, [det("circle")],  # counting: 1/2, 0/2, 0/2
            [], [det("circle")],
            [det("circle")] * 3, []]
    result = score(entries, dets, images_per_prompt=2)
    assert result.tasks == {"colors": 1.0, "counting": pytest.approx(1 / 6)}
    assert result.overall == pytest.approx((1 + 1 / 6) / 2)  # not the image-weighted 3/8
    assert result.correct_images == pytest.approx(3 / 8)
    assert result.correct_prompts == pytest.approx(2 / 4)
    assert result.prompts[1].correct == (True, False)
    assert result.prompts[3].reasons[0] == "expected circle<3, found 3"
    assert json.loads(json.dumps(result.to_dict()))["tasks"]["colors"] == 1.0
    with pytest.raises(ConfigError, match="detections for 7 images but 4 prompts x 2"):
        score(entries, dets[:7], images_per_prompt=2)
    with pytest.raises(ConfigError, match="metadata entry 0.*lacks tag"):
        score([{"include": [{"class": "c", "count": 1}], "prompt": "p"}], [[]], images_per_prompt=1)


def test_load_metadata_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_metadata(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="holds no entries"):
        load_metadata(empty)
    good = json.dumps(RED_SQUARE)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(good + "\n{not json\n")
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        load_metadata(bad_json)
    no_tag = tmp_path / "no_tag.jsonl"
    no_tag.write_text(good + "\n" + good + "\n" + json.dumps({"include": [], "prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match="line 3: entry lacks tag"):
        load_metadata(no_tag)
    bad_position = tmp_path / "bad_position.jsonl"
    self_target = entry("position", [{"class": "a", "count": 1, "position": ["left of", 0]}])
    bad_position.write_text(json.dumps(self_target) + "\n")
    with pytest.raises(ConfigError, match="line 1: position"):
        load_metadata(bad_position)
    path = tmp_path / "ok.jsonl"
    path.write_text(good + "\n" + json.dumps(SQUARE_LEFT_OF_CIRCLE) + "\n")
    assert load_metadata(path) == [RED_SQUARE, SQUARE_LEFT_OF_CIRCLE]


def test_chance_levels_need_two_prompts_per_task():
    with pytest.raises(ConfigError, match="at least two prompts"):
        chance_levels([RED_SQUARE], lambda e, rng: np.zeros((4, 4, 3), np.uint8), lambda x: [[]] * len(x),
                      np.random.default_rng(0), images_per_prompt=1)


def _perfect_detections(meta: dict) -> list[Detection]:
    """Boxes 10 px wide; a clause with a position sits 100 px from its target in that direction."""
    step = {"left of": (-100, 0), "right of": (100, 0), "above": (0, -100), "below": (0, 100)}
    origins: list[tuple[float, float]] = []
    dets = []
    for i, clause in enumerate(meta["include"]):
        if "position" in clause:
            rel, target = clause["position"]
            origin = (origins[target][0] + step[rel][0], origins[target][1] + step[rel][1])
        else:
            origin = (300.0 * i, 300.0)
        origins.append(origin)
        box = (origin[0], origin[1], origin[0] + 10, origin[1] + 10)
        dets += [det(clause["class"], box, clause.get("color", "red"), 0.95) for _ in range(clause["count"])]
    return dets


@pytest.mark.skipif(not (SHARED / "evaluation_metadata.jsonl").exists(), reason="shared GenEval metadata absent")
def test_official_prompt_set_scores():
    entries = load_metadata(SHARED / "evaluation_metadata.jsonl")
    assert len(entries) == 553
    assert Counter(e["tag"] for e in entries) == {"single_object": 80, "two_object": 99, "counting": 80,
                                                  "colors": 94, "position": 100, "color_attr": 100}
    empty = score(entries, [[] for _ in entries], images_per_prompt=1)
    assert empty.overall == 0.0 and all(p.reasons[0].startswith("expected ") for p in empty.prompts)
    perfect = score(entries, [_perfect_detections(e) for e in entries], images_per_prompt=1)
    assert perfect.overall == 1.0, [p.reasons for p in perfect.prompts if not all(p.correct)][:3]
    assert set(perfect.tasks) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}


def _images_per_task(entries: list[dict], images_per_prompt: int) -> Counter:
    return Counter({tag: n * images_per_prompt for tag, n in Counter(e["tag"] for e in entries).items()})


@pytest.mark.parametrize("preset,per_task,per_prompt", [("geneval_shapes", 96, 4), ("quick", 24, 2)])
def test_testbed_presets_give_every_task_the_same_images(compose, preset, per_task, per_prompt):
    from diffq.job import geneval_entries
    from diffq.testbed.prompts import evaluation_metadata

    cfg = compose(f"eval={preset}")
    assert (cfg.eval.geneval.images_per_task, cfg.eval.images_per_prompt) == (per_task, per_prompt)
    entries = geneval_entries(cfg)
    assert _images_per_task(entries, per_prompt) == {t: per_task for t in TASKS}
    assert entries == geneval_entries(cfg)  # deterministic
    full = list(evaluation_metadata())
    slots = per_task // per_prompt
    for tag in TASKS:
        prompts = [e["prompt"] for e in full if e["tag"] == tag]
        picked = Counter(e["prompt"] for e in entries if e["tag"] == tag)
        if len(prompts) <= slots:  # small task: every prompt, repeated as evenly as possible
            assert set(picked) == set(prompts) and max(picked.values()) - min(picked.values()) <= 1
        else:  # large task: distinct prompts spread over the whole list
            assert max(picked.values()) == 1 and len(picked) == slots
            rank = sorted(prompts.index(p) for p in picked)
            assert rank[0] == 0 and rank[-1] >= len(prompts) - len(prompts) // slots - 1


def test_balancing_rejects_a_task_size_that_is_not_a_multiple():
    with pytest.raises(ConfigError, match="eval.geneval.images_per_task to a multiple of eval.images_per_prompt"):
        balanced_entries([RED_SQUARE], 10, 4)
    with pytest.raises(ConfigError, match="not a positive multiple"):
        balanced_entries([RED_SQUARE], 0, 4)


@pytest.mark.skipif(not (SHARED / "evaluation_metadata.jsonl").exists(), reason="shared GenEval metadata absent")
def test_official_metadata_keeps_its_protocol_unless_balanced(compose):
    from diffq.job import geneval_entries

    path = f"eval.geneval.metadata={SHARED / 'evaluation_metadata.jsonl'}"
    official = geneval_entries(compose("eval=geneval", path))
    assert official == load_metadata(SHARED / "evaluation_metadata.jsonl")  # 553 x 4, as published
    balanced = geneval_entries(compose("eval=geneval", path, "eval.geneval.images_per_task=400"))
    assert _images_per_task(balanced, 4) == {t: 400 for t in TASKS}
