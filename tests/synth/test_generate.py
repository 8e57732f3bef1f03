"""Writing studies: DICOM content, UIDs, reproducible bytes, truth.json and masks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.config
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from node.synth import StudyTruth, generate_studies, generate_study, render_study

from .conftest import KINDS, POSITIVE, SMALL

SOP_CLASSES = {
    "cxr": {"1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"},
    "mammo": {"1.2.840.10008.5.1.4.1.1.1.2"},
    "ct": {"1.2.840.10008.5.1.4.1.1.2"},
    "mr": {"1.2.840.10008.5.1.4.1.1.4"},
}


@pytest.fixture(autouse=True)
def strict_pydicom(monkeypatch):
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)


def _uids(truth: StudyTruth) -> set[str]:
    return (
        {truth.study_instance_uid}
        | {s["series_instance_uid"] for s in truth.series}
        | {i.sop_instance_uid for i in truth.instances}
    )


@pytest.mark.parametrize("kind", KINDS)
def test_written_instances(kind, tmp_path):
    truth = generate_study(kind, tmp_path / "s", 21, POSITIVE[kind], **SMALL[kind])
    rendered = render_study(kind, 21, POSITIVE[kind], **SMALL[kind])
    assert truth.kind == kind and truth.seed == 21
    assert len(truth.instances) == len(rendered.images)
    sops = set()
    frames = set()
    for inst, image in zip(truth.instances, rendered.images, strict=True):
        path = tmp_path / "s" / inst.file
        raw = path.read_bytes()
        assert raw[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.SOPClassUID in SOP_CLASSES[kind]
        assert ds.SOPInstanceUID == inst.sop_instance_uid
        assert ds.StudyInstanceUID == truth.study_instance_uid
        assert ds.SeriesInstanceUID == inst.series_instance_uid
        assert ds.Manufacturer == "pacs-node synth"
        assert str(ds.PatientName).startswith("SYNTH^PHANTOM^")
        assert ds.PatientID.startswith("SYN") and ds.PatientID == truth.patient_id
        assert ds.AccessionNumber == truth.accession_number and ds.AccessionNumber.startswith("SYNACC")
        assert len(ds.StudyDate) == 8 and len(ds.StudyTime) == 6
        assert ds.BitsAllocated == 16 and ds.BitsStored == image.bits_stored
        assert ds.PhotometricInterpretation == image.photometric
        assert np.array_equal(ds.pixel_array, image.pixels)
        assert (ds.Rows, ds.Columns) == (inst.rows, inst.columns)
        sops.add(ds.SOPInstanceUID)
        frames.add(ds.get("FrameOfReferenceUID"))
        if kind in ("ct", "mr"):
            assert ds.ImageOrientationPatient == [1, 0, 0, 0, 1, 0]
            assert ds.PixelSpacing[0] == pytest.approx(image.pixel_spacing[0], rel=1e-5)
    assert len(sops) == len(truth.instances)
    if kind in ("ct", "mr"):
        assert len(frames) == 1 and None not in frames
    if kind == "ct":
        ds0 = pydicom.dcmread(tmp_path / "s" / truth.instances[0].file)
        ds1 = pydicom.dcmread(tmp_path / "s" / truth.instances[1].file)
        assert ds0.PixelRepresentation == 1 and ds0.RescaleIntercept == -1024 and ds0.RescaleSlope == 1
        step = ds0.ImagePositionPatient[2] - ds1.ImagePositionPatient[2]
        assert step == pytest.approx(float(ds0.SliceThickness))
    if kind == "mammo":
        seen = set()
        for inst in truth.instances:
            ds = pydicom.dcmread(tmp_path / "s" / inst.file)
            assert ds.ImageLaterality == inst.attributes["laterality"]
            assert ds.ViewPosition == inst.attributes["view"]
            assert ds.ViewCodeSequence[0].CodeValue in ("399162004", "399368009")
            seen.add((ds.ImageLaterality, ds.ViewPosition))
        assert seen == {("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO")}


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes(kind, tmp_path):
    a = generate_study(kind, tmp_path / "a", 5, **SMALL[kind])
    b = generate_study(kind, tmp_path / "b", 5, **SMALL[kind])
    assert a.labels == b.labels
    for ia, ib in zip(a.instances, b.instances, strict=True):
        assert (tmp_path / "a" / ia.file).read_bytes() == (tmp_path / "b" / ib.file).read_bytes()
    assert (tmp_path / "a" / "truth.json").read_bytes() == (tmp_path / "b" / "truth.json").read_bytes()


def test_uids_fresh_per_study_and_rooted(tmp_path):
    a = generate_study("mr", tmp_path / "a", 1, "normal", slices=3, size=64)
    b = generate_study("mr", tmp_path / "b", 2, "normal", slices=3, size=64)
    assert not _uids(a) & _uids(b)
    c = generate_study("ct", tmp_path / "c", 1, "normal", slices=3, size=64)  # same seed, other kind
    assert not _uids(a) & _uids(c)
    rooted = generate_study("mr", tmp_path / "d", 1, "normal", slices=3, size=64, uid_root="1.2.826.0.1.99")
    assert all(uid.startswith("1.2.826.0.1.99.") and len(uid) <= 64 for uid in _uids(rooted))
    r1 = generate_study("mr", tmp_path / "e", 1, "normal", slices=3, size=64, seeded_uids=False)
    r2 = generate_study("mr", tmp_path / "f", 1, "normal", slices=3, size=64, seeded_uids=False)
    assert not _uids(r1) & _uids(r2)
    p1 = pydicom.dcmread(tmp_path / "e" / r1.instances[0].file).pixel_array
    p2 = pydicom.dcmread(tmp_path / "f" / r2.instances[0].file).pixel_array
    assert np.array_equal(p1, p2)
    with pytest.raises(ValueError, match="UID root"):
        generate_study("mr", tmp_path / "g", 1, "normal", slices=2, size=64, uid_root="1.2.abc")


@pytest.mark.parametrize("kind", KINDS)
def test_truth_json_and_masks(kind, tmp_path):
    truth = generate_study(kind, tmp_path, 33, POSITIVE[kind], **SMALL[kind])
    data = json.loads((tmp_path / "truth.json").read_text())
    assert data["format"] == "pacs-node-synth-truth/1"
    assert data["kind"] == kind and data["labels"] == list(truth.labels)
    loaded = StudyTruth.load(tmp_path)
    assert loaded.to_dict() == truth.to_dict()
    assert loaded.files == [tmp_path / i.file for i in truth.instances]
    lesion_ids = {les["id"] for les in data["lesions"]}
    with_boxes = 0
    for inst in data["instances"]:
        assert set(inst["labels"]) <= set(data["labels"]) | {"normal"}
        if not inst["boxes"]:
            assert inst["mask"] is None
            assert inst["labels"] == ([] if kind == "cxr" else ["normal"])
            continue
        with_boxes += 1
        mask = cv2.imread(str(tmp_path / inst["mask"]), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (inst["rows"], inst["columns"]) and mask.dtype == np.uint8
        for box in inst["boxes"]:
            assert box["lesion"] in lesion_ids and box["label"] in inst["labels"]
            assert (mask[box["y0"] : box["y1"], box["x0"] : box["x1"]] == box["lesion"]).any()
        assert set(np.unique(mask)) - {0} <= {b["lesion"] for b in inst["boxes"]}
    assert with_boxes >= 1


def test_no_masks_option(tmp_path):
    truth = generate_study("mr", tmp_path, 4, "tumour", slices=6, size=64, write_masks=False)
    assert all(i.mask is None for i in truth.instances)
    assert not (tmp_path / "masks").exists()


def test_generate_studies_balanced(tmp_path):
    truths = generate_studies("cxr", 8, tmp_path, 3, scale=0.1)
    tally = Counter(tuple(t.labels) for t in truths)
    assert tally == {(): 2, ("tuberculosis",): 2, ("pneumonia",): 2, ("tuberculosis", "pneumonia"): 2}
    assert len({t.seed for t in truths}) == 8
    assert len({t.study_instance_uid for t in truths}) == 8
    index = json.loads((tmp_path / "cxr-s3-index.json").read_text())
    assert [e["dir"] for e in index] == [f"cxr-s3-{i:05d}" for i in range(8)]
    # a study rebuilt alone from its recorded seed and labels is identical
    t = truths[5]
    again = generate_study("cxr", tmp_path / "again", t.seed, t.labels, scale=0.1)
    assert again.instances[0].sop_instance_uid == t.instances[0].sop_instance_uid
    assert (tmp_path / "again" / again.instances[0].file).read_bytes() == Path(t.files[0]).read_bytes()


def test_generate_studies_fixed_label(tmp_path):
    truths = generate_studies("mr", 2, tmp_path, 0, "tumour", slices=4, size=64)
    assert [t.labels for t in truths] == [["tumour"], ["tumour"]]
