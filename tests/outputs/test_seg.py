"""The DICOM Segmentation of a segmentation result and the SR groups that reference it, built on a CT
phantom series whose lesion masks the generator knows, checked by dciodvfy, PixelMed's SR validator
and by reading the objects back with highdicom."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.inference.explain import find_hotspot
from node.outputs import OutputError
from node.outputs.seg import SEG_SOP_CLASS_UID, build_seg, segment_numbers
from node.outputs.sr import build_sr
from node.synth import generate_study, render_study
from node.types import (
    AlgorithmIdentity,
    AnalysisResult,
    Code,
    Heatmap,
    ImageResult,
    LabelScore,
    SegmentationResult,
    SegmentFrame,
    SegmentSummary,
)
from tests.outputs.fabricate import IDENTITY
from tests.outputs.tools import SrValidation, dciodvfy, need_pixelmed

CYST = Code("367643001", "SCT", "Cyst")
MASS = Code("4147007", "SCT", "Mass")
CATEGORY = Code("49755003", "SCT", "Morphologically abnormal structure")
ALGORITHM = AlgorithmIdentity(
    model_id="ct-liver-seg",
    name="CT liver lesion segmentation",
    version="1.0.0",
    sha256="cd" * 32,
    parameters="thresholds cyst=0.5 mass=0.5 min area 6 px",
)


def phantom_result(folder: Path, seed: int = 11, label: str = "malignant", empty: bool = False):
    """A CT phantom series and a segmentation result whose 'mass' masks are the generator's truth
    (the 'cyst' segment stays empty); the three frames with most lesion pixels are shown."""
    study = render_study("ct", seed, label, slices=8, size=128)
    truth = generate_study("ct", folder, seed, label, write_masks=False, slices=8, size=128)
    sources = [pydicom.dcmread(folder / inst.file) for inst in truth.instances]
    spacing = [float(v) for v in sources[0].PixelSpacing]
    z = [float(ds.ImagePositionPatient[2]) for ds in sources]
    frames, images, counts = [], [], []
    for ds, image in zip(sources, study.images, strict=True):
        mask = (image.mask > 0) & (not empty)
        counts.append(int(mask.sum()))
        masks = np.stack([np.zeros_like(mask), mask]) if mask.any() else None
        frames.append(SegmentFrame(str(ds.SOPInstanceUID), str(ds.SOPClassUID), None, 128, 128, masks))
    for i in sorted(np.argsort(counts)[-3:]):
        mask = frames[i].masks[1] if frames[i].masks is not None else np.zeros((128, 128), bool)
        values = mask.astype(np.float32) * 0.93
        maps = (Heatmap("mass", values, "segmentation", find_hotspot(values, 1e-6)),) if mask.any() else ()
        images.append(
            ImageResult(
                str(sources[i].SOPInstanceUID),
                str(sources[i].SOPClassUID),
                (),
                maps,
                np.zeros((128, 128), np.uint8),
            )
        )
    total = sum(counts)
    area = max(counts) * spacing[0] * spacing[1]
    volume = total * spacing[0] * spacing[1] * abs(z[1] - z[0])
    segments = (
        SegmentSummary(1, "cyst", CYST, CATEGORY, 0, 0),
        SegmentSummary(
            2,
            "mass",
            MASS,
            CATEGORY,
            total,
            sum(c > 0 for c in counts),
            area if total else None,
            volume if total else None,
        ),
    )
    findings = (
        LabelScore("cyst", CYST, 0.2, 0.5, False, False),
        LabelScore("mass", MASS, 0.93 if total else 0.3, 0.5, bool(total), bool(total)),
    )
    result = AnalysisResult(
        algorithm=ALGORITHM,
        study_uid=str(sources[0].StudyInstanceUID),
        series_uids=(str(sources[0].SeriesInstanceUID),),
        level="series",
        findings=findings,
        images=tuple(images),
        uid_seed=f"seg-test-{seed}-{empty}",
        frames_analysed=len(sources),
        segmentation=SegmentationResult(
            segments, tuple(frames), "AI liver lesion segmentation", Code("10200004", "SCT", "Liver")
        ),
    )
    for ds in sources:
        del ds.PixelData  # as the runner hands them over
    return sources, result, counts


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("seg")
    sources, result, counts = phantom_result(folder / "ct")
    seg = build_seg(result, sources, IDENTITY)
    assert seg is not None
    sr = build_sr(result, sources, IDENTITY, segmentation=seg)
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    sr.save_as(sr_path, enforce_file_format=True)
    return sources, result, counts, seg_path, sr_path


def test_seg_passes_dciodvfy(built) -> None:
    *_, seg_path, _ = built
    report = dciodvfy(seg_path)
    assert "Segmentation" in report.text or not report.errors
    assert not report.errors, report.text


def test_seg_holds_the_mask_with_codes_algorithm_and_references(built) -> None:
    sources, result, counts, seg_path, _ = built
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == SEG_SOP_CLASS_UID and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert (
        "not for diagnosis" in seg.SeriesDescription and "not for diagnosis" in seg.ContentDescription.lower()
    )
    (segment,) = seg.SegmentSequence  # the empty cyst segment is left out
    assert segment.SegmentNumber == 1 and segment.SegmentLabel == "mass"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == MASS.value
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == CATEGORY.value
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == ALGORITHM.name
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "1.0.0"
    # CID 7162: 123110 is Artificial Intelligence (123109, written before, is Manual Processing)
    family = segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator, family.CodeMeaning) == (
        "123110",
        "DCM",
        "Artificial Intelligence",
    )
    assert segment.AnatomicRegionSequence[0].CodeValue == "10200004"
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}  # every source image
    assert int(seg.NumberOfFrames) == sum(c > 0 for c in counts)  # empty frames omitted
    # the pixels read back per source image are the masks that went in
    for ds, frame, count in zip(sources, result.segmentation.frames, counts, strict=True):
        if not count:
            continue
        stored = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(ds.SOPInstanceUID)], segment_numbers=[1]
        )[0, :, :, 0]
        assert np.array_equal(stored.astype(bool), frame.masks[1])
    assert segment_numbers(result.segmentation) == {"mass": 1}


def test_no_pixels_no_seg_and_the_sr_says_so(tmp_path: Path) -> None:
    sources, result, _ = phantom_result(tmp_path / "ct", empty=True)
    assert build_seg(result, sources, IDENTITY) is None
    note = "No segmentation object was written: no segment has pixels after post-processing."
    sr = build_sr(result, sources, IDENTITY, segmentation=None, segmentation_note=note)
    texts = [str(item.TextValue) for item in _walk(sr) if item.ValueType == "TEXT"]
    assert note in texts
    assert any(
        t.startswith("Absent: no pixel left after post-processing; highest pixel probability") for t in texts
    )
    assert not [item for item in _walk(sr) if _name(item) == "125007"]  # no measurement group


def test_sr_group_references_the_seg_segment_with_area_and_volume(built) -> None:
    _, result, _, seg_path, sr_path = built
    sr, seg = pydicom.dcmread(sr_path), pydicom.dcmread(seg_path)
    groups = [item for item in _walk(sr) if _name(item) == "125007"]
    (volumetric,) = groups
    assert volumetric.ContentTemplateSequence[0].TemplateIdentifier == "1411"
    items = list(volumetric.ContentSequence)
    (segment_ref,) = [i for i in items if _name(i) == "121191"]
    ref = segment_ref.ReferencedSOPSequence[0]
    assert (
        ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID and ref.ReferencedSOPClassUID == SEG_SOP_CLASS_UID
    )
    assert int(ref.ReferencedSegmentNumber) == 1
    nums = {_name(i): i for i in items if i.ValueType == "NUM"}
    summary = result.segmentation.segments[1]
    volume = float(nums["118565006"].MeasuredValueSequence[0].NumericValue)
    area = float(nums["42798000"].MeasuredValueSequence[0].NumericValue)
    assert volume == pytest.approx(summary.volume_mm3, rel=1e-6) and volume > 0
    assert area == pytest.approx(summary.area_mm2, rel=1e-6) and area > 0
    probability = nums["122157"]
    assert float(probability.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.93)
    # the probability is inferred from the outline on a source frame (what OHIF needs to draw it)
    assert probability.ContentSequence[0].ValueType == "SCOORD"
    evidence = {
        str(inst.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert str(seg.SOPInstanceUID) in evidence
    # the empty cyst segment is a qualitative evaluation: Absent
    codes = [
        (i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
        for i in _walk(sr)
        if i.ValueType == "CODE" and "ConceptCodeSequence" in i
    ]
    assert (CYST.value, "272519000") in codes


def test_sr_with_segment_groups_passes_dciodvfy_and_pixelmed(built) -> None:
    *_, sr_path = built
    report = dciodvfy(sr_path)
    assert not report.errors, report.text
    need_pixelmed()
    validation = SrValidation([sr_path])
    try:
        pm = validation.reports()[str(sr_path)]
    finally:
        validation.close()
    assert "Found Root Template TID_1500" in pm.text, pm.text
    assert not pm.errors, pm.text


def _name(item: pydicom.Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _walk(item: pydicom.Dataset):
    for child in item.get("ContentSequence") or []:
        yield child
        yield from _walk(child)


def test_seg_of_a_multi_frame_enhanced_ct(tmp_path: Path) -> None:
    """One enhanced multi-frame source (pydicom's eCT_Supplemental, 2 frames): the SEG references its
    frames (geometry from the functional groups) and passes dciodvfy."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    if not path:
        pytest.skip("eCT_Supplemental.dcm is not installed (pydicom-data)")
    ds = pydicom.dcmread(path)
    rows, cols = int(ds.Rows), int(ds.Columns)
    mask = np.zeros((2, rows, cols), dtype=bool)
    mask[1, rows // 3 : rows // 2, cols // 3 : cols // 2] = True
    frames = tuple(
        SegmentFrame(str(ds.SOPInstanceUID), str(ds.SOPClassUID), i + 1, rows, cols, mask if i == 1 else None)
        for i in range(2)
    )
    pixels = int(mask.sum())
    result = AnalysisResult(
        algorithm=ALGORITHM,
        study_uid=str(ds.StudyInstanceUID),
        series_uids=(str(ds.SeriesInstanceUID),),
        level="series",
        findings=(
            LabelScore("cyst", CYST, 0.1, 0.5, False, False),
            LabelScore("mass", MASS, 0.9, 0.5, True, True),
        ),
        images=(),
        uid_seed="seg-test-multiframe",
        frames_analysed=2,
        segmentation=SegmentationResult(
            (
                SegmentSummary(1, "cyst", CYST, CATEGORY, 0, 0),
                SegmentSummary(2, "mass", MASS, CATEGORY, pixels, 1),
            ),
            frames,
        ),
    )
    del ds.PixelData
    seg = build_seg(result, [ds], IDENTITY)
    assert seg is not None and int(seg.NumberOfFrames) == 1
    out = tmp_path / "seg.dcm"
    seg.save_as(out, enforce_file_format=True)
    report = dciodvfy(out)
    assert not report.errors, report.text
    stored = hd.seg.segread(out)
    ref = stored.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID and int(ref.ReferencedFrameNumber) == 2
    # a frame missing from the analysis cannot make a SEG of the multi-frame image
    partial = SegmentationResult(result.segmentation.segments, frames[1:])
    with pytest.raises(OutputError, match="needs all its 2 frames"):
        build_seg(replace(result, segmentation=partial), [ds], IDENTITY)
