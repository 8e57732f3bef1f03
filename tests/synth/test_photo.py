"""Colour photograph phantoms (issue 20): fundus (OP), dermoscopy (XC) and blood smear (GM) headers,
dciodvfy, ground truth against the pixels, JPEG baseline variant, determinism and the CLI."""

from __future__ import annotations

import subprocess

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from typer.testing import CliRunner

from node.cli import app
from node.inference.decode import decode
from node.synth import StudyTruth, generate_studies, generate_study, render_study
from tests.helpers import need

SIZE = 160
HEADERS = {
    # kind: SOP class, modality, anatomic region code, words in the series description
    "fundus": ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", "5665001", "fundus"),
    "derm": ("1.2.840.10008.5.1.4.1.1.77.1.4", "XC", "39937001", "dermoscopy"),
    "smear": ("1.2.840.10008.5.1.4.1.1.77.1.2", "GM", "87612001", "blood smear"),
}
POSITIVE = {"fundus": "referable_dr", "derm": "melanoma", "smear": "plasmodium"}
NEGATIVE = {"fundus": "normal", "derm": "naevus", "smear": "normal"}
KINDS = tuple(HEADERS)


@pytest.mark.parametrize("kind", KINDS)
def test_headers_and_pixels(kind, tmp_path):
    sop_class, modality, region, words = HEADERS[kind]
    truth = generate_study(kind, tmp_path, 5, POSITIVE[kind], size=SIZE)
    (inst,) = truth.instances
    ds = pydicom.dcmread(tmp_path / inst.file)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == sop_class and ds.Modality == modality
    assert words in ds.SeriesDescription.lower()
    assert ds.AnatomicRegionSequence[0].CodeValue == region
    assert ds.AnatomicRegionSequence[0].CodingSchemeDesignator == "SCT"
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration) == (3, "RGB", 0)
    assert (ds.BitsAllocated, ds.BitsStored, ds.Rows, ds.Columns) == (8, 8, SIZE, SIZE)
    if kind == "fundus":
        assert ds.ImageLaterality in ("R", "L")
        assert ds.ImageLaterality == inst.attributes["laterality"]
    if kind == "smear":
        assert ds.SpecimenDescriptionSequence[0].PrimaryAnatomicStructureSequence[0].CodeValue == "87612001"
    rendered = render_study(kind, 5, POSITIVE[kind], size=SIZE).images[0].pixels
    assert np.array_equal(ds.pixel_array, rendered)
    decoded = decode(tmp_path / inst.file)  # the node's own decoder sees the same RGB frame
    assert decoded.header.samples_per_pixel == 3
    assert np.array_equal(decoded.frame(0), rendered)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("jpeg", [False, True], ids=["rgb", "jpeg"])
def test_dciodvfy_reports_no_errors(kind, jpeg, tmp_path):
    dciodvfy = need("dciodvfy")
    for label in (POSITIVE[kind], NEGATIVE[kind]):
        truth = generate_study(kind, tmp_path / label, 9, label, size=SIZE, jpeg=jpeg)
        for path in truth.files:
            proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
            assert not errors, f"{kind} {label} {path.name}: " + "\n".join(errors)


@pytest.mark.parametrize("kind", KINDS)
def test_jpeg_variant_is_baseline_ybr_full_422_close_to_the_rgb(kind, tmp_path):
    truth = generate_study(kind, tmp_path, 3, POSITIVE[kind], size=SIZE, jpeg=True)
    ds = pydicom.dcmread(truth.files[0])
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.LossyImageCompression == "01"
    decoded = decode(truth.files[0]).frame(0).astype(np.int16)
    rgb = render_study(kind, 3, POSITIVE[kind], size=SIZE).images[0].pixels.astype(np.int16)
    assert decoded.shape == rgb.shape
    assert float(np.abs(decoded - rgb).mean()) < 4.0  # lossy, but the same picture in RGB


