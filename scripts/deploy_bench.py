"""Speed and memory of ``diffq.deploy`` on full-size architectures with random weights, in bf16.

    python scripts/deploy_bench.py                                 # sd15 pixart flux sdxl, every variant
    python scripts/deploy_bench.py --device cuda                   # GPU resolutions, FLUX at full depth
    python scripts/deploy_bench.py --arch flux --variants bf16 deployed_ternary --flux-blocks 2 4 --resolution 256
    python scripts/deploy_bench.py --table [--device cuda]         # the README table from the CSV; runs nothing
    python scripts/bench.py --deploy --device cuda                 # the same, through bench.py

Denoisers: diffusers ``from_config`` on copies of the real configs (SD1.5, SDXL base, PixArt-Sigma 1024, FLUX.1-dev),
random weights (speed and memory do not depend on them), one random input with the real text lengths, batch 1.
Variants, each in a fresh process: ``bf16``, ``fakequant_<preset>`` (``diffq.quantize`` calibrated on that input),
``deployed_<preset>`` (then ``diffq.deploy``). Against bf16: ``resident_bytes``, the peak of a call (CUDA: allocated;
CPU: resident + the RSS rise over the call, polled every 5 ms; "raw": peak RSS / reserved), step time, and kernel /
dequantized / simulated layers. FLUX.1 (24 GB) runs ``--flux-blocks D S`` of its 19 + 38 blocks at full width; "x bf16
full depth" scales the per-block bytes to 19 + 38. Rows: ``assets/bench/deploy_<device>.csv``.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import multiprocessing as mp
import os
import platform
import queue
import statistics
import threading
import time
import traceback
from pathlib import Path

import torch

CSV_DIR = Path(__file__).resolve().parents[1] / "assets" / "bench"
VARIANTS = ("bf16", "fakequant_w8a8", "deployed_w8a8", "deployed_w4a16", "fakequant_ternary", "deployed_ternary")
PRESETS = {"w8a8": ("w8a8", {}), "w4a16": ("w4a16", {}), "ternary": ("ternary_w158", {"finetune__steps": 0})}
# CPU: small, because bf16 takes slow fallback paths on CPUs without bf16 instructions (see the README of the CSV)
RESOLUTION = {"cuda": {"sd15": 512, "sdxl": 1024, "pixart": 1024, "flux": 1024},
              "cpu": {"sd15": 64, "sdxl": 64, "pixart": 128, "flux": 128}}
FLUX_DEPTH = (19, 38)
# (device, architecture (None: each), variant, ratio to bf16, at most): CPU, deployed W8A8 resident memory; GPU, SDXL
# W8A8 step time, FLUX ternary resident memory at full depth and step time
TARGETS = [("cpu", None, "deployed_w8a8", "resident_x", 0.55), ("cuda", "sdxl", "deployed_w8a8", "step_x", 0.8),
           ("cuda", "flux", "deployed_ternary", "resident_full_x", 0.2),
           ("cuda", "flux", "deployed_ternary", "step_x", 1.0)]
_UNET = {"sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                      layers_per_block=2, sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3
                      + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
         "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, sample_size=128,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816, use_linear_projection=True)}
_PIXART = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
               cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2, caption_channels=4096,
               activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
               norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)
_FLUX = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FIELDS = ["device", "arch", "resolution", "depth", "variant", "resident_mb", "resident_x", "resident_full_mb",
          "resident_full_x", "call_peak_mb", "call_peak_x", "growth_mb", "raw_peak_mb", "step_s", "step_x", "first_s",
          "kernel", "dequantized", "simulated", "quantize_s", "deploy_s", "wall_s", "error", "machine"]


def build(arch: str, device: str, flux_blocks: tuple[int, int]) -> torch.nn.Module:
    """The random-weight denoiser of ``arch``, built on ``device`` directly in bf16."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    cls, cfg = ((UNet2DConditionModel, _UNET[arch]) if arch in _UNET else (PixArtTransformer2DModel, _PIXART)
                if arch == "pixart" else (FluxTransformer2DModel, {**_FLUX, "num_layers": flux_blocks[0],
                                                                    "num_single_layers": flux_blocks[1]}))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = cls.from_config(cfg)
    torch.set_default_dtype(torch.float32)
    return model.to(device, torch.bfloat16).eval().requires_grad_(False)


