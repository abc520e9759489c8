"""A job's evaluation set: which prompts and seeds it generates (:class:`EvalSet`: GenEval entries of
the world or a metadata file, tasks balanced, else the model's or the config's prompts), and a side's
images on disk (:class:`Samples`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from diffq.eval.geneval import balanced_entries, load_metadata
from diffq.eval.samples import SampleFolder
from diffq.eval.suite import check_geneval_classes
from diffq.models import sample_seeds
from diffq.worlds import get_world, is_world


@dataclass
class EvalSet:
    """The evaluation images to generate: metadata entries (a prompt repeated to balance GenEval
    tasks is an entry per repeat), ``images_per_prompt`` each, and the flat (entry-major) prompt
    and seed lists."""

    entries: list[dict[str, Any]]
    geneval: list[dict[str, Any]] | None
    images_per_prompt: int
    prompts: list[str]
    seeds: list[int]


@dataclass
class Samples:
    """One side's evaluation images on disk and how many of them this run generated."""

    folder: SampleFolder
    generated: int


def geneval_entries(cfg: DictConfig) -> list[dict[str, Any]] | None:
    """The GenEval metadata entries the evaluation uses, if any: every ``stride``-th entry, then
    with ``images_per_task`` the same number of images for every task."""
    g = cfg.eval.geneval
    if not g.metadata:
        return None
    entries = get_world(g.metadata).evaluation_metadata() if is_world(g.metadata) else load_metadata(g.metadata)
    entries = entries[:: max(1, g.stride)]
    if g.images_per_task is None:
        return entries
    return balanced_entries(entries, g.images_per_task, cfg.eval.images_per_prompt)


def sample_entries(cfg: DictConfig, entries: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """One metadata entry per evaluation prompt: the GenEval entries, else ``{"prompt": p}`` for the
    model's own prompts (e.g. class labels), else for ``eval.prompts``."""
    if entries:
        return entries
    return [{"prompt": p} for p in (list(cfg.model.prompts) or list(cfg.eval.prompts))]


def eval_set(cfg: DictConfig) -> EvalSet:
    """The evaluation prompts and seeds (ConfigError when the GenEval detector lacks a class)."""
    geneval = geneval_entries(cfg)
    check_geneval_classes(cfg.eval, geneval)
    entries = sample_entries(cfg, geneval)
    k = cfg.eval.images_per_prompt
    prompts = [e["prompt"] for e in entries for _ in range(k)]
    return EvalSet(entries, geneval, k, prompts, sample_seeds(cfg.eval.seed, len(prompts)))
