"""Benchmarks (targets live here, not in tests): fake-quant throughput and quantized vs FP step time.

    python scripts/bench.py [model=tiny_sd15] [--repeats 20] [--elements 4194304]
    python scripts/bench.py --deploy [--device cuda] [...]   # scripts/deploy_bench.py (every other flag goes to it)

Prints, on this machine: the throughput (elements/s) of the FP fake-quant fast paths (FP8 cast,
FP4 E2M1 ladder) against the generic ExMy formula; for the default model, the ratio of the
quantized denoiser's step time to the FP one for every preset (targets: <= 1.05 weight-only, W8A8
<= 1.2, FP W4A8 <= 1.3), its quantization wall time, effective weight / activation bits,
checkpoint size ratio vs FP and resident memory, written to assets/bench/presets.csv (the machine
in machine.txt); with CUDA, a real FP8 matmul (``torch._scaled_mm``) against bf16 for the
testbed's and FLUX-sized shapes; ternary packing throughput (2-bit and base-3) and the packed
inference backend's step time and resident memory vs FP.
"""
from __future__ import annotations

import argparse
import copy
import csv
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

import diffq
from diffq import calib as calibration
from diffq.config import register_configs
from diffq.eval.cost import resident_mb
from diffq.export import load_denoiser, pack_base3, pack_bits, save_denoiser, unpack_base3, unpack_bits
from diffq.formats import FPFormat
from diffq.models import denoiser_of, load_pipeline, model_key, sampling_of
from diffq.quantize_stage import quantized_info

# step-time targets (quantized / FP); presets without one are timed and reported only. MixDQ is not
# here: its search generates images from the pipeline (the bench quantizes the bare denoiser), and
# its quantized graph is w4a8's with per-layer widths
TARGETS = {"w8a16": 1.05, "w4a16": 1.05, "w8a8": 1.2, "w8a8_fp8": 1.2, "w4a16_nvfp4": 1.05,
           "fp_w8a8": 1.5, "fp_w4a8": 1.3, "fp_w4a16": 1.05, "w4a8": None, "w4a4": None, "nvfp4_w4a4": None,
           "mxfp4_w4a4": None, "brecq_w4a8": None, "ternary_w158": None,
           "binarydm_w1a4": None}
# bench name -> (preset, extra overrides); fp_w4a8 runs the same graph as its learned-rounding
# variant (learned weights are frozen like RTN ones), so it is timed without reconstruction; the
# training presets are timed with their finetuning off (the quantized graph is the same)
PRESETS = {"w8a16": ("w8a8", {"quant.act.format": "none"}), "fp_w4a8": ("fp_w4a8_rtn", {}),
           "fp_w4a16": ("fp_w4a8_rtn", {"quant.act.format": "none"}),
           "ternary_w158": ("ternary_w158", {"finetune.steps": 0}),
           "binarydm_w1a4": ("binarydm_w1a4", {"finetune.steps": 0})}
CSV_DIR = Path(__file__).resolve().parents[1] / "assets" / "bench"
# (tokens, in features, out features): the testbed's largest linear layers and FLUX.1's (3072 wide)
MATMUL_SHAPES = {"testbed": (1024, 256, 1024), "flux_qkv": (4096, 3072, 3072), "flux_mlp": (4096, 3072, 12288)}


def throughput(fn, x: torch.Tensor, repeats: int) -> float:
    """Elements per second of ``fn(x)`` (median of ``repeats`` calls)."""
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return x.numel() / statistics.median(times)


def e2m1_ladder(y: torch.Tensor) -> torch.Tensor:
    """E2M1 by the ties-to-even ladder (<=.25 -> 0, <.75 -> .5, ... , else 6): one compare-and-add per rung."""
    a = y.abs()
    q = torch.zeros_like(a)
    for threshold, tie_up, step in ((0.25, False, 0.5), (0.75, True, 0.5), (1.25, False, 0.5), (1.75, True, 0.5),
                                    (2.5, False, 1.0), (3.5, True, 1.0), (5.0, False, 2.0)):
        q.add_(a >= threshold if tie_up else a > threshold, alpha=step)
    return q.copysign_(y)


