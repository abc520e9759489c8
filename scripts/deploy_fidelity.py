"""Deployed vs fake-quant on the testbed: do the real low-bit layers compute what diffq simulated?

    python scripts/deploy_fidelity.py                 # testbed_unet and testbed_flux, float32 and bfloat16
    python scripts/deploy_fidelity.py --table         # the README table from assets/bench/deploy_fidelity.csv

For each (model, preset, dtype): quantize the testbed (calibrated as the CLI does, finetuning off),
sample the evaluation prompts with paired seeds, capture one denoiser call, deploy onto torchao and
diffq's ternary kernel (``diffq.deploy``), sample again with the same seeds. Reported: the SQNR of the
deployed denoiser's output against the fake-quant one on the captured call, the PSNR of deployed
images against fake-quant ones (mean and worst), and the same two numbers for bf16 fake-quant against
float32 fake-quant (the floor bf16 rounding alone sets), with the layer counts (kernel / simulated).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

import diffq
from diffq.config import register_configs
from diffq.eval.fidelity import psnr, sqnr
from diffq.models import denoiser_of, generate_images, load_pipeline, sampling_of

CSV = Path(__file__).resolve().parents[1] / "assets" / "bench" / "deploy_fidelity.csv"
RUNS = [("testbed_unet", "w8a8"), ("testbed_unet", "w4a16"), ("testbed_flux", "w8a8"), ("testbed_flux", "w4a16"),
        ("testbed_flux", "ternary_w158")]
PROMPTS = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle",
           "a photo of a yellow circle and a red square", "a photo of three purple triangles",
           "a photo of a blue circle", "a photo of an orange square", "a photo of two green circles"]


def _cfg(model: str):
    with initialize_config_module("diffq.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[f"model={model}"])


def _sample(pipe, cfg, smp) -> torch.Tensor:
    return generate_images(pipe, cfg.model.family, PROMPTS, list(range(len(PROMPTS))),
                           **smp.sampler_kwargs(batch_size=8), progress=False)


def _quantized(model: str, preset: str, dtype: torch.dtype):
    cfg = _cfg(model)
    smp = sampling_of(cfg)
    pipe = load_pipeline(cfg.model).to(dtype)
    diffq.quantize(pipe, preset, calib=PROMPTS, steps=smp.steps, guidance=smp.guidance,
                   resolution=smp.resolution, finetune__steps=0)
    return cfg, smp, pipe


def measure(model: str, preset: str, dtype: torch.dtype, exact: dict) -> dict:
    """One row: deployed vs fake-quant, and (bf16) bf16 fake-quant vs float32 fake-quant."""
    cfg, smp, pipe = _quantized(model, preset, dtype)
    _, den = denoiser_of(pipe)
    calls = []
    hook = den.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)) if not calls else None,
                                         with_kwargs=True)
    fake = _sample(pipe, cfg, smp)
    hook.remove()
    with torch.no_grad():
        out_fake = den(*calls[0][0], **calls[0][1])[0].float()
    start = time.perf_counter()
    report = diffq.deploy(pipe)
    with torch.no_grad():
        out_dep = den(*calls[0][0], **calls[0][1])[0].float()
    deployed = _sample(pipe, cfg, smp)
    p = psnr(fake, deployed)
    row = {"model": model, "preset": preset, "dtype": str(dtype).removeprefix("torch."),
           "kernel": report.count("kernel"), "dequantized": report.count("dequantized per call"),
           "simulated": report.count("simulated"),
           "sqnr_db": round(float(sqnr(out_fake, out_dep)), 1), "psnr_mean": round(float(p.mean()), 2),
           "psnr_min": round(float(p.min()), 2), "sample_s": round(time.perf_counter() - start, 1)}
    key = (model, preset)
    if dtype == torch.float32:
        exact[key] = fake
    else:
        q = psnr(exact[key], fake)
        row |= {"bf16_fq_psnr_mean": round(float(q.mean()), 2), "bf16_fq_psnr_min": round(float(q.min()), 2)}
    print(row, flush=True)
    return row


def table() -> str:
    """The README table from the CSV."""
    rows = list(csv.DictReader(CSV.open()))
    head = ("| model | preset | dtype | layers: kernel / dequantized per call / simulated | "
            "denoiser SQNR deployed vs fake-quant (dB) | image PSNR deployed vs fake-quant, mean [worst] (dB) | "
            "bf16 fake-quant vs float32 fake-quant (dB) |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        floor = f"{r['bf16_fq_psnr_mean']} [{r['bf16_fq_psnr_min']}]" if r.get("bf16_fq_psnr_mean") else "-"
        layers = f"{r['kernel']} / {r['dequantized']} / {r['simulated']}"
        images = f"{r['psnr_mean']} [{r['psnr_min']}]"
        lines.append(f"| {r['model']} | {r['preset']} | {r['dtype']} | {layers} | {r['sqnr_db']} | {images} "
                     f"| {floor} |")
    return "\n".join(lines)


def main() -> None:
    """Measure every run (or print the table)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    register_configs()
    torch.set_num_threads(2)
    exact: dict = {}
    rows = [measure(m, p, d, exact) for m, p in RUNS for d in (torch.float32, torch.bfloat16)]
    CSV.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with CSV.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(table())


if __name__ == "__main__":
    main()
