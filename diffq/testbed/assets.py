"""Where the trained testbed checkpoints live, and a check that names what is missing."""
from __future__ import annotations

import json
from pathlib import Path

from diffq.errors import CheckpointError

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets" / "testbed"
TRAIN_SCRIPT = "python scripts/train_testbed.py"
# asset folder -> training stage that writes it
STAGES = {"vae": "vae", "clip": "clip", "unet_pipeline": "unet", "flux_pipeline": "flux"}
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def asset_path(name: str) -> str:
    """Absolute path of a testbed asset folder (the OmegaConf resolver ``${world_asset:shapes,...}``)."""
    return str(ASSETS_DIR / name)


def is_testbed_asset(path: str | Path) -> bool:
    """Whether ``path`` points inside the testbed asset folder."""
    try:
        Path(path).expanduser().resolve().relative_to(ASSETS_DIR)
    except ValueError:
        return False
    return True


def check_asset_folder(path: str | Path) -> None:
    """Raise CheckpointError naming the first missing file and the command that makes it."""
    folder = Path(path).expanduser().resolve()
    stage = STAGES.get(folder.relative_to(ASSETS_DIR).parts[0], "all") if is_testbed_asset(folder) else "all"
    fix = f"train it with `{TRAIN_SCRIPT} --stage {stage}`"
    if not folder.is_dir():
        raise CheckpointError(f"testbed model folder {folder} is missing: {fix}")
    index = folder / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{index} is missing (partial testbed folder): {fix}")
    components = [k for k, v in json.loads(index.read_text()).items() if not k.startswith("_") and v and v[0]]
    for name in components:
        sub = folder / name
        if name.startswith("scheduler"):
            needed = [sub / "scheduler_config.json"]
        elif name.startswith("tokenizer"):
            needed = [sub / "tokenizer.json"]
        else:
            needed = [sub / "config.json"]
            if not any((sub / w).is_file() for w in _WEIGHTS):
                raise CheckpointError(f"{sub} has no weights file ({' or '.join(_WEIGHTS)}): {fix}")
        for f in needed:
            if not f.is_file():
                raise CheckpointError(f"{f} is missing (partial testbed folder): {fix}")