def fake_quant_paths(elements: int, repeats: int) -> None:
    """FP8 casts, the magic-number rounding (what ``FPFormat.round`` ships for other layouts) and the FP4
    ladder vs the generic ExMy formula, each checked bit-exact against it."""
    x = torch.randn(elements) * 3
    e2m1, e3m4, e4m3, e5m2 = FPFormat(2, 1), FPFormat(3, 4), FPFormat(4, 3), FPFormat(5, 2)
    paths = (("fp8 e4m3 cast", e4m3, lambda y: y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()),
             ("fp8 e4m3 magic add", e4m3, e4m3.round_bits), ("fp8 e5m2 cast", e5m2, e5m2.round),
             ("fp8 e3m4 magic add", e3m4, e3m4.round), ("fp4 e2m1 magic add", e2m1, e2m1.round),
             ("fp4 e2m1 ladder", e2m1, e2m1_ladder))
    print(f"{'fake-quant path':<26}{'Melem/s':>10}{'generic':>10}{'speed-up':>10}")
    for name, fmt, fn in paths:
        assert torch.equal(fn(x), fmt.round_generic(x)), name
        fast, generic = throughput(fn, x, repeats), throughput(fmt.round_generic, x, repeats)
        print(f"{name:<26}{fast / 1e6:>10.1f}{generic / 1e6:>10.1f}{fast / generic:>10.2f}")


def packing_paths(elements: int, repeats: int) -> None:
    """Ternary codes packed 4 a byte (2 bits) and 5 a byte (base 3): pack and unpack throughput."""
    codes = torch.randint(0, 3, (elements,), dtype=torch.uint8)
    two, three = pack_bits(codes, 2), pack_base3(codes)
    paths = (("pack 2-bit", lambda c: pack_bits(c, 2), codes),
             ("unpack 2-bit", lambda p: unpack_bits(p, 2, elements), two),
             ("pack base-3", pack_base3, codes), ("unpack base-3", lambda p: unpack_base3(p, elements), three))
    print(f"{'ternary packing':<26}{'Mcodes/s':>10}")
    for name, fn, x in paths:
        per_s = throughput(fn, x, repeats) * (elements / x.numel())
        print(f"{name:<26}{per_s / 1e6:>10.1f}")


def packed_backend(fp: torch.nn.Module, samples: list, kwargs: dict, repeats: int) -> None:
    """The packed inference backend (ternary weights unpacked layer by layer at forward) vs FP: step
    time and resident memory, outputs checked equal to the fake-quant model's."""
    model = copy.deepcopy(fp)
    diffq.quantize(model, "ternary_w158", calib=[s.kwargs for s in samples], overrides={"finetune.steps": 0})
    with tempfile.TemporaryDirectory() as folder:
        save_denoiser(model, quantized_info(model).specs, folder)
        packed = load_denoiser(folder, copy.deepcopy(fp), packed=True)
    with torch.no_grad():
        assert torch.equal(model(**kwargs, return_dict=False)[0], packed(**kwargs, return_dict=False)[0])
    ratios = [step_time(packed, kwargs, repeats) / step_time(fp, kwargs, repeats) for _ in range(3)]
    print(f"packed ternary backend: step {statistics.median(ratios):.2f}x FP, resident "
          f"{resident_mb(fp):.2f} MB (FP) -> {resident_mb(packed):.2f} MB (packed)")


