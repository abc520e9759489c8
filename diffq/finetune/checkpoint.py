"""Training checkpoints as one safetensors file with JSON metadata (no pickle): the trainable
tensors, the optimiser state, the learning-rate schedule, the RNG states, the loss curve, the
validation record and the best state so far, so a rerun continues exactly where the last checkpoint
left off."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from diffq.cache import UNREADABLE, read_tensors, save_tensors
from diffq.errors import CheckpointError

STATE_FILE = "state.safetensors"


def save_checkpoint(folder: Path, *, step: int, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: Any, generator: torch.Generator, losses: list[float], complete: bool,
                    record: Mapping[str, Any], best: Mapping[str, Mapping[str, torch.Tensor]],
                    extra: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the training state after ``step`` steps (atomically: a crash keeps the previous one);
    ``extra``: the extra losses' own state (e.g. fixed projections); ``record``: JSON-able curves
    (validation, learning rate, best step); ``best``: the best state's ``params`` and ``extra`` tensors."""
    tensors = {f"param/{n}": p.detach() for n, p in params.items()}
    tensors.update({f"extra/{k}": v.detach() for k, v in (extra or {}).items()})
    tensors.update({f"best/{n}": v.detach() for n, v in best["params"].items()})
    tensors.update({f"best_extra/{k}": v.detach() for k, v in best["extra"].items()})
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"opt/{idx}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/data"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    meta = {"step": step, "complete": complete, "names": list(params), "param_groups": opt["param_groups"],
            "scheduler": scheduler.state_dict(), "losses": losses, "record": dict(record)}
    path = folder / STATE_FILE
    save_tensors(path, tensors, meta)
    return path


def load_checkpoint(folder: Path, *, params: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    scheduler: Any, generator: torch.Generator) -> dict[str, Any] | None:
    """Restore a state written by :func:`save_checkpoint` into the given objects; returns its
    metadata (``step``, ``losses``, ``complete``, ``record``, ``extra``: the extra losses' tensors, and
    ``best``: the best state's ``params`` and ``extra`` tensors), or None when there is none."""
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        tensors, meta = read_tensors(path)
    except UNREADABLE as e:
        raise CheckpointError(f"finetuning checkpoint {path} is unreadable ({e}): delete it to train from the "
                              "start") from None
    if "record" not in meta:
        raise CheckpointError(f"finetuning checkpoint {path} was written by an older diffq (no validation record): "
                              "delete it to train from the start")
    if meta.get("names") != list(params):
        raise CheckpointError(f"finetuning checkpoint {path} holds other parameters than this selection trains: "
                              "delete it to train from the start")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/torch"])
    generator.set_state(tensors["rng/data"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["rng/cuda"]))
    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

    return {**meta, "extra": under("extra/"), "best": {"params": under("best/"), "extra": under("best_extra/")}}
