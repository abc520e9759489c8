"""GenEval's real-image backend: Mask2Former instances + CLIP zero-shot colour, as the official evaluator.

The official evaluator (djghosh13/geneval ``evaluation/evaluate_images.py``) runs mmdet's
Mask2Former Swin-S (COCO instance) and, for colour clauses, classifies each object with
open_clip ViT-L/14 (OpenAI weights) zero-shot among ten colours. Here the same models come from
transformers: ``facebook/mask2former-swin-small-coco-instance`` and
``openai/clip-vit-large-patch14`` (hub ids or local folders). Detections carry GenEval's class
names: the official evaluator names detector class ``i`` by line ``i`` of its
``object_names.txt`` (the 80 COCO classes in COCO order), which is the checkpoint's ``id2label``
except for the three names in :data:`COCO_RENAMES`. The official evaluator runs the detector at
mmdet's test scale (shortest edge 800, longest 1333); here images are resized as the
checkpoint's image processor is configured unless ``size`` says otherwise, so scores come close
to the official ones without matching them exactly.

Instances follow mmdet's Mask2Former post-processing: class scores (softmax without the
no-object class) top-k over queries x classes (k = number of queries), masks upsampled to the
image and cut at logit 0, score = class score x mean mask probability inside the mask, box =
the mask's extent. Colour follows ``ImageCrops``: the image outside the object's mask is
replaced by ``bgcolor`` (#999), cropped to the box, CLIP-embedded and compared with a
per-class classifier (the normalised mean of the normalised embeddings of three templates per
colour). The score thresholds and the per-class cap live in the shared scorer
(:mod:`diffq.eval.geneval`); here detections below ``min_score`` are dropped and at most
``max_objects`` are kept per class before colours are computed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageColor

from diffq.errors import CheckpointError, ConfigError
from diffq.eval.geneval import MAX_OBJECTS, THRESHOLD, Detection

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
# transformers' COCO label -> GenEval's object_names.txt name, for the classes they name differently
COCO_RENAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")


def _load(kind: str, name_or_path: str, loader) -> Any:
    local = Path(str(name_or_path)).expanduser()
    source = str(local) if local.exists() else str(name_or_path)
    try:
        return loader(source)
    except OSError as err:
        raise CheckpointError(f"cannot load the GenEval {kind} {name_or_path!r} ({str(err).splitlines()[0]}): pass a "
                              f"local folder (eval.geneval.{kind}=/path) or go online once to download it") from err


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Boxes ``[K, 4]`` (x0, y0, x1, y1; x1/y1 exclusive) of non-empty boolean masks ``[K, H, W]``."""
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[1:]
    y0, x0 = rows.float().argmax(1), cols.float().argmax(1)
    y1, x1 = h - rows.flip(1).float().argmax(1), w - cols.flip(1).float().argmax(1)
    return torch.stack([x0, y0, x1, y1], 1).float()


def geneval_names(id2label: dict[int, str]) -> list[str]:
    """GenEval's name of each detector class, by class index: its label, renamed by :data:`COCO_RENAMES`."""
    return [COCO_RENAMES.get(id2label[i], id2label[i]) for i in range(len(id2label))]


def detector_classes(detector: str) -> list[str]:
    """GenEval class names of a Mask2Former checkpoint's classes, from its config alone."""
    from transformers import AutoConfig

    return geneval_names(_load("detector", detector, AutoConfig.from_pretrained).id2label)


def check_classes(entries: Sequence[dict[str, Any]], classes: Sequence[str]) -> None:
    """ConfigError when the metadata names classes the detector does not have."""
    wanted = {c["class"] for e in entries for c in [*e["include"], *e.get("exclude", [])]}
    unknown = sorted(wanted - set(classes))
    if unknown:
        raise ConfigError(f"GenEval classes {unknown} are not among the detector's {len(classes)} classes "
                          f"(e.g. {', '.join(classes[:5])}): use a detector trained on them "
                          "(eval.geneval.detector) or metadata with its classes")


