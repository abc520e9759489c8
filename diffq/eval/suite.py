"""The evaluation suite: every enabled metric for the FP and the quantized images, with its settings.

One entry per metric in ``metrics.json["metrics"]``: ``fp`` and/or ``quant`` values, the
``settings`` that produced them (sample counts, backend, resize mode, model, seeds) and the
wall ``seconds`` it took. Metrics:

- ``psnr``, ``ssim``, ``lpips``: fidelity of each quantized image to the FP image of the same
  seed (``quant`` only);
- ``fid``: FID and KID of FP and of quantized images against real images (``eval.fid.reference``:
  a registered world's name renders that world, or a folder; :mod:`diffq.worlds`);
- ``fid_fp``: FID and KID of the quantized images against the FP images;
- ``clip_score``: CLIP score of FP and quantized images against their prompts;
- ``geneval``: GenEval of FP and quantized images, overall and per task with standard errors,
  and the quantized-minus-FP difference with its paired bootstrap interval (``delta``;
  ``eval.geneval``: a world's own detector on its prompts, Mask2Former + CLIP on real
  prompts; :mod:`diffq.eval.geneval_stats`).

The Inception features of the FP and quantized images are computed once per job, so the first
FID metric's ``seconds`` include them; given ``fp_key`` (what determines the FP images), the FP
features are cached under ``<cache_dir>/fp_features/`` and every later job of a sweep reuses them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from diffq.cache import cache_key, cache_path, load_tensors, save_tensors
from diffq.errors import ConfigError
from diffq.eval.fidelity import fidelity_metrics
from diffq.registry import Registry
from diffq.worlds import get_world, is_world, world_names


@dataclass
class MetricInputs:
    """What a metric may use: the ``eval`` settings, the FP and quantized images in [0, 1]
    ``[N, 3, H, W]`` (same seeds), their prompts and GenEval entries, the cache folder, the device and
    the Inception features every FID metric of the job shares (``inception["fp"]``, ``["quant"]``)."""

    ev: DictConfig
    fp: torch.Tensor
    quant: torch.Tensor
    prompts: list[str]
    entries: list[dict[str, Any]] | None
    cache_dir: str
    device: str | torch.device
    inception: Any


# eval.metrics names: a function (MetricInputs) -> {"fp" and/or "quant": value, "settings": {...}}
METRICS: Registry[Callable[[MetricInputs], dict[str, Any]]] = Registry("eval metric")
GENEVAL_BACKENDS = ("auto", "mask2former")  # and every registered world's name (its own detector)


def check_eval(ev: DictConfig) -> None:
    """ConfigError, before anything is generated, for metrics that cannot run as configured."""
    from diffq.eval.fid import BACKENDS
    from diffq.eval.inception import RESIZE_MODES
    from diffq.eval.lpips import check_net

    names = list(ev.metrics)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"unknown eval metric(s) {unknown}: choose from {', '.join(METRICS.names())}")
    if "fid" in names and not ev.fid.reference:
        raise ConfigError("eval metric fid needs real images: set eval.fid.reference to a folder of images "
                          f"(or a world's name: {', '.join(world_names())}), or use fid_fp for FID against the "
                          "FP model")
    if {"fid", "fid_fp"} & set(names) and ev.fid.backend not in BACKENDS:
        raise ConfigError(f"unknown eval.fid.backend {ev.fid.backend!r}: use one of {', '.join(BACKENDS)}")
    if {"fid", "fid_fp"} & set(names) and ev.fid.resize not in RESIZE_MODES:
        raise ConfigError(f"unknown eval.fid.resize {ev.fid.resize!r}: use one of {', '.join(RESIZE_MODES)}")
    if "lpips" in names:
        check_net(ev.lpips_net)
    if "clip_score" in names and not ev.clip_model:
        raise ConfigError("eval metric clip_score needs a CLIP model: set eval.clip_model to a hub id "
                          "(openai/clip-vit-large-patch14) or a local folder")
    if "geneval" in names and not ev.geneval.metadata:
        raise ConfigError("eval metric geneval needs prompts: set eval.geneval.metadata to an "
                          f"evaluation_metadata.jsonl (or a world's name: {', '.join(world_names())}), "
                          "e.g. eval=geneval eval.geneval.metadata=/path/to/it")
    if ev.geneval.backend not in GENEVAL_BACKENDS and not is_world(ev.geneval.backend):
        raise ConfigError(f"unknown eval.geneval.backend {ev.geneval.backend!r}: "
                          f"use one of {', '.join([*GENEVAL_BACKENDS, *world_names()])}")
    size = ev.geneval.detector_size
    if size is not None and not (len(size) == 2 and 0 < size[0] <= size[1]):
        raise ConfigError(f"eval.geneval.detector_size={list(size)} must be [shortest_edge, longest_edge] with "
                          "0 < shortest <= longest, e.g. [800, 1333] as the official evaluator, or null for the "
                          "detector's own processor size")
    backend = geneval_backend(ev)
    if ev.geneval.metadata and is_world(backend) and ev.geneval.metadata != backend:
        raise ConfigError(f"the {backend} detector scores only the {backend} world's prompts: "
                          f"use eval.geneval.metadata={backend} or eval.geneval.backend=mask2former")


def geneval_backend(ev: DictConfig) -> str:
    """The GenEval backend in use: ``auto`` is the world's own detector when the metadata names a
    registered world, else Mask2Former; a world's name is that world's detector."""
    if ev.geneval.backend != "auto":
        return ev.geneval.backend
    return ev.geneval.metadata if is_world(ev.geneval.metadata) else "mask2former"


def check_geneval_classes(ev: DictConfig, entries: list[dict[str, Any]] | None) -> None:
    """ConfigError, before generation, when the Mask2Former detector lacks a class the metadata names."""
    if not entries or geneval_backend(ev) != "mask2former":
        return
    from diffq.eval.geneval_detector import check_classes, detector_classes

    check_classes(entries, detector_classes(ev.geneval.detector))


def evaluate(ev: DictConfig, fp: torch.Tensor, quant: torch.Tensor, prompts: list[str],
             entries: list[dict[str, Any]] | None, cache_dir: str,
             device: str | torch.device = "cpu", fp_key: str | None = None) -> dict[str, Any]:
    """Every metric named in ``ev.metrics`` (plus GenEval when the prompts come from GenEval
    metadata), for FP and quantized images in [0, 1] ``[N, 3, H, W]``; ``fp_key`` names the FP
    images (their sample folder's key) so that their Inception features are cached."""
    names = list(ev.metrics)
    if ev.geneval.metadata and "geneval" not in names:
        names.append("geneval")
    inception = _InceptionSides(ev, fp, quant, cache_dir if fp_key else None, fp_key)
    inputs = MetricInputs(ev, fp, quant, prompts, entries, cache_dir, device, inception)
    block = {}
    for name in names:
        t0 = time.perf_counter()
        block[name] = METRICS.get(name)(inputs)
        block[name]["settings"]["seed"] = ev.seed  # sample i's noise seed derives from (seed, i)
        block[name]["seconds"] = round(time.perf_counter() - t0, 3)
    return block


def _fidelity(fp: torch.Tensor, quant: torch.Tensor, name: str) -> dict[str, Any]:
    values = fidelity_metrics(fp, quant, [name])[name]
    return {"quant": values["mean"], "per_image": values["per_image"],
            "settings": {"pairs": len(fp), "reference": "fp images, same seeds"}}


@METRICS.register("psnr")
def _psnr(x: MetricInputs) -> dict[str, Any]:
    return _fidelity(x.fp, x.quant, "psnr")


@METRICS.register("ssim")
def _ssim(x: MetricInputs) -> dict[str, Any]:
    return _fidelity(x.fp, x.quant, "ssim")


def split_per_image(block: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Move the per-image fidelity values out of the metrics block: ``{name: {mean, per_image}}``."""
    return {name: {"mean": entry["quant"], "per_image": entry.pop("per_image")}
            for name, entry in block.items() if "per_image" in entry}


@METRICS.register("lpips")
def _lpips(x: MetricInputs) -> dict[str, Any]:
    from diffq.eval.lpips import load_lpips, lpips_pairs

    ev, fp, quant = x.ev, x.fp, x.quant
    metric, reason = load_lpips(ev.lpips_net)
    settings = {"net": ev.lpips_net, "pairs": len(fp)}
    if metric is None:
        return {"skipped": reason, "settings": settings}
    return {"quant": lpips_pairs(fp, quant, metric)["mean"], "settings": settings}


class _InceptionSides:
    """The Inception network and the FP / quantized images' features, each computed once for
    every FID metric of the job; the FP side's are cached across jobs when ``fp_key`` is given."""

    def __init__(self, ev: DictConfig, fp: torch.Tensor, quant: torch.Tensor, cache_dir: str | None = None,
                 fp_key: str | None = None):
        self.ev, self.images, self.features = ev, {"fp": fp, "quant": quant}, {}
        self.cache_dir, self.fp_key = cache_dir, fp_key
        self.fp_cache_hit = False
        self._extractor = None

    @property
    def extractor(self):
        from diffq.eval.inception import InceptionFeatures

        if self._extractor is None:
            self._extractor = InceptionFeatures(self.ev.fid.resize, self.ev.fid.weights)
        return self._extractor

    def _fp_cache(self) -> Path | None:
        if self.cache_dir is None or self.fp_key is None:
            return None
        key = cache_key({"fp_images": self.fp_key, "n": len(self.images["fp"]), "resize": self.extractor.resize,
                         "weights": self.extractor.source})
        return cache_path(self.cache_dir, "fp_features", key)

    def __getitem__(self, side: str) -> torch.Tensor:
        from diffq.eval.fid import extract_features

        if side in self.features:
            return self.features[side]
        path = self._fp_cache() if side == "fp" else None
        if path is not None and (hit := load_tensors(path)) is not None:
            self.features[side], self.fp_cache_hit = hit[0]["features"], True
            return self.features[side]
        self.features[side] = extract_features(self.images[side], self.extractor, desc=f"inception features ({side})")
        if path is not None:
            save_tensors(path, {"features": self.features[side]}, {"fp_images": self.fp_key})
        return self.features[side]


@METRICS.register("fid")
def _fid_vs_reference(x: MetricInputs) -> dict[str, Any]:
    from diffq.eval.fid import fid_kid, reference_features

    ev, inception, cache_dir = x.ev, x.inception, x.cache_dir
    extractor = inception.extractor
    real, hit = reference_features(ev.fid.reference, ev.fid.num_reference, extractor, cache_dir)
    out: dict[str, Any] = {}
    for side in ("fp", "quant"):
        r = fid_kid(real, inception[side], extractor, ev.fid.backend, ev.fid.kid_subset_size)
        out[side] = {"fid": r.fid, "kid": r.kid_mean, "kid_std": r.kid_std}
    out["settings"] = {"reference": ev.fid.reference, "n_reference": len(real), "n_generated": len(inception["fp"]),
                       "backend": ev.fid.backend, "resize": ev.fid.resize, "weights": extractor.source,
                       "reference_cache_hit": hit, "fp_features_cache_hit": inception.fp_cache_hit}
    return out


@METRICS.register("fid_fp")
def _fid_to_fp(x: MetricInputs) -> dict[str, Any]:
    from diffq.eval.fid import fid_kid

    ev, inception = x.ev, x.inception
    r = fid_kid(inception["fp"], inception["quant"], inception.extractor, ev.fid.backend, ev.fid.kid_subset_size)
    return {"quant": {"fid": r.fid, "kid": r.kid_mean, "kid_std": r.kid_std},
            "settings": {"reference": "fp images, same seeds", "n": r.n_real, "backend": ev.fid.backend,
                         "resize": ev.fid.resize, "weights": inception.extractor.source,
                         "fp_features_cache_hit": inception.fp_cache_hit}}


@METRICS.register("clip_score")
def _clip(x: MetricInputs) -> dict[str, Any]:
    from diffq.eval.clip_score import clip_score, load_clip

    ev, fp, quant, prompts = x.ev, x.fp, x.quant, x.prompts
    model = load_clip(ev.clip_model)
    out = {side: clip_score(images, prompts, model)["mean"] for side, images in (("fp", fp), ("quant", quant))}
    return {**out, "settings": {"model": str(ev.clip_model), "n": len(fp)}}


@METRICS.register("geneval")
def _geneval(x: MetricInputs) -> dict[str, Any]:
    from diffq.eval.fid import to_uint8_hwc
    from diffq.eval.geneval import score
    from diffq.eval.geneval_stats import paired_difference, standard_errors, task_outcomes

    ev, fp, quant, entries, device = x.ev, x.fp, x.quant, x.entries, x.device
    g, k = ev.geneval, ev.images_per_prompt
    backend = geneval_backend(ev)
    if is_world(backend):
        detector, settings = get_world(backend).detector(), {"detector": backend}
    else:
        from diffq.eval.geneval_detector import Mask2FormerClipDetector

        size = list(g.detector_size) if g.detector_size else None
        detector = Mask2FormerClipDetector(g.detector, g.clip_model, device=device, batch_size=g.batch_size,
                                           min_score=min(g.threshold, g.counting_threshold), max_objects=g.max_objects,
                                           colors=list(g.colors), templates=list(g.templates), bgcolor=g.bgcolor,
                                           size=size)
        settings = dict(detector.settings)
    thresholds = {"threshold": g.threshold, "counting_threshold": g.counting_threshold,
                  "max_objects": g.max_objects, "position_threshold": g.position_threshold}
    out: dict[str, Any] = {}
    outcomes: dict[str, Any] = {}
    for side, images in (("fp", fp), ("quant", quant)):
        r = score(entries, detector(to_uint8_hwc(images)), k, **thresholds)
        outcomes[side] = task_outcomes(r)
        out[side] = {"overall": r.overall, "tasks": r.tasks, **standard_errors(outcomes[side])}
    diff = paired_difference(outcomes["fp"], outcomes["quant"])
    out["delta"] = {key: diff[key] for key in ("delta", "low", "high")}
    out["settings"] = {"backend": backend, "prompts": len({e["prompt"] for e in entries}), "entries": len(entries),
                       "images_per_prompt": k, "images_per_task": g.images_per_task,
                       "task_images": {tag: c.size for tag, c in outcomes["fp"].items()},
                       "bootstrap": {key: diff[key] for key in ("confidence", "resamples", "seed")},
                       **settings, **thresholds}
    return out
