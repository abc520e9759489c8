"""Inference memory of a ternary (or any sub-byte) export: FP denoiser vs the export unpacked vs the
packed backend (``load_denoiser(..., packed=True)``).

    python scripts/packed_memory.py outputs/runs/<run>/model [model=testbed_flux]

Each variant runs in a fresh process: it builds the denoiser, runs one call on a calibration-shaped
input and reports the denoiser's resident tensors (parameters + buffers: what inference keeps
allocated) and how far the process's peak RSS rises during that call above its resident set just
before it (activations, and for the packed backend the one layer's weight it unpacks at a time; 0
when loading had peaked higher); Linux only (/proc).
"""
from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import resource

import torch


def _measure(variant: str, export: str, overrides: list[str], out: mp.Queue) -> None:
    from hydra import compose, initialize_config_module

    from diffq import calib as calibration
    from diffq.config import register_configs
    from diffq.eval.cost import resident_mb
    from diffq.export import load_denoiser
    from diffq.models import denoiser_of, load_pipeline, sampling_of

    register_configs()
    with initialize_config_module("diffq.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    pipe = load_pipeline(cfg.model)
    smp = sampling_of(cfg)
    samples, _ = calibration.load_or_capture(
        pipe, cfg.model.family, model_key={"memory": cfg.model.name}, prompts=list(cfg.calib.prompts)[:1], seed=0,
        steps=smp.steps, guidance=smp.guidance, resolution=smp.resolution, keep_steps=1, batch_size=1,
        call_kwargs=smp.call_kwargs, cache_dir=None)
    _, denoiser = denoiser_of(pipe)
    for name, module in list(pipe.components.items()):  # only the denoiser stays resident
        if isinstance(module, torch.nn.Module) and module is not denoiser:
            setattr(pipe, name, None)
    if variant != "fp":
        denoiser = load_denoiser(export, denoiser, packed=variant == "packed")
    gc.collect()
    with open("/proc/self/statm") as f:  # current resident set, before the call
        base = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    with torch.no_grad():
        denoiser(**samples[0].to("cpu"), return_dict=False)
    peak = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    out.put((variant, resident_mb(denoiser), peak))


def main() -> None:
    """Print the resident and peak memory of the three variants."""
    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    rows = []
    for variant in ("fp", "unpacked", "packed"):
        q = ctx.Queue()
        p = ctx.Process(target=_measure, args=(variant, args.export, args.overrides, q))
        p.start()
        rows.append(q.get())
        p.join()
    fp = rows[0][1]
    print(f"{'denoiser':<10}{'resident MB':>13}{'vs FP':>8}{'call peak growth MB':>21}{'resident + call':>17}")
    for variant, resident, peak in rows:
        print(f"{variant:<10}{resident:>13.2f}{fp / resident:>8.2f}{peak:>21.1f}{resident + peak:>17.1f}")


if __name__ == "__main__":
    main()
