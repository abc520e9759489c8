"""CLIP score (100 x cosine of image and prompt embeddings, floored at 0) with torchmetrics.

torchmetrics' ``CLIPScore`` takes the model as a callable returning ``(model, processor)``;
:class:`CLIPFeatureAdapter` makes a transformers-5 ``CLIPModel`` fit it (transformers 5's
``get_*_features`` return output objects, and torchmetrics 1.9 expects tensors: torchmetrics
issue #3407). Models load by hub id (``openai/clip-vit-large-patch14`` for real models) or
local folder (the testbed's tiny CLIP, ``assets/testbed/clip``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffq.errors import CheckpointError
from diffq.eval.fid import to_uint8

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # transformers 4 / 5 names


class CLIPFeatureAdapter(nn.Module):
    """A ``CLIPModel`` whose ``get_text_features`` / ``get_image_features`` return embedding tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text embeddings ``[N, D]``."""
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings ``[N, D]``."""
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))


def load_clip(name_or_path: str | Path, setting: str = "eval.clip_model") -> tuple[CLIPFeatureAdapter, Any]:
    """(adapted CLIPModel, CLIPProcessor) from a hub id or a local folder; errors name ``setting``."""
    from transformers import CLIPModel, CLIPProcessor

    local = Path(str(name_or_path)).expanduser()
    if local.exists() and not any((local / f).exists() for f in PROCESSOR_FILES):
        raise CheckpointError(f"CLIP folder {local} has no image processor config ({' or '.join(PROCESSOR_FILES)}): "
                              "save the CLIPProcessor next to the model (CLIPProcessor.save_pretrained)")
    source = str(local) if local.exists() else str(name_or_path)
    try:
        model = CLIPModel.from_pretrained(source).eval()
        processor = CLIPProcessor.from_pretrained(source)
    except OSError as err:
        raise CheckpointError(f"cannot load CLIP model {name_or_path!r} ({str(err).splitlines()[0]}): pass a local "
                              f"folder with {setting}=/path, or go online once to download {name_or_path}") from err
    return CLIPFeatureAdapter(model), processor


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: list[str], model: tuple[CLIPFeatureAdapter, Any],
               batch_size: int = 64) -> dict[str, Any]:
    """Mean CLIP score of images ``[N, 3, H, W]`` (float in [0, 1] or uint8) against their prompts."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(images) != len(prompts):
        raise ValueError(f"CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    metric = CLIPScore(model_name_or_path=lambda: model)
    x = to_uint8(images)
    for i in tqdm(range(0, len(x), batch_size), desc="CLIP score", unit="batch", disable=len(x) <= batch_size):
        metric.update(list(x[i : i + batch_size]), prompts[i : i + batch_size])
    return {"mean": float(metric.compute()), "n": len(x)}
