"""Heatmap secondary captures: valid by dciodvfy, one new series in the source study, the heatmap
actually drawn over the grey image, a legend and the burned-in text."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from node.outputs import OutputError
from node.outputs.sc import HIGH, LOW, MAX_SIDE, MIN_SIDE, build_heatmap_scs
from node.types import Heatmap, ImageResult
from tests.outputs.conftest import CASES, Case
from tests.outputs.fabricate import IDENTITY, algorithm
from tests.outputs.tools import dciodvfy

#: How many SCs each case makes: one per shown image for the positive labels.
EXPECTED_COUNT = {"ct": 2, "mr": 1, "dx": 1, "mg": 4, "mf": 1}


def scale_of(rows: int, cols: int) -> float:
    """The factor the writer applies to a source image of this size."""
    long_side = max(rows, cols)
    if long_side > MAX_SIDE:
        return MAX_SIDE / long_side
    if long_side < MIN_SIDE:
        return MIN_SIDE / long_side
    return 1.0


def shown(case: Case, sc: Dataset) -> tuple[ImageResult, Heatmap]:
    """The image result and heatmap an SC shows (by its Source Image Sequence and comments)."""
    uid = str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
    image = next(im for im in case.result.images if im.sop_instance_uid == uid)
    heatmap = next(h for h in image.heatmaps if f"AI heatmap for {h.label} " in sc.ImageComments)
    return image, heatmap


def parts(case: Case, sc: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(image area, legend panel, text band, scale) of an SC's pixels."""
    image, _ = shown(case, sc)
    source = case.by_uid[image.sop_instance_uid]
    scale = scale_of(int(source.Rows), int(source.Columns))
    height, width = round(int(source.Rows) * scale), round(int(source.Columns) * scale)
    pixels = sc.pixel_array
    return pixels[:height, :width], pixels[:height, width:], pixels[height:], scale


def is_grey(rgb: np.ndarray) -> np.ndarray:
    """Where the three channels are equal."""
    rgb = rgb.astype(np.int16)
    return (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])


@pytest.mark.parametrize("name", CASES)
def test_dciodvfy_reports_no_errors(cases: dict[str, Case], name: str) -> None:
    files = cases[name].written("sc")
    assert len(files) == EXPECTED_COUNT[name]
    for path in files:
        report = dciodvfy(path)
        assert not report.errors, report.text


