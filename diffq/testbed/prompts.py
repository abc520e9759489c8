"""GenEval-format prompts for the shapes world: the fixed evaluation set and training captions.

The evaluation set (>= 200 prompts, the six GenEval tasks, the official metadata schema) is
fixed; training captions come from the same grammar but never equal an evaluation prompt, so
evaluation measures compositional generalisation, not memorised captions.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from diffq.testbed.world import COLORS, RELATIONS, SHAPES, Scene, describe, place_objects

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
EVAL_SEED = 2024
_TRAIN_TASK_WEIGHTS = {"single": 0.2, "counting": 0.2, "pair": 0.3, "position": 0.3}
_DROP_COLOR = 0.3


def _meta(tag: str, include: list[dict[str, Any]], prompt: str, exclude: list[dict[str, Any]] | None = None) -> dict:
    entry: dict[str, Any] = {"tag": tag, "include": include}
    if exclude:
        entry["exclude"] = exclude
    entry["prompt"] = prompt
    return entry


def _clause(shape: str, color: str | None = None, count: int = 1, position: list | None = None) -> dict:
    c: dict[str, Any] = {"class": shape, "count": count}
    if color:
        c["color"] = color
    if position:
        c["position"] = position
    return c


def _half(items: list, rng: np.random.Generator, k: int) -> list:
    return [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False))]


@lru_cache(maxsize=1)
def evaluation_metadata() -> tuple[dict, ...]:
    """The fixed evaluation set (GenEval schema), deterministic.

    Every colourless form is split in two: one half is held out for evaluation, the other half
    stays in the training captions, so the models learn that an unnamed colour means "any
    colour" and evaluation still never shows them a caption they were trained on.
    """
    rng = np.random.default_rng(EVAL_SEED)
    colors = list(COLORS)
    pairs = [(a, b) for a, b in itertools.permutations(SHAPES, 2)]
    out = [_meta("single_object", [_clause(s)], f"a photo of {describe(s, None)}") for s in SHAPES[:2]]
    out += [_meta("two_object", [_clause(a), _clause(b)], f"a photo of {describe(a, None)} and {describe(b, None)}")
            for a, b in pairs if SHAPES.index(a) < SHAPES.index(b)]
    counts = _half([(s, n) for s in SHAPES for n in (2, 3, 4)], rng, 5)
    out += [_meta("counting", [_clause(s, count=n)], f"a photo of {describe(s, None, n)}", [_clause(s, count=n + 1)])
            for s, n in counts]
    color_objs = _half([(c, s) for s in SHAPES for c in colors], rng, 9)
    out += [_meta("colors", [_clause(s, c)], f"a photo of {describe(s, c)}") for c, s in color_objs]
    # one phrasing of each colourless layout ("b left of a"), the mirrored one ("a right of b") trains
    plain_pos = [(a, b, r) for a, b in pairs if SHAPES.index(a) < SHAPES.index(b) for r in RELATIONS]
    out += [_meta("position", [_clause(a), _clause(b, position=[r, 0])],
                  f"a photo of {describe(b, None)} {r} {describe(a, None)}")
            for a, b, r in plain_pos]
    colored_pos = _half([(a, ca, b, cb, r) for a, b in pairs for ca, cb in itertools.permutations(colors, 2)
                         for r in RELATIONS], rng, 80)
    out += [_meta("position", [_clause(a, ca), _clause(b, cb, position=[r, 0])],
                  f"a photo of {describe(b, cb)} {r} {describe(a, ca)}") for a, ca, b, cb, r in colored_pos]
    attr = _half([(a, ca, b, cb) for a, b in pairs for ca, cb in itertools.permutations(colors, 2)], rng, 90)
    out += [_meta("color_attr", [_clause(a, ca), _clause(b, cb)], f"a photo of {describe(a, ca)} and {describe(b, cb)}")
            for a, ca, b, cb in attr]
    return tuple(out)


@lru_cache(maxsize=1)
def evaluation_prompts() -> frozenset[str]:
    """The evaluation prompt strings (excluded from training captions)."""
    return frozenset(m["prompt"] for m in evaluation_metadata())


@dataclass(frozen=True)
class Example:
    """A training image's scene and caption."""

    scene: Scene
    caption: str


def _maybe(color: str, rng: np.random.Generator) -> str | None:
    return None if rng.random() < _DROP_COLOR else color


def _draw(rng: np.random.Generator) -> Example:
    kind = rng.choice(list(_TRAIN_TASK_WEIGHTS), p=list(_TRAIN_TASK_WEIGHTS.values()))
    colors = list(COLORS)
    if kind == "single":
        s, c = rng.choice(SHAPES), rng.choice(colors)
        return Example(place_objects(rng, [(s, c)]), f"a photo of {describe(s, _maybe(c, rng))}")
    if kind == "counting":
        s, n = rng.choice(SHAPES), int(rng.integers(2, 5))
        same = rng.random() < 0.5
        cs = [rng.choice(colors)] * n if same else list(rng.choice(colors, size=n))
        caption_color = _maybe(cs[0], rng) if same else None
        return Example(place_objects(rng, list(zip([s] * n, cs))), f"a photo of {describe(s, caption_color, n)}")
    a, b = rng.choice(SHAPES, size=2, replace=False)
    ca, cb = rng.choice(colors), rng.choice(colors)
    if kind == "pair":
        return Example(place_objects(rng, [(a, ca), (b, cb)]),
                       f"a photo of {describe(a, _maybe(ca, rng))} and {describe(b, _maybe(cb, rng))}")
    r = rng.choice(RELATIONS)
    scene = place_objects(rng, [(a, ca), (b, cb)], relation=r)
    return Example(scene, f"a photo of {describe(b, _maybe(cb, rng))} {r} {describe(a, _maybe(ca, rng))}")


def training_example(rng: np.random.Generator) -> Example:
    """One random (scene, caption) whose caption is not an evaluation prompt."""
    held_out = evaluation_prompts()
    while True:
        ex = _draw(rng)
        if ex.caption not in held_out:
            return ex


def vocabulary() -> list[str]:
    """Every word the world's captions use."""
    words = {"a", "photo", "of", "and", "two", "three", "four", *COLORS, *SHAPES,
             *(s + "s" for s in SHAPES), *" ".join(RELATIONS).split()}
    return sorted(words)
