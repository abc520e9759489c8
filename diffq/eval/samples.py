"""Evaluation images on disk: written as they are generated, resumable, sharded across processes.

The layout is the official GenEval generator's, so GenEval's own mmdet evaluator runs on it::

    <root>/<index:05d>/metadata.jsonl      the prompt's GenEval entry (or {"prompt": ...}), one JSON object
    <root>/<index:05d>/samples/<j:05d>.png image j of prompt index
    <root>/diffq_samples.json              the setting that made the images, checked before reuse

Sample id ``i = index * images_per_prompt + j`` draws its noise from ``seeds[i]``. Each image is
written (atomically) as soon as its batch is done; a rerun generates only what is missing, in
the same batches, so a resumed folder is identical to an uninterrupted one. Under
``accelerate launch`` (GPUs) or ``torchrun --nproc_per_node`` (CPU) process r of w takes sample
ids r, r + w, r + 2w, ...
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from diffq.distributed import Shard, wait_for_everyone
from diffq.errors import CheckpointError, ConfigError
from diffq.eval.fid import to_uint8
from diffq.models import generate_images

log = logging.getLogger(__name__)

MANIFEST = "diffq_samples.json"


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, sort_keys=True))
    os.replace(tmp, path)


class SampleFolder:
    """The images of ``entries`` x ``images_per_prompt`` samples under ``root`` (see module doc)."""

    def __init__(self, root: str | Path, entries: Sequence[dict[str, Any]], images_per_prompt: int,
                 setting: dict[str, Any]):
        self.root = Path(root)
        self.entries = list(entries)
        self.k = images_per_prompt
        self.setting = setting

    def __len__(self) -> int:
        return len(self.entries) * self.k

    def path(self, i: int) -> Path:
        """PNG path of sample ``i``."""
        index, j = divmod(i, self.k)
        return self.root / f"{index:05d}" / "samples" / f"{j:05d}.png"

    def prepare(self) -> None:
        """Create the folders and metadata; ConfigError when ``root`` holds another setting's images."""
        manifest = self.root / MANIFEST
        if manifest.exists():
            try:
                found = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                found = None
            if found != self.setting:
                raise ConfigError(f"{self.root} holds samples of another setting (see {manifest}): delete that folder "
                                  "or write to another one (hydra.run.dir=...)")
        elif self.root.exists() and any(self.root.iterdir()):
            raise ConfigError(f"{self.root} is not empty and is not a diffq sample folder: choose an empty folder")
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(manifest, self.setting)
        for index, entry in enumerate(self.entries):
            (self.root / f"{index:05d}" / "samples").mkdir(parents=True, exist_ok=True)
            meta = self.root / f"{index:05d}" / "metadata.jsonl"
            if not meta.exists():
                _write_json_atomic(meta, entry)

    def missing(self, ids: Sequence[int]) -> list[int]:
        """The ids among ``ids`` with no image yet."""
        return [i for i in ids if not self.path(i).exists()]

    def write(self, i: int, image: torch.Tensor) -> None:
        """Save sample ``i`` (float ``[3, H, W]`` in [0, 1]) as PNG, atomically."""
        path = self.path(i)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")
        os.replace(tmp, path)

    def load(self) -> torch.Tensor:
        """Every image as float ``[N, 3, H, W]`` in [0, 1] (prompt-major)."""
        missing = self.missing(range(len(self)))
        if missing:
            raise CheckpointError(f"{len(missing)} of {len(self)} samples are missing under {self.root} "
                                  f"(first: {self.path(missing[0])}): rerun the same command to generate them")
        arrays = []
        for i in range(len(self)):
            try:
                with Image.open(self.path(i)) as im:
                    arrays.append(np.asarray(im.convert("RGB")))
            except (UnidentifiedImageError, OSError) as err:
                raise CheckpointError(f"sample {self.path(i)} is unreadable ({err}): delete it and rerun the same "
                                      "command to regenerate it") from None
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)


def generate_samples(pipe: Any, family: str, folder: SampleFolder, seeds: Sequence[int], *, shard: Shard,
                     batch_size: int, desc: str, **sampling: Any) -> int:
    """Generate this shard's missing samples of ``folder`` (prompt of entry ``i // k``, seed
    ``seeds[i]``), writing each batch as it finishes; returns how many images were written.

    The shard's ids are cut into fixed batches; a batch with any missing image is generated again
    whole (only its missing images are written), so results do not depend on interruptions. The
    main process prepares the folder while the others wait."""
    if shard.is_main:
        folder.prepare()
    wait_for_everyone()
    ids = shard.ids(len(folder))
    batches = [ids[s:s + batch_size] for s in range(0, len(ids), batch_size)]
    todo = [b for b in batches if folder.missing(b)]
    done = len(ids) - sum(len(b) for b in todo)
    if done and todo:
        log.info("%s: resuming, %d of %d images already in %s", desc, done, len(ids), folder.root)
    prompts = [folder.entries[i // folder.k]["prompt"] for i in range(len(folder))]
    bar = tqdm(total=len(ids), initial=done, desc=desc, unit="img", disable=not todo)
    written = 0
    for batch in todo:
        missing = set(folder.missing(batch))
        images = generate_images(pipe, family, [prompts[i] for i in batch], [seeds[i] for i in batch],
                                 batch_size=len(batch), progress=False, **sampling)
        for i, image in zip(batch, images):
            if i in missing:
                folder.write(i, image)
        written += len(missing)
        bar.update(len(batch))
    bar.close()
    return written