def inputs(arch: str, res: int, device: str) -> dict:
    """One call's keyword arguments, batch 1, with the real text lengths (77 CLIP tokens, 300 / 512 T5 tokens)."""
    g = torch.Generator().manual_seed(0)
    lat, t = res // 8, torch.tensor([500], device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    def const(*values: float) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=torch.bfloat16)

    if arch == "sd15":
        return dict(sample=rand(1, 4, lat, lat), timestep=t, encoder_hidden_states=rand(1, 77, 768))
    if arch == "sdxl":  # pooled text embeddings and (original size, crop, target size) as well
        return dict(sample=rand(1, 4, lat, lat), timestep=t, encoder_hidden_states=rand(1, 77, 2048),
                    added_cond_kwargs={"text_embeds": rand(1, 1280), "time_ids": const(res, res, 0, 0, res, res)[None]})
    if arch == "pixart":
        return dict(hidden_states=rand(1, 4, lat, lat), timestep=t, encoder_hidden_states=rand(1, 300, 4096),
                    encoder_attention_mask=const(*[1] * 300)[None],
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    side = lat // 2  # FLUX packs 2x2 patches of the 16-channel latent into 64-channel tokens
    img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(side * 1.0), torch.arange(side * 1.0))  # (0, row, col)
    return dict(hidden_states=rand(1, side * side, 64), encoder_hidden_states=rand(1, 512, 4096),
                pooled_projections=rand(1, 768), timestep=const(0.5), img_ids=img_ids.to(device, torch.bfloat16),
                txt_ids=torch.zeros(512, 3, device=device, dtype=torch.bfloat16), guidance=const(3.5))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _poll(peak: list[int], done: threading.Event) -> None:
    while not done.wait(0.005):  # every 5 ms until done
        peak[0] = max(peak[0], _rss())


@torch.no_grad()
def measure_calls(model: torch.nn.Module, kwargs: dict, device: str, warmup: int, repeats: int, resident: int) -> dict:
    """Step time (median of ``repeats`` calls after ``warmup``) and the peak memory of those calls in bytes (CUDA:
    allocated; CPU: ``resident`` + the RSS rise above the RSS just before them)."""
    cuda = device == "cuda"

    def call() -> float:
        t0 = time.perf_counter()
        model(**kwargs, return_dict=False)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = [call() for _ in range(warmup)]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system: the RSS baseline is what stays
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before, peak, done = torch.cuda.memory_allocated() if cuda else _rss(), [_rss()], threading.Event()
    poller = threading.Thread(target=_poll, args=(peak, done), daemon=True)
    poller.start()
    times = [call() for _ in range(repeats)]
    done.set()
    poller.join()
    top = torch.cuda.max_memory_allocated() if cuda else max(peak[0], _rss())
    growth = max(0, top - before)
    return {"step_s": statistics.median(times), "first_s": (first or times)[0], "growth": growth,
            "raw_peak": torch.cuda.max_memory_reserved() if cuda else top,
            "call_peak": top if cuda else resident + growth}


