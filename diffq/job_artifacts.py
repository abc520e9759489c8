"""What a job writes into its run folder: spec.txt (the per-layer table, attention formats, what
finetuning trained), finetune_loss.png, grid.png, the export and metrics.json (also for a failed run)."""
from __future__ import annotations

import json
import logging
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from diffq.deployment import save_deployed
from diffq.errors import ConfigError
from diffq.eval.grids import image_grid, spread_indices
from diffq.export import save_denoiser
from diffq.job_evalset import EvalSet
from diffq.spec import LayerSpec, TensorQuant, format_spec_table
from diffq.sweep.rows import bits_label, method_label

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What the quantized model is: its preset name and attention-matmul settings (the config's, or
    the checkpoint's with ``load=``) and, with ``load=``, the checkpoint's metadata."""

    name: str
    method: str
    attn: dict[str, Any]
    checkpoint: dict[str, Any] | None = None

def spec_text(specs: list[LayerSpec], attn: Mapping[str, Any], finetuned: Mapping[str, Any] | None = None) -> str:
    """spec.txt: the per-layer table, then the attention-matmul formats when they are quantized,
    then what finetuning trained."""
    text = format_spec_table(specs)
    if attn.get("enabled"):
        text += (f"attention matmuls: q/k/v {_describe(attn['qkv'])}, "
                 f"softmax output {_describe(attn['softmax'])}\n")
    if finetuned:
        text += (f"\nfinetuned: {finetuned['params']} parameters ({100 * finetuned['fraction']:.2f}% of the denoiser) "
                 f"in {finetuned['layers_trained']} layers/modules, {finetuned['steps']} steps\n")
        for stage in finetuned["stages"] or [finetuned]:
            if finetuned["stages"]:
                text += (f" stage {stage['name']}: {stage['steps']} steps, lr {stage['lr']:g}, step-size lr "
                         f"{stage['act_scale_lr']:g}, {stage['params']} parameters\n")
            text += f"  {_validation_note(stage)}\n"
            width = max(len(n) for n in stage["layers"])
            text += "".join(f"  {n.ljust(width)}  {' '.join(k)}\n" for n, k in stage["layers"].items())
    return text


def _validation_note(stage: Mapping[str, Any]) -> str:
    """A stage's validation in one line: the best step and loss and which state was kept."""
    if not stage["val_curve"]:
        return "validation: off (the last state kept)"
    steps = {s for s, _ in stage["val_curve"]}
    kept = "kept" if stage["keep"] == "best" else f"the last state kept, val loss {stage['val_curve'][-1][1]:.4g}"
    return (f"validation: best val loss {stage['best_val_loss']:.4g} at step {stage['best_step']} of {stage['steps']} "
            f"({kept}; {len(steps)} validations on {stage['val_items']} held-out items)")


def _describe(args: Mapping[str, Any]) -> str:
    return TensorQuant.from_mapping(args, "quant.attn").describe()


def run_label(cfg: DictConfig, plan: Plan) -> str:
    """What the job ran, as sweep reports label it: ``rtn+block W4A8`` (a loaded export: its preset)."""
    if cfg.load:
        return f"{plan.name} (loaded)"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        return f"{method_label(resolved)} {bits_label(resolved['quant'])}"
    except ConfigError:
        return plan.name


def write_artifacts(cfg: DictConfig, out_dir: Path, plan: Plan, denoiser: nn.Module, specs: list[LayerSpec],
                    evalset: EvalSet, fp_images: torch.Tensor, q_images: torch.Tensor, metrics: dict[str, Any]) -> None:
    """grid.png, the exported model (``export=true``, recorded in ``metrics``) and metrics.json."""
    if cfg.eval.grid:
        tags = [e.get("tag") for e in evalset.entries for _ in range(evalset.images_per_prompt)]
        ids = spread_indices(evalset.prompts, tags, cfg.eval.grid_max)
        label = "\n".join(textwrap.wrap(metrics["label"], 14)[:4])  # the label column is 14 characters wide
        image_grid([fp_images[ids], q_images[ids]], ["FP", label], [evalset.prompts[i] for i in ids]).save(
            out_dir / "grid.png")
    if cfg.export and cfg.deploy:
        folder = save_deployed(denoiser, out_dir / "model")
        size = sum(f.stat().st_size for f in folder.iterdir())
        metrics["export"] = {"path": str(folder), "size_mb": round(size / 2**20, 4), "deployed": cfg.deploy}
    elif cfg.export:
        path = save_denoiser(denoiser, specs, out_dir / "model", plan.attn,
                                extra={"model": cfg.model.name, "quant": plan.name, "method": plan.method},
                                codec=cfg.export_codec)
        metrics["export"] = {"path": str(path), "size_mb": round(path.stat().st_size / 2**20, 4)}
    write_metrics(out_dir, metrics)


def loss_plot(finetuned: Mapping[str, Any], path: Path) -> Any:
    """finetune_loss.png: the training loss per step (log scale; step i's loss is the model's after
    i updates), the validation loss at its steps, each stage's kept best state (a vertical line), the
    stage boundaries and the weights' learning rate (right axis); returns the (closed) figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = finetuned["stages"] or [finetuned]
    offsets = [sum(s["steps"] for s in stages[:i]) for i in range(len(stages))]
    fig, ax = plt.subplots(figsize=(7, 4))
    losses = finetuned["loss_curve"]
    ax.plot(range(len(losses)), losses, lw=0.8, color="C0", alpha=0.8, label="training loss")
    if finetuned["val_curve"]:
        steps, values = zip(*finetuned["val_curve"])
        ax.plot(steps, values, "o-", ms=3.5, lw=1.2, color="C1", label="validation loss")
    for stage, offset in zip(stages, offsets):
        if offset:
            ax.axvline(offset, color="0.6", lw=0.8, ls=":")
        if stage["keep"] == "best":
            step = offset + stage["best_step"]
            ax.axvline(step, color="C2", lw=1.2, ls="--", label=f"kept: step {step}")
            ax.annotate(f"best {stage['best_val_loss']:.3g}", (step, stage["best_val_loss"]), xytext=(4, 6),
                        textcoords="offset points", fontsize=8, color="C2")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="finetuning loss")
    lr = ax.twinx()
    lr.plot(range(len(finetuned["lr_curve"])), finetuned["lr_curve"], lw=0.8, color="C3", alpha=0.6,
            label="learning rate")
    lr.set_ylabel("learning rate", color="C3")
    handles = [h for a in (ax, lr) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def write_failure(out_dir: Path, error: BaseException, overrides: list[str]) -> None:
    """metrics.json of a failed run: ``status: failed``, the error and the overrides. An earlier
    successful run's metrics.json in the same folder is kept as metrics.previous.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = out_dir / "metrics.json"
    if old.exists():
        try:
            ok = json.loads(old.read_text()).get("status") == "ok"
        except (OSError, ValueError):
            ok = False
        if ok:
            old.replace(out_dir / "metrics.previous.json")
            log.info("the earlier run's metrics.json in %s is kept as metrics.previous.json", out_dir)
    write_metrics(out_dir, {"status": "failed", "error": f"{type(error).__name__}: {error}", "overrides": overrides})


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json (atomically)."""
    tmp = out_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    tmp.replace(out_dir / "metrics.json")