class Mask2FormerClipDetector:
    """GenEval detections (class, box, mask, colour, score) of uint8 images ``[N, H, W, 3]``."""

    def __init__(self, detector: str = DEFAULT_DETECTOR, clip: str = DEFAULT_CLIP, *,
                 device: str | torch.device = "cpu",
                 batch_size: int = 8, min_score: float = THRESHOLD, max_objects: int = MAX_OBJECTS,
                 colors: Sequence[str] = COLORS, templates: Sequence[str] = TEMPLATES, bgcolor: str = "#999",
                 size: Sequence[int] | None = None):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        from diffq.eval.clip_score import load_clip

        self.device = torch.device(device)
        self.model = _load("detector", detector, Mask2FormerForUniversalSegmentation.from_pretrained)
        self.model = self.model.to(self.device).eval()
        self.processor = _load("detector", detector, AutoImageProcessor.from_pretrained)
        clip_model, self.clip_processor = load_clip(clip, "eval.geneval.clip_model")
        self.clip = clip_model.to(self.device)  # returns embedding tensors under transformers 4 and 5
        self.classes = geneval_names(self.model.config.id2label)
        # (shortest, longest) edge the processor resizes to; None keeps the processor's configured size
        self.resize = {"size": {"shortest_edge": size[0], "longest_edge": size[1]}} if size else {}
        self.batch_size, self.min_score, self.max_objects = batch_size, min_score, max_objects
        self.colors, self.templates = list(colors), list(templates)
        try:
            self.bgcolor = ImageColor.getrgb(bgcolor)
        except ValueError:
            raise ConfigError(f"eval.geneval.bgcolor {bgcolor!r} is not a colour: use e.g. '#999'") from None
        self._classifiers: dict[str, torch.Tensor] = {}
        self.settings = {"detector": str(detector), "clip_model": str(clip), "min_score": min_score,
                         "max_objects": max_objects, "bgcolor": bgcolor, "templates": self.templates,
                         "detector_size": list(size) if size else None}

    @torch.no_grad()
    def instances(self, images: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image (scores [K], class ids [K], boolean masks [K, H, W]), scores above ``min_score``,
        descending, at most ``max_objects`` per class."""
        out = []
        h, w = images.shape[1:3]
        for start in range(0, len(images), self.batch_size):
            batch = list(images[start:start + self.batch_size])
            inputs = self.processor(images=batch, return_tensors="pt", **self.resize)
            pred = self.model(pixel_values=inputs["pixel_values"].to(self.device))
            valid = inputs["pixel_mask"][0] if "pixel_mask" in inputs else torch.ones(inputs["pixel_values"].shape[-2:])
            vh, vw = int(valid.any(1).sum()), int(valid.any(0).sum())
            probs = pred.class_queries_logits.softmax(-1)[..., :-1]  # [B, Q, C]
            n_queries, n_classes = probs.shape[1:]
            top, index = probs.flatten(1).topk(n_queries, dim=1)
            for b in range(len(batch)):
                keep = top[b] > self.min_score  # the mask factor is <= 1, so nothing below can pass
                if not keep.any():
                    out.append((torch.zeros(0), torch.zeros(0, dtype=torch.long),
                                torch.zeros(0, h, w, dtype=torch.bool)))
                    continue
                queries, labels = index[b, keep] // n_classes, index[b, keep] % n_classes
                logits = F.interpolate(pred.masks_queries_logits[b, queries][None],
                                       size=inputs["pixel_values"].shape[-2:], mode="bilinear",
                                       align_corners=False)[..., :vh, :vw]
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
                masks = logits > 0
                mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
                scores = top[b, keep] * mask_score
                order = scores.argsort(descending=True, stable=True)
                scores, labels, masks = scores[order], labels[order], masks[order]
                rank = torch.zeros_like(labels)
                if len(labels):  # rank of each detection within its class, by descending score
                    same = labels[:, None] == labels[None, :]
                    rank = torch.tril(same, diagonal=-1).sum(1)
                ok = (scores > self.min_score) & (rank < self.max_objects) & masks.flatten(1).any(1)
                out.append((scores[ok].cpu(), labels[ok].cpu(), masks[ok].cpu()))
        return out

    def _classifier(self, cls: str) -> torch.Tensor:
        """Colour classifier of class ``cls``: ``[colours, D]`` unit rows."""
        if cls not in self._classifiers:
            texts = [t.format(color=c, cls=cls) for c in self.colors for t in self.templates]
            tokens = self.clip_processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            emb = F.normalize(self.clip.get_text_features(tokens["input_ids"], tokens.get("attention_mask")), dim=-1)
            self._classifiers[cls] = F.normalize(emb.view(len(self.colors), len(self.templates), -1).mean(1), dim=-1)
        return self._classifiers[cls]

    @torch.no_grad()
    def colors_of(self, image: np.ndarray, masks: torch.Tensor, boxes: torch.Tensor,
                  classes: Sequence[str]) -> list[str]:
        """Colour name of each object: its mask over ``bgcolor``, cropped to its box, classified by CLIP."""
        if not len(masks):
            return []
        blank = np.array(self.bgcolor, dtype=np.uint8)
        composite = np.where(masks.numpy()[..., None], image[None], blank)  # [K, H, W, 3]
        crops = [Image.fromarray(c).crop(tuple(int(round(v)) for v in box.tolist()))
                 for c, box in zip(composite, boxes)]
        pixels = self.clip_processor.image_processor(images=crops, return_tensors="pt")["pixel_values"]
        feats = F.normalize(self.clip.get_image_features(pixels.to(self.device)), dim=-1)
        weights = torch.stack([self._classifier(c) for c in classes])  # [K, colours, D]
        return [self.colors[i] for i in torch.einsum("kd,kcd->kc", feats, weights).argmax(1).tolist()]

    def __call__(self, images: np.ndarray) -> list[list[Detection]]:
        """Detections of each uint8 image ``[N, H, W, 3]``."""
        results = []
        for image, (scores, labels, masks) in zip(images, self.instances(images)):
            boxes = mask_boxes(masks) if len(masks) else torch.zeros(0, 4)
            names = [self.classes[i] for i in labels.tolist()]
            colors = self.colors_of(image, masks, boxes, names)
            results.append([Detection(n, tuple(b.tolist()), m.numpy(), c, float(s))
                            for n, b, m, c, s in zip(names, boxes, masks, colors, scores)])
        return results
