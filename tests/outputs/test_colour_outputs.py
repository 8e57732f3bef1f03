"""Outputs over colour photographs (issue 20): the heatmap SC keeps the photograph's own colours
(RGB, dciodvfy clean), the SR's findings carry a Finding Site for eye/retina, skin and blood
(from the source's AnatomicRegionSequence, else the modality's default, with laterality), and the
colour presentation state (CSPS) still builds over these sources."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.inference.decode import decode
from node.inference.prepared import display_image
from node.outputs.gsps import build_presentation_states
from node.outputs.sc import LOW, build_heatmap_scs, render_overlay
from node.outputs.sr import build_sr, finding_site
from node.types import AnalysisResult, Code
from tests.colour import _code, colour_dataset, write
from tests.outputs.fabricate import IDENTITY, Spot, make_result, score
from tests.outputs.srtree import children, name_of, walk
from tests.outputs.test_real_sources import our_errors
from tests.outputs.tools import SrValidation, dsrdump, need_pixelmed

CSPS = "1.2.840.10008.5.1.4.1.1.11.2"
LESION = Code("372244006", "SCT", "Malignant melanoma")


def colour_result(ds: Dataset, spot: tuple[int, int] = (40, 70)) -> AnalysisResult:
    """A positive finding with a hotspot at ``spot`` on ``ds``, displayed in its own colours."""
    result = make_result([ds], [score("lesion", LESION, 0.9)], [Spot(0, "lesion", spot[0], spot[1], 6.0)])
    image = dataclasses.replace(result.images[0], display=display_image(decode(ds)))
    return dataclasses.replace(result, images=(image,))


@pytest.fixture(scope="module")
def sources() -> dict[str, Dataset]:
    return {
        "fundus": colour_dataset("fundus", encoding="YBR_FULL_422"),
        "derm": colour_dataset("derm", encoding="JPEG"),
        "smear": colour_dataset("smear", encoding="RGB", planar=1),
    }


def test_display_of_a_colour_image_is_its_rgb(sources):
    for ds in sources.values():
        shown = display_image(decode(ds))
        assert shown.shape == (ds.Rows, ds.Columns, 3) and shown.dtype == np.uint8
        np.testing.assert_array_equal(shown, decode(ds).pixels[0])


def test_a_16_bit_colour_image_is_displayed_in_8_bits():
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_16bit.dcm"))
    shown = display_image(decode(ds))
    expected = np.floor(ds.pixel_array.astype(np.float64) * 255 / 65535 + 0.5)
    np.testing.assert_array_equal(shown, expected)


@pytest.mark.parametrize("kind", ["fundus", "derm", "smear"])
def test_heatmap_sc_over_a_colour_source_keeps_its_colours(tmp_path: Path, sources, kind):
    ds = sources[kind]
    result = colour_result(ds)
    (sc,) = build_heatmap_scs(result, {str(ds.SOPInstanceUID): ds}, IDENTITY)
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
    assert str(sc.StudyInstanceUID) == str(ds.StudyInstanceUID)
    assert "colour source image" in sc.DerivationDescription
    path = tmp_path / f"{kind}-sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert our_errors(path, ds) == []

    # where the heatmap is below LOW the picture is the photograph, scaled, in colour
    source_rgb = display_image(decode(ds))
    scale = 512 / max(ds.Rows, ds.Columns)
    height, width = round(ds.Rows * scale), round(ds.Columns * scale)
    pixels = pydicom.dcmread(path).pixel_array[:height, :width].astype(int)
    expected = cv2.resize(source_rgb, (width, height), interpolation=cv2.INTER_LINEAR).astype(int)
    heat = cv2.resize(result.images[0].heatmaps[0].values, (width, height), interpolation=cv2.INTER_LINEAR)
    cold = heat < LOW * 0.9
    assert cold.mean() > 0.5
    assert np.abs(pixels[cold] - expected[cold]).max() <= 1
    assert np.abs(pixels[cold][:, 0] - pixels[cold][:, 1]).mean() > 10  # not grey
    # and the hotspot is coloured by the heatmap (inferno), not the photograph
    hot = heat > 0.9
    assert np.abs(pixels[hot] - expected[hot]).mean() > 20


@pytest.mark.parametrize(("kind", "part"), [("derm", "SKIN"), ("smear", "BLOOD")])
def test_heatmap_sc_of_skin_or_blood_says_its_laterality_is_unknown(tmp_path: Path, kind, part):
    """Skin and blood are neither paired nor (to dciodvfy) unpaired: the SC's General Series
    Laterality is present and empty (unknown), not left out, so dciodvfy finds no missing 2C."""
    ds = colour_dataset(kind, encoding="RGB")
    ds.BodyPartExamined = part
    ds.Laterality = None
    (sc,) = build_heatmap_scs(colour_result(ds), {str(ds.SOPInstanceUID): ds}, IDENTITY)
    assert sc.BodyPartExamined == part and "Laterality" in sc and not sc.Laterality
    path = tmp_path / f"{kind}-sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert our_errors(path, ds) == []


@pytest.mark.parametrize("kind", ["derm", "smear"])
def test_outputs_over_skin_and_smear_phantoms_are_dciodvfy_clean(tmp_path: Path, kind):
    """node.synth's dermoscopy (SKIN) and blood smear (BLOOD, with its Specimen module)
    photographs: the heatmap SC says its Laterality is unknown; the CSPS over the smear copies the
    specimen and so carries no Laterality; dciodvfy finds no node-caused error in either."""
    from node.synth import generate_study

    truth = generate_study(kind, tmp_path / "src", seed=5, size=96, write_masks=False)
    ds = pydicom.dcmread(tmp_path / "src" / truth.instances[0].file)
    result = colour_result(ds, spot=(40, 40))
    (sc,) = build_heatmap_scs(result, {str(ds.SOPInstanceUID): ds}, IDENTITY)
    (state,) = build_presentation_states(result, [ds], IDENTITY)
    assert "Laterality" in sc and not sc.Laterality
    assert ("Laterality" in state) == (kind == "derm")
    for name, out in (("sc", sc), ("csps", state)):
        path = tmp_path / f"{name}.dcm"
        out.save_as(path, enforce_file_format=True)
        assert our_errors(path, ds) == [], name


def test_render_overlay_refuses_a_two_channel_display():
    result = colour_result(colour_dataset("derm"))
    with pytest.raises(Exception, match=r"\(rows, cols, 3\) RGB"):
        render_overlay(np.zeros((8, 8, 2), np.uint8), result.images[0].heatmaps[0], None, result.algorithm)


@pytest.mark.parametrize(
    ("kind", "attrs", "site", "laterality"),
    [
        ("fundus", {}, ("81745001", "Eye"), ("24028007", "Right")),  # the source's anatomy, its side
        (
            "fundus",
            {"AnatomicRegionSequence": None, "ImageLaterality": "L"},
            ("5665001", "Retina"),
            ("7771000", "Left"),
        ),
        ("derm", {}, ("39937001", "Skin"), None),
        ("derm", {"Modality": "DMS", "AnatomicRegionSequence": None}, ("39937001", "Skin"), None),
        ("smear", {}, ("87612001", "Blood"), None),  # "Thin blood smear" in the description
        (
            "smear",
            {"AnatomicRegionSequence": [_code("87612001", "SCT", "Blood")], "SeriesDescription": "x"},
            ("87612001", "Blood"),
            None,
        ),
    ],
)
def test_sr_findings_carry_the_finding_site(tmp_path: Path, kind, attrs, site, laterality):
    ds = colour_dataset(kind, **attrs)
    sr = build_sr(colour_result(ds), [ds], IDENTITY)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert our_errors(path, ds) == []
    assert dsrdump(path).returncode == 0
    sites = [item for item in walk(sr) if name_of(item) == ("363698007", "SCT")]  # Finding Site
    assert len(sites) == 1
    code = sites[0].ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodeMeaning) == site
    sides = children(sites[0], "272741003", "SCT")  # Laterality
    if laterality is None:
        assert sides == []
    else:
        assert (
            sides[0].ConceptCodeSequence[0].CodeValue,
            sides[0].ConceptCodeSequence[0].CodeMeaning,
        ) == laterality
    # melanoma's probability is a probability of cancer
    assert any(name_of(item) == ("111047", "DCM") for item in walk(sr))


def test_no_finding_site_is_guessed():
    assert finding_site(colour_dataset("derm", AnatomicRegionSequence=None)) is None  # XC: anything
    assert finding_site(colour_dataset("smear", SeriesDescription="Liver H&E", Modality="SM")) is None
    ct = colour_dataset("derm", Modality="CT")  # radiology SRs are unchanged
    assert finding_site(ct) is None


@pytest.mark.parametrize("kind", ["fundus", "derm", "smear"])
def test_colour_presentation_state_over_the_photographs(tmp_path: Path, sources, kind):
    ds = sources[kind]
    (state,) = build_presentation_states(colour_result(ds), [ds], IDENTITY)
    assert str(state.SOPClassUID) == CSPS and len(state.ICCProfile) > 128
    path = tmp_path / "csps.dcm"
    state.save_as(path, enforce_file_format=True)
    assert our_errors(path, ds) == []
    refs = state.ReferencedSeriesSequence[0].ReferencedImageSequence
    assert str(refs[0].ReferencedSOPInstanceUID) == str(ds.SOPInstanceUID)
    write(ds, tmp_path / "src.dcm")


def test_pixelmed_validates_the_srs_with_finding_sites(tmp_path: Path):
    """PixelMed's DicomSRValidator: no errors in the TID 1500 reports with Finding Site rows."""
    need_pixelmed()
    paths = []
    for kind in ("fundus", "derm", "smear"):
        ds = colour_dataset(kind)
        path = tmp_path / f"{kind}-sr.dcm"
        build_sr(colour_result(ds), [ds], IDENTITY).save_as(path, enforce_file_format=True)
        paths.append(path)
    validation = SrValidation(paths)
    try:
        reports = validation.reports()
    finally:
        validation.close()
    for path in paths:
        report = reports[str(path)]
        assert not report.errors, report.text
        assert not [w for w in report.warnings if "363698007" in w or "Finding Site" in w], report.text
