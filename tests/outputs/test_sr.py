"""The TID 1500 SR: valid by dciodvfy, PixelMed's DicomSRValidator and dsrdump, and carrying what
IHE AIR and the issue ask for (observer, procedure, evidence, one group per finding, regions)."""

from __future__ import annotations

import copy
import dataclasses
import io
import logging

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from node.outputs import OutputError
from node.outputs.pm import build_parametric_maps
from node.outputs.sc import build_heatmap_scs
from node.outputs.sr import build_sr
from node.types import AnalysisResult, LabelScore
from tests.outputs.conftest import CASES, Case
from tests.outputs.fabricate import IDENTITY, PNEUMONIA, algorithm
from tests.outputs.srtree import (
    child,
    children,
    code_designators,
    image_refs,
    measurement_groups,
    name_of,
    walk,
)
from tests.outputs.tools import Report, dciodvfy, dsrdump

#: Procedure reported when the source has no Procedure Code Sequence (members of CID 100)
EXPECTED_PROCEDURE = {
    "ct": "25045-6",
    "mr": "25056-3",
    "dx": "363679005",
    "mg": "363679005",
    "mf": "363679005",
}


def located_findings(result: AnalysisResult) -> set[str]:
    """Labels that are positive and have a hotspot on some shown image: these get an image region."""
    hot = {h.label for im in result.images for h in im.heatmaps if h.hotspot is not None}
    return {f.label for f in result.findings if f.positive and f.label in hot}


def group_of(sr: Dataset, label_code: str) -> Dataset:
    """The measurement group whose Finding is ``label_code``."""
    found = [
        g for g in measurement_groups(sr) if child(g, "121071").ConceptCodeSequence[0].CodeValue == label_code
    ]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("name", CASES)
def test_dciodvfy_reports_no_errors(cases: dict[str, Case], name: str) -> None:
    report = dciodvfy(cases[name].files["sr"])
    assert not report.errors, report.text


@pytest.mark.parametrize("name", CASES)
def test_pixelmed_validator_reports_no_errors(sr_reports: dict[str, Report], name: str) -> None:
    report = sr_reports[name]
    assert "Found Root Template TID_1500" in report.text, report.text
    assert "IOD validation complete" in report.text, report.text
    assert not report.errors, report.text
    # the only warning left: PixelMed 2022's TID 1501 has no row for the qualitative evaluation
    # CODE item (concept name = the finding's code) that later editions and highdicom allow
    for warning in report.warnings:
        assert 'Measurement Group")/CODE (' in warning and "Content Item not in template" in warning, warning


