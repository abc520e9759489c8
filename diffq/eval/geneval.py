"""GenEval scoring (Ghosh et al., 2023), independent of the detector backend.

The rules follow the official ``evaluation/evaluate_images.py`` (djghosh13/geneval, commit
16f16811) and ``evaluation/summary_scores.py``: detections above a score threshold (0.3, or 0.9
for the counting task), at most 16 per class by descending score (ties keep the backend's
order; no NMS, as the official default max_overlap=1.0 disables it); each include clause takes
the ``count`` most confident detections of its class, all of which must have the clause's
colour and, with a position, every one of them must stand in the relation to every object
matched by the referenced clause; an exclude clause fails when its class has ``count`` or more
detections. Task accuracy is the fraction of correct images; overall is the unweighted mean
of the task accuracies. ``balanced_entries`` gives every task the same number of images (a
project option, not the official protocol).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from diffq.errors import ConfigError

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
RELATIONS = ("left of", "right of", "above", "below")

Box = tuple[float, float, float, float]


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object: class name, box ``(x0, y0, x1, y1)`` in pixels (x right, y down,
    x1/y1 exclusive), boolean mask ``[H, W]``, colour name and confidence in [0, 1]. Compared by
    identity (the mask is an array)."""

    cls: str
    box: Box
    mask: np.ndarray
    color: str
    score: float = 1.0


class Detector(Protocol):
    """A detection backend: uint8 images ``[N, H, W, 3]`` to detections per image."""

    def __call__(self, images: np.ndarray) -> list[list[Detection]]: ...