def scaled_mm_paths(repeats: int) -> None:
    """A real FP8 matmul (per-tensor scales, bf16 out) vs bf16, on CUDA."""
    if not torch.cuda.is_available():
        print("fp8 matmul (torch._scaled_mm): skipped, no CUDA device")
        return
    dev = torch.device("cuda")
    print(f"{'fp8 matmul':<26}{'bf16 ms':>10}{'fp8 ms':>10}{'speed-up':>10}")
    for name, (m, k, n) in MATMUL_SHAPES.items():
        a, w = torch.randn(m, k, device=dev), torch.randn(n, k, device=dev)
        sa, sw = a.abs().amax() / 448, w.abs().amax() / 448
        a8, w8 = (a / sa).to(torch.float8_e4m3fn), (w / sw).to(torch.float8_e4m3fn)
        a16, w16 = a.bfloat16(), w.bfloat16()

        def timed(fn) -> float:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / repeats

        bf16 = timed(lambda: a16 @ w16.t())
        fp8 = timed(lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa.float(), scale_b=sw.float(),
                                             out_dtype=torch.bfloat16))
        print(f"{name + f' {m}x{k}x{n}':<26}{bf16 * 1e3:>10.3f}{fp8 * 1e3:>10.3f}{bf16 / fp8:>10.2f}")


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
    parser.add_argument("--elements", type=int, default=2**22, help="tensor size of the fake-quant throughput runs")
    parser.add_argument("--presets", nargs="*", choices=list(TARGETS), help="time only these (default: all)")
    parser.add_argument("--table", action="store_true",
                        help="print the README's table from the committed assets/bench/presets.csv; run nothing")
    parser.add_argument("--deploy", action="store_true", help="run scripts/deploy_bench.py instead (deployed vs bf16 "
                        "on full-size architectures); every other flag goes to it")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="with --deploy: where it runs")
    if "--deploy" in sys.argv[1:]:
        from deploy_bench import main as deploy_main  # scripts/ is on sys.path when this runs as a script

        deploy_main([a for a in sys.argv[1:] if a != "--deploy"])
        return
    args = parser.parse_args()
    if args.device:
        parser.error("--device goes with --deploy")
    if args.table:
        print(markdown_table(), end="")
        return
    fake_quant_paths(args.elements, args.repeats)
    packing_paths(args.elements, args.repeats)
    scaled_mm_paths(args.repeats)
    register_configs()
    with initialize_config_module("diffq.conf", version_base="1.3"):
        cfg = compose("config", overrides=args.overrides)
    pipe = load_pipeline(cfg.model, device="cpu")
    _, fp = denoiser_of(pipe)
    smp = sampling_of(cfg)
    prompts = calibration.calibration_prompts(list(cfg.model.prompts) or list(cfg.calib.prompts), None,
                                              cfg.calib.num_prompts)
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
    print(f"{'config':<14}{'step ms':>9}{'ratio':>8}{'target':>8}{'quant s':>9}{'W bits':>8}{'size x':>8}"
          f"{'res MB':>8}")
    rows = []
    names = args.presets or list(TARGETS)
    for name in names:
        target = TARGETS[name]
        preset, extra = PRESETS.get(name, (name, {}))
        model = copy.deepcopy(fp)
        t0 = time.perf_counter()
        diffq.quantize(model, preset, calib=[s.kwargs for s in samples], overrides=extra, device="cpu")
        calib_s = time.perf_counter() - t0
        # paired, interleaved rounds so machine noise hits FP and quantized alike
        ratios = []
        for _ in range(5):
            fp_t, q_t = step_time(fp, kwargs, args.repeats), step_time(model, kwargs, args.repeats)
            ratios.append(q_t / fp_t)
        ratio = statistics.median(ratios)
        cost = model.diffq_report.cost
        row = {"config": name, "preset": preset, "step_ms": round(q_t * 1e3, 3), "fp_step_ms": round(fp_t * 1e3, 3),
               "ratio": round(ratio, 3), "target": target or "", "quantize_s": round(calib_s, 2),
               "w_bits": round(cost["effective_weight_bits"], 3), "w_stored_bits": round(cost["stored_weight_bits"], 3),
               "a_bits": round(cost["effective_act_bits"], 3),
               "size_ratio_fp": round(cost["compression"], 3), "resident_mb": round(resident_mb(model), 3)}
        rows.append(row)
        print(f"{name:<14}{row['step_ms']:>9.2f}{ratio:>8.3f}{target or float('nan'):>8.2f}{calib_s:>9.2f}"
              f"{row['w_bits']:>8.2f}{row['size_ratio_fp']:>8.2f}{row['resident_mb']:>8.2f}")
    write_csv(rows, cfg.model.name, capture_s, base)
    packed_backend(fp, samples, kwargs, args.repeats)


def write_csv(rows: list[dict], model: str, capture_s: float, fp_step_s: float) -> None:
    """assets/bench/presets.csv (one row a preset) and machine.txt (where and when it ran)."""
    CSV_DIR.mkdir(parents=True, exist_ok=True)
    with open(CSV_DIR / "presets.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (CSV_DIR / "machine.txt").write_text(
        f"model {model}; FP step {fp_step_s * 1e3:.2f} ms; calibration capture {capture_s:.2f} s\n"
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print(f"wrote {CSV_DIR / 'presets.csv'}")


def markdown_table() -> str:
    """The README's benchmark table, from assets/bench/presets.csv and machine.txt."""
    with open(CSV_DIR / "presets.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    head = ["preset", "step / FP", "target", "quantize s", "W bits", "W stored bits", "A bits", "size FP / quantized",
            "resident MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        met = "" if not r["target"] else (" (met)" if float(r["ratio"]) <= float(r["target"]) else " (missed)")
        cells = [f"`{r['config']}`", f"{float(r['ratio']):.2f}x", (f"{float(r['target']):.2f}x" + met) if r["target"]
                 else "", r["quantize_s"], f"{float(r['w_bits']):.2f}", f"{float(r['w_stored_bits']):.2f}",
                 f"{float(r['a_bits']):.2f}", f"{float(r['size_ratio_fp']):.2f}x", f"{float(r['resident_mb']):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    machine = (CSV_DIR / "machine.txt").read_text().strip().replace("\n", "; ")
    return "\n".join(lines) + f"\n\n({machine})\n"


if __name__ == "__main__":
    main()
