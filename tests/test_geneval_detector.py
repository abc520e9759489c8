"""GenEval's real backend (Mask2Former instances + CLIP colour), with tiny same-class models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffq.errors import ConfigError
from diffq.eval.geneval import score
from diffq.eval.geneval_detector import Mask2FormerClipDetector, check_classes, detector_classes, mask_boxes
from diffq.eval.suite import check_eval
from diffq.testbed.assets import asset_path
from diffq.testbed.detector import ShapesDetector
from diffq.testbed.groundtruth import render_entry
from diffq.testbed.prompts import evaluation_metadata
from diffq.testbed.world import BACKGROUND, COLORS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "geneval"
SHAPES = ["circle", "square", "triangle"]
WORLD_BG = "#{:02x}{:02x}{:02x}".format(*BACKGROUND)
ONE_TEMPLATE = ("a photo of a {color} {cls}",)  # the tiny CLIP's vocabulary has no "colored" or "object"


def tiny_mask2former(folder: Path, classes: list[str]) -> Path:
    """A random Mask2Former (tiny Swin backbone) with ``classes``, saved with its image processor."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
                               num_queries=12, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=64, encoder_feedforward_dim=64, id2label=dict(enumerate(classes)),
                               label2id={c: i for i, c in enumerate(classes)}, use_pretrained_backbone=False)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes_m2f(tmp_path_factory) -> Path:
    return tiny_mask2former(tmp_path_factory.mktemp("m2f"), SHAPES)


@pytest.fixture(scope="module")
def world_images() -> tuple[list[dict], np.ndarray]:
    entries = list(evaluation_metadata())
    rng = np.random.default_rng(0)
    return entries, np.stack([render_entry(e, rng) for e in entries])


def test_mask_boxes_are_the_mask_extents():
    masks = torch.zeros(2, 8, 10, dtype=torch.bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 7, 0] = True
    assert mask_boxes(masks).tolist() == [[3, 2, 7, 5], [0, 7, 1, 8]]


def test_instances_match_transformers_post_processing(shapes_m2f, world_images):
    det = Mask2FormerClipDetector(shapes_m2f, asset_path("clip"), min_score=0.0, max_objects=100,
                                  colors=tuple(COLORS), templates=ONE_TEMPLATE)
    images = world_images[1][:4]
    inputs = det.processor(images=list(images), return_tensors="pt")
    with torch.no_grad():
        pred = det.model(pixel_values=inputs["pixel_values"])
    reference = det.processor.post_process_instance_segmentation(pred, threshold=0.0, target_sizes=[(32, 32)] * 4,
                                                                 return_binary_maps=True)
    for (scores, _labels, masks), ref in zip(det.instances(images), reference):
        ref_info = sorted(ref["segments_info"], key=lambda s: -s["score"])
        n = min(5, len(ref_info))  # transformers first resizes masks to 384 px: scores agree to ~1e-3
        assert np.allclose(scores[:n].numpy(), [s["score"] for s in ref_info[:n]], atol=3e-3)
        assert masks.shape[1:] == (32, 32) and masks.flatten(1).any(1).all()
        assert torch.all(scores[:-1] >= scores[1:])


def test_detections_respect_threshold_cap_and_boxes(shapes_m2f, world_images):
    det = Mask2FormerClipDetector(shapes_m2f, asset_path("clip"), min_score=0.05, max_objects=2,
                                  colors=tuple(COLORS), templates=ONE_TEMPLATE)
    for dets in det(world_images[1][:6]):
        assert all(d.score > 0.05 and d.cls in SHAPES and d.color in COLORS for d in dets)
        assert all(sum(d.cls == c for d in dets) <= 2 for c in SHAPES)
        for d in dets:
            assert list(d.box) == mask_boxes(torch.from_numpy(d.mask)[None])[0].tolist()