def relative_position(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B: centre offset shrunk by ``threshold`` x (dim A + dim B) per
    axis, normalised by the raw offset; a component beyond 0.5 gives the relation (official
    ``relative_position``; y grows downward, so "above" is dy < -0.5)."""
    boxes = np.array([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=1)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=1))[:, 0]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in found.items() if holds}


def _by_class(detections: Sequence[Detection], threshold: float, max_objects: int) -> dict[str, list[Detection]]:
    """Detections per class above ``threshold``, most confident first (stable), at most ``max_objects``."""
    groups: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        if det.score > threshold and len(groups.setdefault(det.cls, [])) < max_objects:
            groups[det.cls].append(det)
    return {cls: dets for cls, dets in groups.items() if dets}


def score_image(
    metadata: dict,
    detections: Sequence[Detection],
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """(correct, reason) for one image's detections against one GenEval metadata entry."""
    objects = _by_class(detections, counting_threshold if metadata["tag"] == "counting" else threshold, max_objects)
    correct = True
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in metadata["include"]:
        cls, count = req["class"], req["count"]
        found = objects.get(cls, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif "color" in req:
            colors = [d.color for d in found]
            if colors.count(req["color"]) < count:
                matched = False
                hits = colors.count(req["color"])
                seen = ", ".join(f"{colors.count(c)} {c}" for c in dict.fromkeys(colors))
                reasons.append(f"expected {req['color']} {cls}>={count}, found {hits} {req['color']}; and {seen}")
        if matched and "position" in req:
            relation, target = req["position"]
            targets = groups[target]
            if targets is None:
                matched = False
                reasons.append(f"no target for {cls} to be {relation}")
            else:
                for a, b in itertools.product(found, targets):
                    rels = relative_position(a.box, b.box, position_threshold)
                    if relation not in rels:
                        matched = False
                        reasons.append(f"expected {cls} {relation} target, found {' and '.join(sorted(rels))} target")
                        break
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "\n".join(reasons)


@dataclass(frozen=True)
class PromptResult:
    """Per-image outcomes of one prompt."""

    prompt: str
    tag: str
    correct: tuple[bool, ...]
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class GenEvalResult:
    """Task accuracies (fraction of correct images), their mean, and per-prompt outcomes."""

    tasks: dict[str, float]
    overall: float
    correct_images: float
    correct_prompts: float
    images_per_prompt: int
    prompts: tuple[PromptResult, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with per-prompt results."""
        return {
            "overall": self.overall,
            "tasks": dict(self.tasks),
            "correct_images": self.correct_images,
            "correct_prompts": self.correct_prompts,
            "images_per_prompt": self.images_per_prompt,
            "prompts": [{"prompt": p.prompt, "tag": p.tag, "correct": list(p.correct), "reasons": list(p.reasons)}
                        for p in self.prompts],
        }


def check_entry(entry: Any, where: str) -> None:
    """Raise ConfigError unless ``entry`` follows the GenEval metadata schema."""
    fix = "each entry needs tag, include (clauses with class and count) and prompt"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(entry).__name__}; {fix}")
    missing = [k for k in ("tag", "include", "prompt") if k not in entry]
    if missing:
        raise ConfigError(f"{where}: entry lacks {', '.join(missing)}; {fix}")
    include = entry["include"]
    if not isinstance(include, list) or not include:
        raise ConfigError(f"{where}: include must be a non-empty list of clauses; {fix}")
    for i, clause in enumerate([*include, *entry.get("exclude", [])]):
        if not isinstance(clause, dict) or "class" not in clause or not isinstance(clause.get("count"), int):
            raise ConfigError(f"{where}: clause {clause!r} needs a class and an integer count; {fix}")
        if "position" in clause:
            position = clause["position"]
            valid = isinstance(position, list) and len(position) == 2 and position[0] in RELATIONS
            if not (valid and isinstance(position[1], int) and 0 <= position[1] < i < len(include)):
                raise ConfigError(f"{where}: position {clause['position']!r} must be [one of {list(RELATIONS)}, "
                                  f"index of an earlier include clause]")


def load_metadata(path: str | Path) -> list[dict]:
    """Read a GenEval ``evaluation_metadata.jsonl`` (one entry per line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"GenEval metadata file {path} does not exist; pass the path of evaluation_metadata.jsonl")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove that line") from None
        check_entry(entry, f"{path} line {number}")
        entries.append(entry)
    if not entries:
        raise ConfigError(f"GenEval metadata file {path} holds no entries; pass a non-empty evaluation_metadata.jsonl")
    return entries


def balanced_entries(entries: Sequence[dict], images_per_task: int, images_per_prompt: int) -> list[dict]:
    """Entries giving every task ``images_per_task`` images at ``images_per_prompt`` per entry.

    A task gets ``m = images_per_task / images_per_prompt`` entries, slot ``i`` holding its prompt
    ``floor(i * n / m)`` of ``n`` (in metadata order): a task with fewer prompts than slots repeats
    each of them (counts differing by at most one; each repeat is an entry of its own, so it gets
    its own seeds), a larger one keeps an evenly spaced, deterministic subset. Tasks keep the order
    in which they first appear."""
    slots, rest = divmod(images_per_task, images_per_prompt)
    if rest or slots < 1:
        raise ConfigError(f"{images_per_task} images per task is not a positive multiple of {images_per_prompt} "
                          "images per prompt: set eval.geneval.images_per_task to a multiple of "
                          "eval.images_per_prompt (or null for one entry per prompt)")
    by_task: dict[str, list[dict]] = {}
    for entry in entries:
        by_task.setdefault(entry["tag"], []).append(entry)
    return [members[i] for members in by_task.values() for i in np.arange(slots) * len(members) // slots]


def score(
    metadata_entries: Sequence[dict],
    detections_per_image: Sequence[Sequence[Detection]],
    images_per_prompt: int,
    **thresholds: float,
) -> GenEvalResult:
    """Score images laid out prompt-major (images of entry 0 first); ``thresholds`` go to score_image."""
    if images_per_prompt < 1 or len(detections_per_image) != len(metadata_entries) * images_per_prompt:
        raise ConfigError(f"got detections for {len(detections_per_image)} images but {len(metadata_entries)} "
                          f"prompts x {images_per_prompt} images per prompt; pass one detection list per image, "
                          "prompt-major")
    for i, entry in enumerate(metadata_entries):
        check_entry(entry, f"metadata entry {i}")
    prompts, per_task = [], {}
    for i, entry in enumerate(metadata_entries):
        outcomes = [score_image(entry, dets, **thresholds)
                    for dets in detections_per_image[i * images_per_prompt:(i + 1) * images_per_prompt]]
        correct = tuple(ok for ok, _ in outcomes)
        prompts.append(PromptResult(entry["prompt"], entry["tag"], correct, tuple(r for _, r in outcomes)))
        per_task.setdefault(entry["tag"], []).extend(correct)
    tasks = {tag: float(np.mean(v)) for tag, v in per_task.items()}
    return GenEvalResult(
        tasks=tasks,
        overall=float(np.mean(list(tasks.values()))) if tasks else 0.0,
        correct_images=float(np.mean([ok for p in prompts for ok in p.correct])) if prompts else 0.0,
        correct_prompts=float(np.mean([any(p.correct) for p in prompts])) if prompts else 0.0,
        images_per_prompt=images_per_prompt,
        prompts=tuple(prompts),
    )


def chance_levels(
    entries: Sequence[dict],
    render_fn: Callable[[dict, np.random.Generator], np.ndarray],
    detector: Detector,
    rng: np.random.Generator,
    images_per_prompt: int = 4,
) -> GenEvalResult:
    """The "random generator" baseline: each prompt scored on images rendered (``render_fn(entry,
    rng)`` -> uint8 [H, W, 3]) for other prompts of the same task, drawn at random per image.
    Tasks with a single prompt have no other prompt to draw from and are left out."""
    by_task: dict[str, list[int]] = {}
    for i, entry in enumerate(entries):
        by_task.setdefault(entry["tag"], []).append(i)
    kept, images = [], []
    for members in by_task.values():
        if len(members) < 2:
            continue
        for pos, i in enumerate(members):
            kept.append(entries[i])
            others = (pos + rng.integers(1, len(members), size=images_per_prompt)) % len(members)
            images += [render_fn(entries[members[j]], rng) for j in others]
    if not kept:
        raise ConfigError("chance levels need a task with at least two prompts; pass more metadata entries")
    return score(kept, detector(np.stack(images)), images_per_prompt)