@pytest.mark.parametrize("name", CASES)
def test_dsrdump_prints_findings_probabilities_and_region(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    proc = dsrdump(case.files["sr"])
    assert proc.returncode == 0, proc.stderr
    complaints = [
        line
        for line in proc.stderr.splitlines()
        # dsrdump's own limitation, not a problem of the file: UTF-8 sources (pydicom's 2-frame SC)
        if line.strip() and "VR checker does not support this Specific Character Set" not in line
    ]
    assert not complaints, proc.stderr
    text = proc.stdout
    assert "Comprehensive 3D SR Document" in text
    assert '"Imaging Measurement Report"' in text
    assert "Verification Flag   : UNVERIFIED" in text
    located = located_findings(case.result)
    for finding in case.result.findings:
        verdict = '52101004,SCT,"Present"' if finding.positive else '272519000,SCT,"Absent"'
        assert f'<contains CODE:(,,"{finding.code.meaning}")=({verdict})>' in text
        if finding.label in located:
            assert f'"Finding")=({finding.code.value},{finding.code.scheme_designator},' in text
            assert f'="{finding.probability:g}" (1,UCUM,"no units")' in text
        else:  # in the Qualitative Evaluations, with its probability as text
            assert f'<contains TEXT:(,,"{finding.code.meaning}")=' in text
    assert text.count("<inferred from SCOORD:") == len(located)
    if located:
        assert "(POLYLINE," in text or "(POINT," in text
        assert "<selected from IMAGE:" in text
        assert '"Algorithm Name")="Demo Model"' in text
    assert "Research use only" in text


@pytest.mark.parametrize("name", CASES)
def test_document_header_and_equipment(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    sr, source = case.sr, case.sources[0]
    assert sr is not None
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID not in {str(ds.SeriesInstanceUID) for ds in case.sources}
    assert sr.Modality == "SR"
    assert sr.PatientID == source.get("PatientID", "")
    assert sr.PatientName == source.get("PatientName", "")
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert name_of(sr) == ("126000", "DCM")
    assert sr.SeriesDescription == "AI findings - Demo Model 1.2.0 - not for diagnosis"
    assert sr.DeviceUID == IDENTITY.device_uid
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if e.ManufacturerModelName == "Demo Model"]
    assert equipment.SoftwareVersions == "1.2.0"
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert equipment.DeviceUID.startswith(IDENTITY.uid_root)
    other_model = build_sr(
        dataclasses.replace(case.result, algorithm=algorithm(sha256="cd" * 32)), case.sources, IDENTITY
    )
    (changed,) = [e for e in other_model.ContributingEquipmentSequence if e.get("DeviceUID")]
    assert changed.DeviceUID != equipment.DeviceUID


@pytest.mark.parametrize("name", CASES)
def test_evidence_and_image_library_reference_the_sources(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    sr = case.sr
    assert sr is not None
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == case.sources[0].StudyInstanceUID
    referenced = {
        (str(series.SeriesInstanceUID), str(ref.ReferencedSOPInstanceUID), str(ref.ReferencedSOPClassUID))
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {
        (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID)) for ds in case.sources
    }
    in_library = {
        uid
        for library in children(sr, "111028")
        for item in walk(library)
        if item.ValueType == "IMAGE"
        for uid, _ in image_refs(item)
    }
    expected = {im.sop_instance_uid for im in case.result.images}
    if name == "mf":  # a secondary capture has no acquisition modality (CID 29): left out of the library
        expected = set()
    assert in_library == expected


@pytest.mark.parametrize("name", CASES)
def test_device_observer_and_procedure_reported(cases: dict[str, Case], name: str) -> None:
    sr = cases[name].sr
    assert sr is not None
    assert child(sr, "121005").ConceptCodeSequence[0].CodeValue == "121007"  # Observer Type = Device
    assert IDENTITY.device_uid == child(sr, "121012").UID
    assert child(sr, "121013").TextValue == IDENTITY.device_name
    assert child(sr, "121058").ConceptCodeSequence[0].CodeValue == EXPECTED_PROCEDURE[name]


@pytest.mark.parametrize("name", CASES)
def test_one_measurement_group_per_located_finding(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    sr = case.sr
    assert sr is not None
    located = located_findings(case.result)
    groups = measurement_groups(sr) if located else []
    assert len(groups) == len(located)
    tracking_uids = set()
    for finding in case.result.findings:
        if finding.label not in located:
            continue
        group = group_of(sr, finding.code.value)
        assert group.ContentTemplateSequence[0].TemplateIdentifier == "1501"
        identifier = child(group, "112039").TextValue
        assert identifier.startswith("Cornerstone3DTools@^0.1.0:PlanarFreehandROI:demo-model ")
        tracking_uids.add(child(group, "112040").UID)
        assert child(group, "111001").TextValue == "Demo Model"  # Algorithm Name (TID 4019)
        assert child(group, "111003").TextValue == "1.2.0"  # Algorithm Version
        assert child(group, "111002").TextValue.startswith("thresholds")  # Algorithm Parameters
        (num,) = [g for g in group.ContentSequence if g.ValueType == "NUM"]
        value = num.MeasuredValueSequence[0]
        assert float(value.NumericValue) == pytest.approx(finding.probability)
        assert value.MeasurementUnitsCodeSequence[0].CodeValue == "1"
        assert value.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
        evaluation = child(group, finding.code.value, finding.code.scheme_designator)
        assert evaluation.ConceptCodeSequence[0].CodeValue == "52101004"
        if finding.label == "malignant":
            assert name_of(num) == ("111047", "DCM")  # Probability of cancer
        else:
            assert name_of(num) == ("122157", "DCM")  # Probability
    assert len(tracking_uids) == len(groups)


@pytest.mark.parametrize("name", CASES)
def test_findings_without_region_are_qualitative_evaluations(cases: dict[str, Case], name: str) -> None:
    """Negative findings (and positive ones without a hotspot) are not measurement groups (OHIF
    3.13 fails on a group without a region) but Present/Absent evaluations with their probability."""
    case = cases[name]
    sr = case.sr
    assert sr is not None
    located = located_findings(case.result)
    (container,) = children(sr, "C0034375", "UMLS")
    for finding in case.result.findings:
        code = (finding.code.value, finding.code.scheme_designator)
        named = [item for item in container.ContentSequence if name_of(item) == code]
        if finding.label in located:
            assert not named
            continue
        (evaluation,) = [item for item in named if item.ValueType == "CODE"]
        assert evaluation.ConceptCodeSequence[0].CodeValue == (
            "52101004" if finding.positive else "272519000"
        )
        (text,) = [item for item in named if item.ValueType == "TEXT"]
        assert f"probability {finding.probability:.4g}" in text.TextValue
        assert text.TextValue.startswith("Present" if finding.positive else "Absent")


@pytest.mark.parametrize("name", CASES)
def test_image_region_on_the_hottest_source_image(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    sr = case.sr
    assert sr is not None
    for finding in case.result.findings:
        if finding.label not in located_findings(case.result):
            continue
        group = group_of(sr, finding.code.value)
        assert not [item for item in group.ContentSequence if item.ValueType == "SCOORD"]
        (num,) = [item for item in group.ContentSequence if item.ValueType == "NUM"]
        (scoord,) = num.ContentSequence  # the probability INFERRED FROM the region
        assert scoord.ValueType == "SCOORD" and scoord.RelationshipType == "INFERRED FROM"
        image, heatmap = max(
            (
                (im, h)
                for im in case.result.images
                for h in im.heatmaps
                if h.label == finding.label and h.hotspot
            ),
            key=lambda pair: pair[1].hotspot.peak_value,  # type: ignore[union-attr]
        )
        hotspot = heatmap.hotspot
        assert hotspot is not None
        (selected,) = scoord.ContentSequence
        assert selected.RelationshipType == "SELECTED FROM"
        assert image_refs(selected) == [(image.sop_instance_uid, [image.frame] if image.frame else [])]
        source = case.by_uid[image.sop_instance_uid]
        points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)  # (column, row)
        assert scoord.GraphicType == "POLYLINE"
        assert np.array_equal(points[0], points[-1])  # closed
        assert (
            (points >= 0).all()
            and (points[:, 0] <= source.Columns).all()
            and (points[:, 1] <= source.Rows).all()
        )
        centre = points[:-1].mean(axis=0)
        assert abs(centre[0] - (hotspot.peak_col + 0.5)) < 3 and abs(centre[1] - (hotspot.peak_row + 0.5)) < 3
        if image.frame:
            assert scoord.PixelOriginInterpretation == "FRAME"


def test_ct_region_is_on_the_second_slice_and_mf_on_frame_two(cases: dict[str, Case]) -> None:
    ct_scoord = next(i for i in walk(cases["ct"].sr) if i.ValueType == "SCOORD")  # type: ignore[arg-type]
    assert image_refs(ct_scoord.ContentSequence[0]) == [(str(cases["ct"].sources[1].SOPInstanceUID), [])]
    mf_scoord = next(i for i in walk(cases["mf"].sr) if i.ValueType == "SCOORD")  # type: ignore[arg-type]
    assert image_refs(mf_scoord.ContentSequence[0]) == [(str(cases["mf"].sources[0].SOPInstanceUID), [2])]


@pytest.mark.parametrize("name", CASES)
def test_private_coding_scheme_declared_where_used(cases: dict[str, Case], name: str) -> None:
    sr = cases[name].sr
    assert sr is not None
    declared = {
        str(item.CodingSchemeDesignator) for item in sr.get("CodingSchemeIdentificationSequence") or []
    }
    used = code_designators(sr) - {str(d) for d in declared}
    assert ("99PACSNODE" in declared) == any(
        f.code.scheme_designator == "99PACSNODE" for f in cases[name].result.findings
    )
    assert not {d for d in used if d.startswith("99")}
    for item in sr.get("CodingSchemeIdentificationSequence") or []:
        if item.CodingSchemeDesignator == "99PACSNODE":
            assert item.CodingSchemeUID.startswith(IDENTITY.uid_root)
            assert item.CodingSchemeName


@pytest.mark.parametrize("name", ["ct", "dx"])
def test_uids_are_deterministic_per_seed(cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    first = case.sr
    assert first is not None
    again = build_sr(case.result, case.sources, IDENTITY)
    other = build_sr(dataclasses.replace(case.result, uid_seed="another-job"), case.sources, IDENTITY)

    def uids(sr: Dataset) -> list[str]:
        tracking = [child(g, "112040").UID for g in measurement_groups(sr)]
        return [sr.SOPInstanceUID, sr.SeriesInstanceUID, *tracking]

    assert uids(again) == uids(first)
    assert all(a != b for a, b in zip(uids(other), uids(first), strict=True))
    assert all(uid.startswith(IDENTITY.uid_root) and len(uid) <= 64 for uid in uids(first))
    other_root = dataclasses.replace(IDENTITY, uid_root="1.2.3.")
    assert build_sr(case.result, case.sources, other_root).SOPInstanceUID.startswith("1.2.3.")


def test_research_notice_only_for_research_models(cases: dict[str, Case]) -> None:
    case = cases["dx"]
    research = case.sr
    assert research is not None
    (notice,) = children(research, "C0034375", "UMLS")
    assert "not for diagnosis" in child(notice, "121106").TextValue
    clinical = build_sr(
        dataclasses.replace(case.result, algorithm=algorithm(research=False)), case.sources, IDENTITY
    )
    assert not [c for e in children(clinical, "C0034375", "UMLS") for c in children(e, "121106")]
    assert clinical.SeriesDescription == "AI findings - Demo Model 1.2.0"


def test_procedure_copied_from_the_source_and_its_scheme_declared(cases: dict[str, Case]) -> None:
    sources = [copy.deepcopy(ds) for ds in cases["ct"].sources]
    item = Dataset()
    item.CodeValue = "CTABD1"
    item.CodingSchemeDesignator = "99HOSP"
    item.CodeMeaning = "CT abdomen with contrast"
    for ds in sources:
        ds.ProcedureCodeSequence = [item]
    sr = build_sr(cases["ct"].result, sources, IDENTITY)
    assert child(sr, "121058").ConceptCodeSequence[0].CodeValue == "CTABD1"
    declared = {str(i.CodingSchemeDesignator) for i in sr.CodingSchemeIdentificationSequence}
    assert {"99HOSP", "99PACSNODE"} <= declared


def test_no_patient_identity_in_logs(cases: dict[str, Case], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="node"):
        for name in ("ct", "mf"):
            case = cases[name]
            build_sr(case.result, case.sources, IDENTITY)
            build_heatmap_scs(case.result, case.by_uid, IDENTITY)
            build_parametric_maps(case.result, case.sources, IDENTITY)
    text = caplog.text
    for name in ("ct", "mf"):
        for ds in cases[name].sources:
            for keyword in ("PatientName", "PatientID"):
                value = str(ds.get(keyword) or "")
                assert not value or value not in text


def test_bad_input_is_an_output_error(cases: dict[str, Case]) -> None:
    case = cases["ct"]
    with pytest.raises(OutputError):
        build_sr(case.result, [], IDENTITY)
    bad = LabelScore("pneumonia", PNEUMONIA, 1.5, 0.5, True, True)
    with pytest.raises(OutputError):
        build_sr(dataclasses.replace(case.result, findings=(bad,)), case.sources, IDENTITY)
    with pytest.raises(OutputError):
        build_sr(case.result, cases["mr"].sources, IDENTITY)  # another study
    with pytest.raises(OutputError):
        build_sr(dataclasses.replace(case.result, uid_seed=""), case.sources, IDENTITY)


def test_latin1_patient_name_survives(cases: dict[str, Case]) -> None:
    sources = [copy.deepcopy(ds) for ds in cases["ct"].sources]
    for ds in sources:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jörg"
    sr = build_sr(cases["ct"].result, sources, IDENTITY)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert back.SpecificCharacterSet == "ISO_IR 100"
    assert str(back.PatientName) == "Müller^Jörg"