def test_clip_colours_of_masked_objects_are_right(shapes_m2f, world_images):
    """The colour path (mask over bgcolor, crop, CLIP zero-shot) on ground-truth objects, with the
    testbed's tiny CLIP: scored by the shared GenEval rules, colour tasks come out right."""
    entries, images = world_images
    truth = ShapesDetector()(images)
    det = Mask2FormerClipDetector(shapes_m2f, asset_path("clip"), colors=tuple(COLORS), templates=ONE_TEMPLATE,
                                  bgcolor=WORLD_BG)
    recoloured, right, total = [], 0, 0
    for image, dets in zip(images, truth):
        masks = torch.from_numpy(np.stack([d.mask for d in dets])) if dets else torch.zeros(0, 32, 32, dtype=torch.bool)
        boxes = torch.tensor([d.box for d in dets]) if dets else torch.zeros(0, 4)
        colors = det.colors_of(image, masks, boxes, [d.cls for d in dets])
        right += sum(c == d.color for c, d in zip(colors, dets))
        total += len(dets)
        recoloured.append([type(d)(d.cls, d.box, d.mask, c, d.score) for d, c in zip(dets, colors)])
    assert right / total >= 0.98  # measured 1.0 (0.84 on the official #999 grey, unlike this world's background)
    result = score(entries, recoloured, 1)
    assert result.tasks["colors"] >= 0.95 and result.tasks["color_attr"] >= 0.95


def coco_instance_config(folder: Path) -> Path:
    """The config of a COCO-instance Mask2Former as the hub checkpoint has it: 80 classes in COCO
    order, with COCO's own labels (torchvision's list, offline)."""
    from torchvision.models._meta import _COCO_CATEGORIES
    from transformers import Mask2FormerConfig

    labels = [c for c in _COCO_CATEGORIES if c not in ("__background__", "N/A")]
    Mask2FormerConfig(id2label=dict(enumerate(labels)), label2id={c: i for i, c in enumerate(labels)},
                      use_pretrained_backbone=False).save_pretrained(folder)
    return folder


def test_coco_labels_get_geneval_names_by_index(tmp_path):
    names = detector_classes(str(coco_instance_config(tmp_path)))
    assert len(names) == 80 and names[:3] == ["person", "bicycle", "car"]
    assert names[62:67] == ["tv", "laptop", "computer mouse", "tv remote", "computer keyboard"]


@pytest.mark.skipif(not (SHARED / "object_names.txt").exists(), reason="../shared/geneval not present")
def test_official_names_and_prompts_pass_the_class_check(tmp_path):
    from transformers import AutoConfig

    from diffq.eval.geneval import load_metadata

    folder = coco_instance_config(tmp_path)
    official = [n.strip() for n in (SHARED / "object_names.txt").read_text().splitlines() if n.strip()]
    assert detector_classes(str(folder)) == official  # the rename table, index by index
    entries = load_metadata(SHARED / "evaluation_metadata.jsonl")
    check_classes(entries, detector_classes(str(folder)))  # all 553 prompts
    raw = AutoConfig.from_pretrained(folder).id2label
    with pytest.raises(ConfigError, match="computer keyboard"):
        check_classes(entries, [raw[i] for i in range(len(raw))])


def test_detector_size_reaches_the_image_processor(shapes_m2f, world_images):
    seen = []
    for size in (None, [96, 128]):
        det = Mask2FormerClipDetector(shapes_m2f, asset_path("clip"), colors=tuple(COLORS), templates=ONE_TEMPLATE,
                                      size=size)
        det.model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["pixel_values"].shape[-2:])),
                                            with_kwargs=True)
        _, _, masks = det.instances(world_images[1][:2])[0]
        assert masks.shape[1:] == (32, 32) and det.settings["detector_size"] == size
    assert seen == [(64, 64), (96, 96)]  # the saved processor's shortest edge 64, then the setting's 96