def _measure(arch: str, variant: str, opts: dict, out: mp.Queue) -> None:
    """One variant in a fresh process: build, quantize / deploy, measure; a row (or the traceback) to ``out``."""
    try:
        import diffq
        from diffq.deployment.memory import resident_bytes

        device = opts["device"]
        torch.manual_seed(0)
        model = build(arch, device, opts["flux_blocks"])
        kwargs = inputs(arch, opts["resolution"], device)
        row, t0 = {"quantize_s": 0.0, "deploy_s": 0.0}, time.perf_counter()
        if variant != "bf16":
            preset, extra = PRESETS[variant.split("_", 1)[1]]
            diffq.quantize(model, preset, calib=[kwargs], device=device, **extra)
            row["quantize_s"] = time.perf_counter() - t0
        if variant.startswith("deployed"):
            t0 = time.perf_counter()
            report = diffq.deploy(model)
            row["deploy_s"] = time.perf_counter() - t0
            row |= {k: report.count(c) for k, c in (("kernel", "kernel"), ("dequantized", "dequantized per call"),
                                                    ("simulated", "simulated"))}
        resident = full = resident_bytes(model)  # full: FLUX's blocks scaled to 19 + 38, the rest counted once
        for blocks, depth in zip((model.transformer_blocks, model.single_transformer_blocks), FLUX_DEPTH) \
                if arch == "flux" else ():
            full += resident_bytes(blocks) * (depth - len(blocks)) // max(1, len(blocks))
        row |= {"resident": resident, "resident_full": full}
        out.put(row | measure_calls(model, kwargs, device, opts["warmup"], opts["repeats"], resident))
    except BaseException:  # noqa: BLE001 - the parent reports it and goes on with the next variant
        out.put({"error": traceback.format_exc()})


def run_arch(arch: str, args: argparse.Namespace) -> list[dict]:
    """Every variant of ``arch``, each in a fresh process; rows with the ratios to its bf16 row."""
    res = args.resolution or RESOLUTION[args.device][arch]
    blocks = tuple(args.flux_blocks or (FLUX_DEPTH if args.device == "cuda" else (2, 4)))
    opts = {"device": args.device, "resolution": res, "flux_blocks": blocks, "warmup": args.warmup,
            "repeats": args.repeats}
    rows, ctx = [], mp.get_context("spawn")
    for variant in args.variants:
        t0, q = time.perf_counter(), ctx.Queue()
        p = ctx.Process(target=_measure, args=(arch, variant, opts, q))
        p.start()
        got = None
        while got is None:  # the row, or an error when the process died without one (out of memory...)
            try:
                got = q.get(timeout=5)
            except queue.Empty:
                got = None if p.is_alive() else {"error": f"the process died (exit code {p.exitcode})"}
        p.join()
        row = {"device": args.name, "arch": arch, "resolution": res, "variant": variant,
               "depth": f"{blocks[0]}+{blocks[1]} of 19+38 blocks" if arch == "flux" else "full",
               "wall_s": round(time.perf_counter() - t0, 1)}
        if "error" in got:
            print(f"{arch} {variant}: FAILED\n{got['error']}", flush=True)
            rows.append(row | {"error": got["error"].strip().splitlines()[-1]})
            continue
        mb = {f"{k}_mb": round(got[k] / 2**20, 1) for k in ("resident", "resident_full", "call_peak", "growth",
                                                             "raw_peak")}
        rows.append(row | mb | {k: round(got[k], 3) for k in ("step_s", "first_s", "quantize_s", "deploy_s")}
                    | {k: got.get(k, "") for k in ("kernel", "dequantized", "simulated")})
        print(f"{arch} {variant}: resident {mb['resident_mb']:.0f} MB, call peak {mb['call_peak_mb']:.0f} MB, step "
              f"{got['step_s']:.2f} s, quantize {got['quantize_s']:.0f} s ({row['wall_s']:.0f} s wall)", flush=True)
    base = next((r for r in rows if r["variant"] == "bf16" and "error" not in r), None)
    for r in [r for r in rows if base and "error" not in r]:
        r |= {f"{col.rsplit('_', 1)[0]}_x": round(r[col] / base[col], 3)
              for col in ("resident_mb", "resident_full_mb", "call_peak_mb", "step_s")}
    return rows


