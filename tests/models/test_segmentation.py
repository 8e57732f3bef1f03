"""Segmentation models (``kind: segmentation``): the manifest's rules, the post-processing, and the
bundled ct-liver-seg model through the node's own path (DICOM files -> analyse) on phantoms whose
seeds it was not trained or evaluated on, scored with Dice against the generator's lesion masks."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

from models.train.common import ONNX_ROOT
from models.train.train_seg import manifest_dict
from node.errors import ManifestError
from node.inference.manifest import parse_manifest
from node.inference.postprocess import dice, remove_small_components, segment_masks
from node.inference.registry import load_registry
from node.inference.runtime import RuntimeConfig, create_session
from node.runner.analyse import Stopwatch, analyse
from node.synth import generate_study, render_study

#: Lesion-vs-background Dice of the bundled model through analyse on seeds 7100-7103 (16 slices of
#: 128x128): measured 0.772, 0.976, 0.871, 0.991 (mean 0.90); the bounds leave room for numerics.
MIN_LESION_DICE = 0.8
MIN_STUDY_DICE = 0.7


def good() -> dict[str, Any]:
    return manifest_dict()


def refused(data: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, "seg.yaml")
    return str(info.value)


def test_the_bundled_manifest_shape_is_accepted() -> None:
    m = parse_manifest(good(), "seg.yaml")
    assert m.kind == "segmentation" and m.segmentation is not None
    assert m.segmentation.background_index == 0 and m.n_outputs == 3
    assert all(lb.category is not None for lb in m.labels)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.pop("segmentation"), "seg.yaml: segmentation: required when kind is 'segmentation'"),
        (lambda d: d["labels"][0].pop("category"), "seg.yaml: labels.0.category: required"),
        (lambda d: d["segmentation"].pop("background_index"), "seg.yaml: segmentation.background_index:"),
        (
            lambda d: d["segmentation"].update(dimensions=3),
            "seg.yaml: segmentation.min_area_px: a 3-D model removes",
        ),
        (lambda d: d["segmentation"].update(min_area_px=-1), "seg.yaml: segmentation.min_area_px:"),
        (
            lambda d: d["labels"][1].update(index=0),
            "seg.yaml: labels.1.index: is segmentation.background_index",
        ),
        (lambda d: d["labels"][0].update(normal=True), "seg.yaml: labels.0.normal:"),
        (
            lambda d: d.update(heatmap={"method": "occlusion", "window": [8, 8], "stride": [8, 8]}),
            "heatmap.method",
        ),
        (lambda d: d["aggregation"].update(level="study"), "seg.yaml: aggregation.level:"),
        (lambda d: d["outputs"].update(activation="sigmoid"), "seg.yaml: segmentation.background_index:"),
    ],
)
def test_a_bad_segmentation_manifest_is_refused_naming_the_field(change, field: str) -> None:
    data = copy.deepcopy(good())
    change(data)
    assert field in refused(data)


def test_a_classifier_with_a_segmentation_section_is_refused() -> None:
    data = yaml.safe_load((ONNX_ROOT / "ct-liver" / "manifest.yaml").read_text())
    data["segmentation"] = good()["segmentation"]
    assert "seg.yaml: segmentation: only a segmentation model has this section" in refused(data)


def test_argmax_threshold_and_small_components() -> None:
    m = parse_manifest(good(), "seg.yaml")  # background 0, cyst 1, mass 2, thresholds 0.5, min area 6
    probs = np.zeros((3, 20, 20), dtype=np.float32)
    probs[0] = 1.0
    probs[:, 2:6, 2:6] = [[[0.1]], [[0.8]], [[0.1]]]  # 16 px cyst
    probs[:, 10:12, 10:12] = [[[0.1]], [[0.1]], [[0.8]]]  # 4 px mass: under min_area_px
    probs[:, 15:19, 15:19] = [[[0.2]], [[0.35]], [[0.45]]]  # mass wins argmax but is under 0.5
    masks = segment_masks(m, probs)
    assert masks.shape == (2, 20, 20)
    assert masks[0].sum() == 16 and masks[0][2:6, 2:6].all()
    assert not masks[1].any()
    kept = remove_small_components(np.pad(np.ones((3, 3), bool), 5), 9)
    assert kept.sum() == 9 and not remove_small_components(kept, 10).any()
    assert dice(masks[0], masks[0]) == 1.0 and dice(masks[1], masks[1]) == 1.0
    assert dice(masks[0], ~masks[0]) == 0.0


def test_sigmoid_labels_may_overlap() -> None:
    data = good()
    data["outputs"]["activation"] = "sigmoid"
    data["segmentation"].pop("background_index")
    data["labels"][0]["index"], data["labels"][1]["index"] = 0, 1
    m = parse_manifest(data, "seg.yaml")
    probs = np.zeros((2, 10, 10), dtype=np.float32)
    probs[:, 2:8, 2:8] = 0.9
    masks = segment_masks(m, probs)
    assert masks[0].sum() == masks[1].sum() == 36


@pytest.fixture(scope="module")
def seg_model():
    registry = load_registry(ONNX_ROOT, strict=True)
    model = registry.get("ct-liver-seg")
    return model, create_session(model, RuntimeConfig(intra_op_threads=2, inter_op_threads=1))


def test_the_bundled_model_is_labelled_and_small(seg_model) -> None:
    model, _ = seg_model
    m = model.manifest
    assert m.kind == "segmentation" and m.research_use_only
    assert "not for diagnosis" in m.intended_use.lower() and "synthetic" in m.description.lower()
    assert m.provenance.training_script.startswith("models/train/train_seg.py")
    assert m.provenance.metrics["heldout_dice_lesion"] >= 0.7
    assert model.onnx_path.stat().st_size < 2 * 1024 * 1024
    card = (ONNX_ROOT / "ct-liver-seg" / "MODEL_CARD.md").read_text()
    assert "not for diagnosis" in card.lower() and "dice" in card.lower()


def test_dice_on_fresh_phantoms_through_analyse(seg_model, tmp_path: Path) -> None:
    model, session = seg_model
    scores = []
    for seed, label in ((7100, "malignant"), (7101, "benign"), (7102, "malignant"), (7103, "benign")):
        folder = tmp_path / str(seed)
        truth_study = render_study("ct", seed, label, slices=16, size=128)
        truth = generate_study("ct", folder, seed, label, write_masks=False, slices=16, size=128)
        files = [folder / inst.file for inst in truth.instances]
        result, _ = analyse(
            model,
            session,
            files,
            level="series",
            uid_seed=f"t{seed}",
            watch=Stopwatch(time.monotonic() + 300),
        )
        assert result.segmentation is not None
        by_uid = {f.sop_instance_uid: f for f in result.segmentation.frames}
        predicted, expected = [], []
        for inst, image in zip(truth.instances, truth_study.images, strict=True):
            uid = str(pydicom.dcmread(folder / inst.file, stop_before_pixels=True).SOPInstanceUID)
            frame = by_uid[uid]
            predicted.append(
                frame.masks.any(axis=0) if frame.masks is not None else np.zeros((128, 128), bool)
            )
            expected.append(image.mask > 0)
        # area: the largest cross-section; volume: every slice's area times the slice spacing
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        pixel_area = float(first.PixelSpacing[0]) * float(first.PixelSpacing[1])
        gap = float(truth_study.geometry["slice_thickness_mm"])
        counts = np.stack(predicted).reshape(len(predicted), -1).sum(axis=1)
        (found,) = [s for s in result.segmentation.segments if s.present]
        assert found.pixels == int(counts.sum())
        assert found.area_mm2 == pytest.approx(counts.max() * pixel_area, rel=1e-6)
        assert found.volume_mm3 == pytest.approx(counts.sum() * pixel_area * gap, rel=1e-4)
        score = dice(np.stack(predicted), np.stack(expected))
        scores.append(score)
        positive = {f.label for f in result.findings if f.positive}
        assert positive, f"seed {seed}: no segment found"
        assert ("mass" if label == "malignant" else "cyst") in positive
    assert float(np.mean(scores)) >= MIN_LESION_DICE, scores
    assert min(scores) >= MIN_STUDY_DICE, scores


def test_a_normal_phantom_has_no_segment(seg_model, tmp_path: Path) -> None:
    model, session = seg_model
    truth = generate_study("ct", tmp_path, 7104, "normal", write_masks=False, slices=16, size=128)
    files = [tmp_path / inst.file for inst in truth.instances]
    result, _ = analyse(
        model, session, files, level="series", uid_seed="t7104", watch=Stopwatch(time.monotonic() + 300)
    )
    assert result.segmentation is not None and not result.segmentation.present
    assert not any(f.positive or f.triage for f in result.findings)
    assert all(frame.masks is None for frame in result.segmentation.frames)