def test_bad_backend_input_is_refused(compose, shapes_m2f, tmp_path):
    with pytest.raises(ConfigError, match="not a colour"):
        Mask2FormerClipDetector(shapes_m2f, asset_path("clip"), templates=ONE_TEMPLATE, bgcolor="greyish")
    with pytest.raises(ConfigError, match="eval.geneval.detector_size"):
        check_eval(compose("model=tiny_sd15", "eval.geneval.detector_size=[800]").eval)
    with pytest.raises(ConfigError, match="eval.geneval.detector_size"):
        check_eval(compose("model=tiny_sd15", "eval.geneval.detector_size=[1333,800]").eval)
    with pytest.raises(ConfigError, match=r"\['cat'\] are not among the detector's 3 classes"):
        check_classes([{"tag": "t", "prompt": "a cat", "include": [{"class": "cat", "count": 1}]}],
                      detector_classes(str(shapes_m2f)))
    from diffq.errors import CheckpointError

    with pytest.raises(CheckpointError, match="eval.geneval.detector"):
        detector_classes(str(tmp_path / "no_such_detector"))


@pytest.mark.skipif(not (SHARED / "evaluation_metadata.jsonl").exists(), reason="../shared/geneval not present")
def test_official_prompts_run_end_to_end_with_the_mask2former_backend(compose, tmp_path):
    """The official metadata, scored by a (tiny, random) Mask2Former with GenEval's 80 class names."""
    from diffq.job import run

    names = [n.strip() for n in (SHARED / "object_names.txt").read_text().splitlines() if n.strip()]
    m2f = tiny_mask2former(tmp_path / "m2f80", names)
    cfg = compose("model=tiny_sd15", "eval=geneval", f"eval.geneval.metadata={SHARED / 'evaluation_metadata.jsonl'}",
                  "eval.geneval.stride=100", "eval.images_per_prompt=2", f"eval.geneval.detector={m2f}",
                  f"eval.geneval.clip_model={asset_path('clip')}",
                  "eval.geneval.templates=['a photo of a {color} {cls}']",
                  "eval.grid=false", "calib.num_prompts=2", "calib.num_steps=2", "model.steps=2")
    m = run(cfg, tmp_path / "run")
    g = m["metrics"]["geneval"]
    assert g["settings"]["backend"] == "mask2former" and g["settings"]["prompts"] == 6
    assert g["settings"]["detector"] == str(m2f) and g["settings"]["bgcolor"] == "#999"
    for side in ("fp", "quant"):
        assert 0.0 <= g[side]["overall"] <= 1.0 and set(g[side]["tasks"]) <= {
            "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    first = (tmp_path / "run" / "samples" / "00000")
    assert (first / "metadata.jsonl").exists() and len(list((first / "samples").glob("*.png"))) == 2


def test_testbed_prompts_with_the_mask2former_backend(compose, tmp_path, shapes_m2f):
    from diffq.job import run

    cfg = compose("eval=geneval_shapes", "eval.geneval.backend=mask2former", "eval.geneval.images_per_task=1",
                  "eval.images_per_prompt=1", "eval.geneval.detector_size=[96,128]",
                  f"eval.geneval.detector={shapes_m2f}",
                  f"eval.geneval.clip_model={asset_path('clip')}",
                  "eval.geneval.templates=['a photo of a {color} {cls}']",
                  f"eval.geneval.colors=[{','.join(COLORS)}]", "eval.grid=false", "calib.num_prompts=2",
                  "calib.num_steps=2")
    g = run(cfg, tmp_path)["metrics"]["geneval"]
    assert g["settings"]["backend"] == "mask2former" and g["settings"]["prompts"] == 6
    assert g["settings"]["detector_size"] == [96, 128] and set(g["settings"]["task_images"].values()) == {1}
    with pytest.raises(ConfigError, match="shapes detector scores only"):
        run(compose("eval.geneval.backend=shapes", "model=tiny_sd15",
                    f"eval.geneval.metadata={tmp_path / 'x.jsonl'}"), tmp_path / "y")