def write_csv(rows: list[dict], device: str, path: Path) -> None:
    """Merge ``rows`` into ``path`` (the architectures run replace their old rows), with the machine they ran on."""
    import diffusers
    import torchao

    where = (torch.cuda.get_device_name() if device == "cuda" else
             f"{platform.processor() or platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    info = (f"{where}; torch {torch.__version__}, torchao {torchao.__version__}, diffusers {diffusers.__version__}; "
            f"{time.strftime('%Y-%m-%d')}")
    old = [r for r in read_csv(path) if r["arch"] not in {x["arch"] for x in rows}]  # the architectures run again
    CSV_DIR.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(old + [r | {"machine": info} for r in rows], key=lambda r: (
            list(RESOLUTION["cpu"]).index(r["arch"]), VARIANTS.index(r["variant"]))))  # sd15 sdxl pixart flux


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines())) if path.exists() else []


def markdown_table(rows: list[dict]) -> str:
    """The README table: one line a (device, architecture, variant), the machines below."""
    head = ["device", "arch", "res", "depth", "variant", "resident MB", "x bf16", "x bf16 full depth", "call peak MB",
            "x bf16", "step s", "x bf16", "kernel / dequant / simulated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["device"], r["arch"], r["resolution"], r["depth"], f"`{r['variant']}`"]
        if r.get("error"):
            cells += [f"failed: {r['error']}"] + [""] * 7
        else:
            cells += ["" if r[k] == "" else format(float(r[k]), s) for k, s in (
                ("resident_mb", ".0f"), ("resident_x", ".2f"), ("resident_full_x", ".2f"), ("call_peak_mb", ".0f"),
                ("call_peak_x", ".2f"), ("step_s", ".2f"), ("step_x", ".2f"))]
            cells.append(f"{r['kernel']} / {r['dequantized']} / {r['simulated']}" if r["kernel"] != "" else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(" + "; ".join(sorted({f"{r['device']}: {r['machine']}" for r in rows})) + ")\n"


def targets(rows: list[dict]) -> list[str]:
    """PASS / FAIL lines of :data:`TARGETS` for the rows that have them."""
    lines = []
    for r in rows:
        for kind, arch, variant, col, t in TARGETS:
            if r["device"].startswith(kind) and arch in (None, r["arch"]) and r["variant"] == variant and r.get(col):
                lines.append(f"{'PASS' if float(r[col]) <= t else 'FAIL'}: {r['device']} {r['arch']} {variant} "
                             f"{col[:-2].replace('_', ' ')} {float(r[col]):.3f}x bf16 (target <= {t:.2f}x)")
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the variants of each architecture, write the CSV, print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", nargs="+", choices=("sd15", "sdxl", "pixart", "flux"),
                        default=["sd15", "pixart", "flux", "sdxl"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--resolution", type=int, help="pixels, for every architecture run (default: per architecture)")
    parser.add_argument("--flux-blocks", type=int, nargs=2, metavar=("D", "S"),
                        help="FLUX double and single blocks (default: 19 38 on cuda, 2 4 on cpu)")
    parser.add_argument("--repeats", type=int, help="timed calls (default: 10 cuda, 1 cpu)")
    parser.add_argument("--warmup", type=int, help="untimed calls before (default: 2 cuda, 1 cpu)")
    parser.add_argument("--table", action="store_true", help="print the table of assets/bench/deploy_<device>*.csv")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.repeats = args.repeats or (10 if cuda else 1)
    args.warmup = (2 if cuda else 1) if args.warmup is None else args.warmup
    if not args.table:  # the CSV's device name: cpu, or cuda-<GPU> (cuda-nvidia-h100-80gb-hbm3)
        args.name = "cuda-" + torch.cuda.get_device_name().lower().replace(" ", "-") if cuda else "cpu"
        rows = []
        for arch in args.arch:
            t0 = time.perf_counter()
            rows += run_arch(arch, args)
            print(f"{arch}: {time.perf_counter() - t0:.0f} s wall", flush=True)
        write_csv(rows, args.device, CSV_DIR / f"deploy_{args.name}.csv")
        print(f"wrote {CSV_DIR / f'deploy_{args.name}.csv'}\n")
    rows = [r for path in sorted(CSV_DIR.glob(f"deploy_{args.device}*.csv")) for r in read_csv(path)]  # every GPU's
    print(markdown_table(rows) + "\n".join(targets(rows)))


if __name__ == "__main__":
    main()
