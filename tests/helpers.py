"""Shared test helpers: tiny pipelines with their calibration sets, quantized with a preset."""
from __future__ import annotations

import copy
from functools import lru_cache

import pytest
import torch

from diffq.calib.capture import capture_trajectories
from diffq.methods import rtn
from diffq.models import build_tiny_pipeline, sample_seeds
from diffq.roles import ROLES, quantizable_layers
from diffq.spec import resolve_spec

PROMPTS = {"dit": ["cat", "dog"]}
DEFAULT_PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]
W8 = {"format": "int", "bits": 8, "granularity": "channel"}
A8 = {"format": "int", "bits": 8, "granularity": "tensor", "symmetric": False}
KEEP_FP = [{"roles": ["conv_in", "conv_out", "time_embed"], "skip": True}]
STEPS = {"sd": 4, "sdxl": 4, "dit": 4, "pixart": 4, "sd3": 4, "flux": 4}


@lru_cache(maxsize=None)
def pipeline_and_calib(family: str):
    """A tiny pipeline of ``family`` and a small captured calibration set (cached per session)."""
    pipe = build_tiny_pipeline(family)
    prompts = PROMPTS.get(family, DEFAULT_PROMPTS)
    calib = capture_trajectories(
        pipe, family, prompts, sample_seeds(0, len(prompts)), steps=STEPS[family], guidance=4.0,
        resolution=32, keep_steps=2, batch_size=2,
        call_kwargs={"max_sequence_length": 16} if family in ("sd3", "flux", "pixart") else {},
    )
    return pipe, calib


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") and pipe.unet is not None else pipe.transformer


def quantized_copy(family: str, weight=W8, act=A8, rules=KEEP_FP, attn=None):
    """(FP denoiser, quantized deep copy, specs, calib)."""
    pipe, calib = pipeline_and_calib(family)
    fp = denoiser(pipe)
    model = copy.deepcopy(fp)
    specs = resolve_spec(quantizable_layers(model, family), weight, act, rules, ROLES)
    rtn.apply(model, specs, calib, {"attn": attn}, device=torch.device("cpu"), dtype=torch.float32)
    return fp, model, specs, calib


@torch.no_grad()
def outputs(model, calib):
    return [model(**s.to("cpu"), return_dict=False)[0] for s in calib]


def rel_error(ref, test) -> float:
    num = sum((a - b).pow(2).sum() for a, b in zip(ref, test))
    den = sum(a.pow(2).sum() for a in ref)
    return float((num / den).sqrt())


def interrupt_training(monkeypatch, engine, run, folder, before_step: int) -> None:
    """Run ``run(folder)`` with the engine's step ``before_step`` (0-based) raising KeyboardInterrupt,
    as a killed job would, then restore the engine's step."""
    real_step = engine.train_step

    def interrupted(*args):
        if args[-1] == before_step:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(engine, "train_step", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(folder)
    finally:
        monkeypatch.setattr(engine, "train_step", real_step)