@pytest.mark.parametrize("kind", KINDS)
def test_truth_matches_the_mask_and_the_labels(kind, tmp_path):
    pos = generate_study(kind, tmp_path / "pos", 11, POSITIVE[kind], size=SIZE)
    neg = generate_study(kind, tmp_path / "neg", 11, NEGATIVE[kind], size=SIZE)
    assert pos.labels == [POSITIVE[kind]] and neg.labels == [NEGATIVE[kind]]
    (inst,) = StudyTruth.load(tmp_path / "pos").instances
    assert inst.labels == [POSITIVE[kind]] and inst.boxes and inst.mask
    mask = cv2.imread(str(tmp_path / "pos" / inst.mask), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (SIZE, SIZE)
    ids = {les["id"] for les in pos.lesions}
    assert set(np.unique(mask)) - {0} <= ids
    for box in inst.boxes:
        assert box["label"] == POSITIVE[kind]
        assert 0 <= box["x0"] < box["x1"] <= SIZE and 0 <= box["y0"] < box["y1"] <= SIZE
        ys, xs = np.nonzero(mask == box["lesion"])
        assert ys.size, f"lesion {box['lesion']} has no mask pixels"
        assert (
            box["x0"] <= xs.min() and xs.max() < box["x1"] and box["y0"] <= ys.min() and ys.max() < box["y1"]
        )
    (neg_inst,) = neg.instances
    if kind == "derm":  # every dermoscopy image shows a lesion: the naevus is boxed too
        assert [b["label"] for b in neg_inst.boxes] == ["naevus"] and neg_inst.labels == ["naevus"]
    else:
        assert neg_inst.boxes == [] and neg_inst.labels == ["normal"] and neg_inst.mask is None


@pytest.mark.parametrize("kind", KINDS)
def test_findings_change_the_pixels_where_the_boxes_are(kind):
    """The lesions are drawn where the truth says: the positive and negative renders of one seed
    differ inside the boxes far more than outside them (fundus, smear share everything else)."""
    pos = render_study(kind, 13, POSITIVE[kind], size=SIZE).images[0]
    neg = render_study(kind, 13, NEGATIVE[kind], size=SIZE).images[0]
    diff = np.abs(pos.pixels.astype(np.int16) - neg.pixels.astype(np.int16)).sum(axis=2)
    inside = np.zeros(diff.shape, dtype=bool)
    for b in pos.boxes:
        inside[b.y0 : b.y1, b.x0 : b.x1] = True
    assert diff[inside].mean() > 8 * max(diff[~inside].mean(), 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_study_other_seed_other_study(kind, tmp_path):
    a = generate_study(kind, tmp_path / "a", 31, None, size=96)
    b = generate_study(kind, tmp_path / "b", 31, None, size=96)
    c = generate_study(kind, tmp_path / "c", 32, POSITIVE[kind], size=96)
    assert (tmp_path / "a" / a.instances[0].file).read_bytes() == (
        tmp_path / "b" / b.instances[0].file
    ).read_bytes()
    assert a.to_dict() == b.to_dict()
    px_a = pydicom.dcmread(a.files[0]).pixel_array
    px_c = pydicom.dcmread(c.files[0]).pixel_array
    assert not np.array_equal(px_a, px_c)
    assert a.study_instance_uid != c.study_instance_uid


@pytest.mark.parametrize("kind", KINDS)
def test_balanced_batches(kind, tmp_path):
    truths = generate_studies(kind, 4, tmp_path, 2, size=64)
    assert sorted(t.labels[0] for t in truths) == sorted([POSITIVE[kind], NEGATIVE[kind]] * 2)


def test_fundus_laterality_puts_the_disc_on_the_nasal_side():
    for lat, right in (("R", True), ("L", False)):
        image = render_study("fundus", 4, "normal", size=SIZE, laterality=lat).images[0]
        assert image.attributes["laterality"] == lat
        assert (image.attributes["disc_px"][0] > SIZE / 2) == right
        assert (image.attributes["macula_px"][0] < image.attributes["disc_px"][0]) == right
    with pytest.raises(ValueError, match="laterality"):
        render_study("fundus", 4, "normal", size=SIZE, laterality="X")


def test_labels_outside_the_vocabulary_are_refused():
    for kind, bad in (("fundus", "melanoma"), ("derm", "normal"), ("smear", "tumour")):
        with pytest.raises(ValueError, match=kind):
            render_study(kind, 1, bad, size=64)


def test_cli_writes_colour_studies(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["synth", "smear", "--count", "2", "--out", str(tmp_path), "--size", "96", "--jpeg"]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 2 smear studies" in result.output
    files = sorted(tmp_path.glob("smear-s0-*/GM01_0001.dcm"))
    assert len(files) == 2
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    bad = runner.invoke(app, ["synth", "derm", "--out", str(tmp_path), "--laterality", "R"])
    assert bad.exit_code != 0 and "fundus only" in bad.output