@pytest.mark.parametrize("name", CASES)
def test_one_new_series_in_the_source_study(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    source_series = {str(ds.SeriesInstanceUID) for ds in case.sources}
    series = {str(sc.SeriesInstanceUID) for sc in case.scs}
    assert len(series) == 1
    assert series.isdisjoint(source_series | {str(case.sr.SeriesInstanceUID)})  # type: ignore[union-attr]
    assert series.isdisjoint({str(pm.SeriesInstanceUID) for pm in case.pms})
    assert len({str(sc.SOPInstanceUID) for sc in case.scs}) == len(case.scs)
    assert [int(sc.InstanceNumber) for sc in case.scs] == list(range(1, len(case.scs) + 1))
    for sc in case.scs:
        assert sc.StudyInstanceUID == case.sources[0].StudyInstanceUID
        assert sc.PatientID == case.sources[0].get("PatientID", "")
        assert sc.SeriesDescription == "AI heatmap - Demo Model 1.2.0 - not for diagnosis"


@pytest.mark.parametrize("name", CASES)
def test_secondary_capture_attributes(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    for sc, path in zip(case.scs, case.written("sc"), strict=True):
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert sc.ConversionType == "WSD"
        assert sc.BurnedInAnnotation == "YES"
        assert sc.RecognizableVisualFeatures == "YES"
        assert sc.PhotometricInterpretation == "RGB"
        assert sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
        assert (
            pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            == ExplicitVRLittleEndian
        )
        assert "PixelSpacing" not in sc
        assert sc.DeviceUID == IDENTITY.device_uid
        assert any(e.ManufacturerModelName == "Demo Model" for e in sc.ContributingEquipmentSequence)
        image, heatmap = shown(case, sc)
        (ref,) = sc.SourceImageSequence
        source = case.by_uid[image.sop_instance_uid]
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        if image.frame is not None:
            assert ref.ReferencedFrameNumber == image.frame
        else:
            assert "ReferencedFrameNumber" not in ref
        assert heatmap.label in sc.DerivationDescription
        assert sc.DerivationCodeSequence[0].CodeValue in {"130402", "130403", "130404"}


def test_laterality_follows_the_body_part(cases: dict[str, Case]) -> None:
    assert "Laterality" not in cases["dx"].scs[0]  # chest: unpaired, not allowed
    # both breasts in one series: present and empty (unknown)
    assert all("Laterality" in sc and not sc.Laterality for sc in cases["mg"].scs)
    assert all(sc.BodyPartExamined == "BREAST" for sc in cases["mg"].scs)


@pytest.mark.parametrize("name", CASES)
def test_heatmap_is_drawn_where_it_is_hot_and_grey_elsewhere(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    hot_seen = False
    for sc in case.scs:
        image, heatmap = shown(case, sc)
        area, _, _, scale = parts(case, sc)
        hotspot = heatmap.hotspot
        if hotspot is not None and hotspot.peak_value > HIGH:
            r, c = (
                round((hotspot.peak_row + 0.5) * scale - 0.5),
                round((hotspot.peak_col + 0.5) * scale - 0.5),
            )
            peak = area[r, c].astype(int)
            assert peak.max() - peak.min() > 40, f"no colour at the hotspot: {peak}"
            hot_seen = True
        # far from any heat the picture is the grey display image
        values = np.asarray(heatmap.values)
        cold_rows, cold_cols = np.nonzero(values < LOW / 4)
        assert len(cold_rows)
        pick = np.linspace(0, len(cold_rows) - 1, 50).astype(int)
        for r, c in zip(cold_rows[pick], cold_cols[pick], strict=True):
            rr, cc = min(round(r * scale), area.shape[0] - 1), min(round(c * scale), area.shape[1] - 1)
            if values[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4].max() < LOW / 2:
                assert is_grey(area[rr, cc]), (r, c, area[rr, cc])
        # and it is the source image: grey levels follow the display image
        display = image.display
        assert display is not None
        small = area[:: max(1, round(scale)), :: max(1, round(scale))]
        grey_share = is_grey(small).mean()
        assert grey_share > 0.5
    assert hot_seen == any(f.positive for f in case.result.findings)


@pytest.mark.parametrize("name", CASES)
def test_legend_and_burned_in_text(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    for sc in case.scs:
        _, legend, band, _ = parts(case, sc)
        bar = legend[:, 6:22].astype(int)
        rows = np.nonzero(bar.sum(axis=(1, 2)))[0]
        assert len(rows) > legend.shape[0] // 2, "no colour bar"
        top, middle, bottom = bar[rows[0], 8], bar[rows[len(rows) // 2], 8], bar[rows[-1], 8]
        assert top.sum() > 500  # inferno at 1.0: pale yellow
        assert bottom.sum() < 60  # inferno at 0.0: near black
        assert middle.max() - middle.min() > 40  # a colour, not grey
        # tick labels are white text on the panel
        assert (legend.min(axis=2) > 200).sum() > 10
        # the text band: white text, and the yellow research warning
        white = (band.min(axis=2) > 200).sum()
        yellow = ((band[..., 0] > 200) & (band[..., 1] > 150) & (band[..., 2] < 80)).sum()
        assert white > 100 and yellow > 50


def test_no_warning_line_for_clinical_models(cases: dict[str, Case]) -> None:
    case = cases["dx"]
    result = dataclasses.replace(case.result, algorithm=algorithm(research=False))
    (sc,) = build_heatmap_scs(result, case.by_uid, IDENTITY)
    _, _, band, _ = parts(case, sc)
    yellow = ((band[..., 0] > 200) & (band[..., 1] > 150) & (band[..., 2] < 80)).sum()
    assert yellow == 0
    assert sc.SeriesDescription == "AI heatmap - Demo Model 1.2.0"
    assert "not for diagnosis" not in sc.ImageComments.lower()


def test_uids_are_deterministic_per_seed(cases: dict[str, Case]) -> None:
    case = cases["ct"]
    again = build_heatmap_scs(case.result, case.by_uid, IDENTITY)
    other = build_heatmap_scs(dataclasses.replace(case.result, uid_seed="another-job"), case.by_uid, IDENTITY)
    first = [(sc.SeriesInstanceUID, sc.SOPInstanceUID) for sc in case.scs]
    assert [(sc.SeriesInstanceUID, sc.SOPInstanceUID) for sc in again] == first
    assert not {uid for pair in first for uid in pair} & {
        uid for sc in other for uid in (sc.SeriesInstanceUID, sc.SOPInstanceUID)
    }
    assert np.array_equal(again[0].pixel_array, case.scs[0].pixel_array)


def test_missing_source_is_an_output_error(cases: dict[str, Case]) -> None:
    with pytest.raises(OutputError):
        build_heatmap_scs(cases["ct"].result, {}, IDENTITY)
