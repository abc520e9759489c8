"""The shipped testbed models: they still score above the bars, and their cards record the figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffq.testbed.assets import asset_path
from diffq.testbed.evaluate import chance, geneval_images, geneval_shapes
from diffq.testbed.prompts import TASKS, evaluation_metadata

PER_TASK = 6  # prompts per task (single_object has 2)
GENERATORS = {  # shipped generators: pipeline class, family, guidance, call kwargs
    "unet_pipeline": ("StableDiffusionPipeline", "sd", 3.0, {}),
    "flux_pipeline": ("FluxPipeline", "flux", 1.0,
                      {"max_sequence_length": 16, "true_cfg_scale": 4.0, "negative_prompt": ""}),
}


def _subset() -> list[dict]:
    by_task = {t: [e for e in evaluation_metadata() if e["tag"] == t] for t in TASKS}
    return [e for t in TASKS for e in by_task[t][:: max(1, len(by_task[t]) // PER_TASK)][:PER_TASK]]


def _pipeline(name: str):
    import diffusers

    cls = GENERATORS[name][0]
    pipe = getattr(diffusers, cls).from_pretrained(asset_path(name))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", list(GENERATORS))
def test_generator_scores_above_the_bars_on_a_fixed_subset(name):
    """FP GenEval-shapes on 6 prompts per task x 2 fixed seeds: the bar is 0.6 overall on the
    full set; the subset is small, so the bound leaves room for its sampling noise."""
    _, family, guidance, kwargs = GENERATORS[name]
    entries = _subset()
    images = geneval_images(_pipeline(name), family, entries, 2, seed=0, steps=20, guidance=guidance,
                            resolution=32, batch_size=64, call_kwargs=kwargs)
    result = geneval_shapes(images, entries, 2)
    print(name, round(result.overall, 3), {t: round(a, 3) for t, a in result.tasks.items()})
    assert result.overall >= 0.5
    floor = chance(entries)
    assert all(result.tasks[t] > floor[t] for t in TASKS), (result.tasks, floor)


def test_model_cards_record_the_bars():
    logs = {n: json.loads((Path(asset_path(n)) / "train_log.json").read_text()) for n in ("vae", "clip", *GENERATORS)}
    for name, log in logs.items():
        assert log["seconds"] > 0 and "min on" in (Path(asset_path(name)) / "README.md").read_text()
    for name in GENERATORS:
        assert logs[name]["geneval_overall"] >= 0.6
        assert all(logs[name]["geneval_tasks"][t] > logs[name]["chance_tasks"][t] for t in TASKS)
    assert logs["vae"]["heldout_psnr_db"] >= 28.0 and logs["clip"]["text_to_image_top1_100"] >= 0.9
