"""Parametric maps: valid by dciodvfy, the heatmaps as float data with the DCM visual-explanation
quantity, referencing their source; unsupported sources skipped with a reason in the log."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ParametricMapStorage

from node.outputs.pm import build_parametric_maps
from node.types import Heatmap, ImageResult
from tests.outputs.conftest import CASES, Case
from tests.outputs.fabricate import IDENTITY
from tests.outputs.tools import dciodvfy

#: One map per shown image (the multi-frame source: one for its shown frame).
EXPECTED_COUNT = {"ct": 2, "mr": 1, "dx": 1, "mg": 4, "mf": 1}
#: (code value, meaning) of the quantity for each case's heatmap method
EXPECTED_QUANTITY = {
    "ct": ("130403", "Gradient-weighted class activation"),  # gradcam
    "mr": ("130402", "Class activation"),  # cam
    "dx": ("130403", "Gradient-weighted class activation"),
    "mg": ("130404", "Saliency"),  # occlusion
    "mf": ("130403", "Gradient-weighted class activation"),
}
MAPPED = [name for name in CASES if EXPECTED_COUNT[name]]


def source_of(case: Case, pm: Dataset) -> tuple[Dataset, ImageResult]:
    """The source data set and image result a map was made from."""
    uid = str(pm.SourceImageSequence[0].ReferencedSOPInstanceUID)
    image = next(im for im in case.result.images if im.sop_instance_uid == uid)
    return case.by_uid[uid], image


def frame_group(pm: Dataset, index: int, keyword: str) -> Dataset:
    """A functional group macro of one frame: per-frame, else shared (one label: all shared)."""
    per_frame = pm.PerFrameFunctionalGroupsSequence[index]
    return per_frame.get(keyword) or pm.SharedFunctionalGroupsSequence[0].get(keyword)


@pytest.mark.parametrize("name", CASES)
def test_dciodvfy_reports_no_errors(cases: dict[str, Case], name: str) -> None:
    files = cases[name].written("pm")
    assert len(files) == EXPECTED_COUNT[name]
    for path in files:
        report = dciodvfy(path)
        assert not report.errors, report.text


@pytest.mark.parametrize("name", MAPPED)
def test_heatmaps_stored_as_float_values(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    for pm in case.pms:
        source, image = source_of(case, pm)
        assert pm.SOPClassUID == ParametricMapStorage
        assert "FloatPixelData" in pm and "PixelData" not in pm
        assert pm.BitsAllocated == 32
        assert (pm.Rows, pm.Columns) == (source.Rows, source.Columns)
        assert int(pm.NumberOfFrames) == len(image.heatmaps)
        frames = pm.pixel_array.reshape(len(image.heatmaps), pm.Rows, pm.Columns)
        for index, heatmap in enumerate(image.heatmaps):
            np.testing.assert_allclose(frames[index], heatmap.values, atol=1e-6)
            (mapping,) = frame_group(pm, index, "RealWorldValueMappingSequence")
            assert mapping.LUTLabel == heatmap.label.upper()
            assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
            assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0
            assert float(mapping.DoubleFloatRealWorldValueFirstValueMapped) == 0.0
            assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) == 1.0
            (quantity,) = mapping.QuantityDefinitionSequence
            concept = quantity.ConceptCodeSequence[0]
            assert (concept.CodeValue, concept.CodeMeaning) == EXPECTED_QUANTITY[name]
            assert concept.CodingSchemeDesignator == "DCM"


@pytest.mark.parametrize("name", MAPPED)
def test_references_and_series(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    series = {str(pm.SeriesInstanceUID) for pm in case.pms}
    assert len(series) == 1
    assert series.isdisjoint({str(ds.SeriesInstanceUID) for ds in case.sources})
    assert series.isdisjoint(
        {str(sc.SeriesInstanceUID) for sc in case.scs} | {str(case.sr.SeriesInstanceUID)}
    )  # type: ignore[union-attr]
    for pm in case.pms:
        source, _ = source_of(case, pm)
        assert pm.StudyInstanceUID == source.StudyInstanceUID
        assert pm.PatientID == source.get("PatientID", "")
        assert pm.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        (ref_series,) = pm.ReferencedSeriesSequence
        assert ref_series.SeriesInstanceUID == source.SeriesInstanceUID
        for index in range(int(pm.NumberOfFrames)):
            (derivation,) = frame_group(pm, index, "DerivationImageSequence")
            assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert "heatmaps by Demo Model 1.2.0" in derivation.DerivationDescription
            if "ImagePositionPatient" not in source:  # projection image: nominal geometry, said so
                assert "nominal plane geometry" in derivation.DerivationDescription
        assert pm.ContentQualification == "RESEARCH"
        assert pm.ContentLabel == "AI_HEATMAP"
        assert pm.SeriesDescription == "AI map - Demo Model 1.2.0 - not for diagnosis"
        assert pm.DeviceUID == IDENTITY.device_uid
        assert any(e.ManufacturerModelName == "Demo Model" for e in pm.ContributingEquipmentSequence)


def test_frame_of_reference(cases: dict[str, Case]) -> None:
    # a CT map shares its source's patient coordinate system ...
    for pm in cases["ct"].pms:
        source, _ = source_of(cases["ct"], pm)
        assert pm.FrameOfReferenceUID == source.FrameOfReferenceUID
    # ... a projection map has one of its own, shared with nothing
    dx_pm = cases["dx"].pms[0]
    assert dx_pm.FrameOfReferenceUID != cases["dx"].sources[0].get("FrameOfReferenceUID")
    assert dx_pm.FrameOfReferenceUID.startswith(IDENTITY.uid_root)
    assert all("Laterality" in pm and not pm.Laterality for pm in cases["mg"].pms)  # both breasts


def test_uids_are_deterministic_per_seed(cases: dict[str, Case]) -> None:
    case = cases["dx"]
    again = build_parametric_maps(case.result, case.sources, IDENTITY)
    other = build_parametric_maps(
        dataclasses.replace(case.result, uid_seed="another-job"), case.sources, IDENTITY
    )
    uids = [(pm.SeriesInstanceUID, pm.SOPInstanceUID, pm.FrameOfReferenceUID) for pm in case.pms]
    assert [(pm.SeriesInstanceUID, pm.SOPInstanceUID, pm.FrameOfReferenceUID) for pm in again] == uids
    assert not {u for t in uids for u in t} & {
        u for pm in other for u in (pm.SeriesInstanceUID, pm.SOPInstanceUID, pm.FrameOfReferenceUID)
    }


def test_unrepresentable_sources_are_skipped_with_a_reason(
    cases: dict[str, Case], caplog: pytest.LogCaptureFixture
) -> None:
    case = cases["ct"]
    first = case.result.images[0]
    small = tuple(dataclasses.replace(h, values=np.zeros((8, 8), np.float32)) for h in first.heatmaps)
    wrong_size: ImageResult = dataclasses.replace(first, heatmaps=small)
    result = dataclasses.replace(case.result, images=(wrong_size, *case.result.images[1:]))
    with caplog.at_level(logging.INFO, logger="node.outputs"):
        maps = build_parametric_maps(result, case.sources, IDENTITY)
    assert len(maps) == 1
    assert "heatmap 'nodule' is (8, 8), the source image is (128, 128)" in caplog.text


def test_values_outside_zero_to_one_are_clipped(cases: dict[str, Case]) -> None:
    case = cases["mr"]
    image = case.result.images[0]
    values = np.full(image.heatmaps[0].values.shape, 2.0, np.float32)
    values[0, 0] = np.nan
    wild = (Heatmap(label="nodule", values=values, method="gradcam"),)
    result = dataclasses.replace(case.result, images=(dataclasses.replace(image, heatmaps=wild),))
    (pm,) = build_parametric_maps(result, case.sources, IDENTITY)
    assert float(pm.pixel_array.max()) == 1.0 and float(pm.pixel_array.min()) == 0.0
