"""Benchmarks (targets live here, not in tests): quantized vs FP denoiser step time.

    python scripts/bench.py [model=tiny_sd15] [--repeats 20]

Prints, for the default model on this machine, the ratio of the quantized denoiser's step
time to the FP one (targets: <= 1.05 weight-only, <= 1.5 W8A8) and the calibration wall time.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from diffq import calib as calibration
from diffq.config import register_configs
from diffq.job import model_key, quantizable_layers, sampling_of
from diffq.methods import get_method
from diffq.models import denoiser_of, load_pipeline
from diffq.roles import ROLES
from diffq.spec import resolve_spec

TARGETS = {"w8a16": 1.05, "w4a16": 1.05, "w8a8": 1.5, "w8a8_fp8": 1.5, "w4a16_nvfp4": 1.05}


@torch.no_grad()
def step_time(model: torch.nn.Module, kwargs: dict, repeats: int) -> float:
    """Median seconds of one denoiser call."""
    for _ in range(3):
        model(**kwargs, return_dict=False)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**kwargs, return_dict=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Run the benchmark and print a table of ratios."""
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    register_configs()
    with initialize_config_module("diffq.conf", version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    pipe = load_pipeline(cfg.model, device="cpu")
    _, fp = denoiser_of(pipe)
    smp = sampling_of(cfg)
    prompts = calibration.calibration_prompts(list(cfg.model.prompts) or list(cfg.calib.prompts), None, cfg.calib.num_prompts)
    t0 = time.perf_counter()
    samples, _ = calibration.load_or_capture(
        pipe, cfg.model.family, model_key=model_key(cfg), prompts=prompts, seed=cfg.calib.seed, steps=smp.steps,
        guidance=smp.guidance, resolution=smp.resolution, keep_steps=cfg.calib.num_steps,
        batch_size=cfg.calib.batch_size, call_kwargs=smp.call_kwargs, cache_dir=None,
    )
    capture_s = time.perf_counter() - t0
    kwargs = samples[len(samples) // 2].to("cpu")
    base = step_time(fp, kwargs, args.repeats)
    print(f"model {cfg.model.name}: FP denoiser step {base * 1e3:.2f} ms, calibration capture {capture_s:.2f} s")
    print(f"{'config':<14}{'step ms':>9}{'ratio':>8}{'target':>8}{'calib s':>9}")
    for name, target in TARGETS.items():
        with initialize_config_module("diffq.conf", version_base="1.3"):
            qc = compose("config", overrides=[*args.overrides, f"quant={'w8a8' if name == 'w8a16' else name}",
                                              *(["quant.act.format=none"] if name == "w8a16" else [])]).quant
        model = copy.deepcopy(fp)
        specs = resolve_spec(quantizable_layers(model, cfg.model.family), qc.weight, qc.act,
                             OmegaConf.to_container(qc.rules), ROLES)
        t0 = time.perf_counter()
        get_method(qc.method)(model, specs, samples, OmegaConf.to_container(qc), device=torch.device("cpu"), dtype=torch.float32)
        calib_s = time.perf_counter() - t0
        # paired, interleaved rounds so machine noise hits FP and quantized alike
        ratios = []
        for _ in range(5):
            fp_t, q_t = step_time(fp, kwargs, args.repeats), step_time(model, kwargs, args.repeats)
            ratios.append(q_t / fp_t)
        ratio = statistics.median(ratios)
        print(f"{name:<14}{q_t * 1e3:>9.2f}{ratio:>8.3f}{target:>8.2f}{calib_s:>9.2f}")


if __name__ == "__main__":
    main()
