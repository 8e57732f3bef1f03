"""Output builders on real vendor files (pydicom-data) and on quirk variants of them: no crash,
no invalid value copied, and every object valid by dciodvfy (no error the node caused)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.outputs.pm import build_parametric_maps
from node.outputs.sc import build_heatmap_scs
from node.outputs.sr import build_sr
from node.types import AnalysisResult
from tests.outputs.fabricate import IDENTITY, PNEUMONIA, PRIVATE_CODE, Spot, make_result, score
from tests.outputs.srtree import image_refs, walk
from tests.outputs.tools import dciodvfy

#: name -> the 1-based frame analysed (None: single-frame)
REAL_FILES: dict[str, int | None] = {
    "RG1_UNCI.dcm": None,
    "RG1_J2KI.dcm": None,
    "emri_small.dcm": 3,
    "eCT_Supplemental.dcm": 2,
    "MR2_UNCI.dcm": None,
    "693_UNCI.dcm": None,
    "US1_UNCI.dcm": None,
    "OBXXXX1A_2frame.dcm": 2,
    "CT_small.dcm": None,
    "MR_small.dcm": None,
}


def real(name: str) -> Dataset:
    """A real file of pydicom / pydicom-data (skipped when pydicom-data is not installed)."""
    path = get_testdata_file(name, download=False)
    if not path:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return pydicom.dcmread(path)


def raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put ``value`` into ``ds`` as it would come from a file (undecoded, unvalidated)."""
    tag = Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, True, True)  # noqa: SLF001


def result_for(ds: Dataset, frame: int | None, seed: str = "job-real") -> AnalysisResult:
    """A positive finding with an outline near the image centre and a negative one."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    radius = max(min(rows, cols) / 12, 3)
    return make_result(
        [ds],
        [score("nodule", PRIVATE_CODE, 0.9), score("pneumonia", PNEUMONIA, 0.1)],
        [Spot(0, "nodule", rows // 2, cols // 3, radius)],
        seed=seed,
        frames=[frame],
    )


def our_errors(path: Path, source: Dataset) -> list[str]:
    """dciodvfy errors of an output, less those about values copied as they are from the source's
    patient/study (the node must copy those, valid or not)."""
    report = dciodvfy(path)
    # 693_UNCI says PatientIdentityRemoved YES without the method: the Patient module as copied
    copied = (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "DeidentificationMethod",
    )
    return [e for e in report.errors if not any(k in e for k in copied)]


def derivations(pm: Dataset) -> list[Dataset]:
    """The Derivation Image Sequence items of a map (shared or per-frame functional groups)."""
    groups = [*pm.SharedFunctionalGroupsSequence, *pm.get("PerFrameFunctionalGroupsSequence", [])]
    return [item for group in groups for item in group.get("DerivationImageSequence") or []]


def build_all(ds: Dataset, frame: int | None, folder: Path) -> dict[str, list[Dataset]]:
    """SR, SCs and PMs of a fabricated result over ``ds``, written under ``folder``."""
    result = result_for(ds, frame)
    out = {
        "sr": [build_sr(result, [ds], IDENTITY)],
        "sc": build_heatmap_scs(result, {str(ds.SOPInstanceUID): ds}, IDENTITY),
        "pm": build_parametric_maps(result, [ds], IDENTITY),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for kind, objects in out.items():
        for i, obj in enumerate(objects):
            path = folder / f"{kind}{i}.dcm"
            obj.save_as(path, enforce_file_format=True)
            obj.filename = str(path)
    return out


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_outputs_are_valid(name: str, tmp_path: Path) -> None:
    ds = real(name)
    frame = REAL_FILES[name]
    out = build_all(ds, frame, tmp_path)
    assert len(out["sr"]) == 1 and out["sc"], "an SR and at least one SC"
    assert len(out["pm"]) == 1  # every real file (multi-frame too) gets its map
    for objects in out.values():
        for obj in objects:
            errors = our_errors(Path(obj.filename), ds)
            assert not errors, "\n".join(errors)
    # the region names the analysed frame of a multi-frame source (not of OBXXXX1A: a 2-frame file
    # of the single-frame Ultrasound Image class, where a frame reference is not allowed)
    if name == "OBXXXX1A_2frame.dcm":
        frame = None
    scoord = next(item for item in walk(out["sr"][0]) if item.ValueType == "SCOORD")
    assert image_refs(scoord.ContentSequence[0]) == [(str(ds.SOPInstanceUID), [frame] if frame else [])]
    assert out["sc"][0].SourceImageSequence[0].get("ReferencedFrameNumber") == frame
    for derivation in derivations(out["pm"][0]):
        assert derivation.SourceImageSequence[0].get("ReferencedFrameNumber") == frame


def test_cr_with_zero_spacing_copies_no_spacing(tmp_path: Path) -> None:
    ds = real("RG1_UNCI.dcm")
    assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]
    out = build_all(ds, None, tmp_path)
    for obj in (*out["sr"], *out["sc"]):
        assert "PixelSpacing" not in obj
    spacing_items = [
        item
        for item in walk(out["sr"][0])
        if item.ValueType == "NUM" and "Pixel Spacing" in item.ConceptNameCodeSequence[0].CodeMeaning
    ]
    assert not spacing_items
    pm = out["pm"][0]
    spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [1.0, 1.0]  # nominal, with a note
    note = derivations(pm)[0].DerivationDescription
    assert "nominal 1 mm" in note


def test_enhanced_ct_spacing_comes_from_the_functional_groups(tmp_path: Path) -> None:
    ds = real("eCT_Supplemental.dcm")
    assert "PixelSpacing" not in ds
    out = build_all(ds, 2, tmp_path)
    expected = None
    for group in (ds.PerFrameFunctionalGroupsSequence[1], *ds.get("SharedFunctionalGroupsSequence", [])):
        if "PixelMeasuresSequence" in group:
            expected = [float(v) for v in group.PixelMeasuresSequence[0].PixelSpacing]
            break
    assert expected
    spacing = out["pm"][0].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == pytest.approx(expected)
    horizontal = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in walk(out["sr"][0])
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "111026"
    ]
    assert horizontal == pytest.approx([expected[1]])


def _spacing(value: bytes) -> Callable[[Dataset], None]:
    return lambda ds: raw(ds, "PixelSpacing", "DS", value)


def _drop(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return change


QUIRKS: dict[str, Callable[[Dataset], None]] = {
    "spacing 0\\0": _spacing(b"0\\0 "),
    "spacing missing": _drop("PixelSpacing"),
    "spacing 3 values": _spacing(b"1\\1\\1 "),
    "spacing negative": _spacing(b"-0.5\\-0.5 "),
    "spacing not numbers": _spacing(b"abc\\def "),
    "orientation missing": _drop("ImageOrientationPatient"),
    "orientation not unit": lambda ds: raw(ds, "ImageOrientationPatient", "DS", b"2\\0\\0\\0\\3\\0 "),
    "position 2 values": lambda ds: raw(ds, "ImagePositionPatient", "DS", b"1\\2 "),
    "laterality etc. missing": _drop("Laterality", "ImageLaterality", "ViewPosition", "PatientOrientation"),
    "patient orientation invalid": lambda ds: raw(ds, "PatientOrientation", "CS", b"X\\Y "),
    "unknown character set": lambda ds: raw(ds, "SpecificCharacterSet", "CS", b"ISO_IR 999 "),
}


@pytest.mark.parametrize("base", ["CT_small.dcm", "RG1_UNCI.dcm"])
@pytest.mark.parametrize("quirk", QUIRKS)
def test_quirk_variants_build_and_copy_no_invalid_value(base: str, quirk: str, tmp_path: Path) -> None:
    ds = copy.deepcopy(real(base))
    QUIRKS[quirk](ds)
    out = build_all(ds, None, tmp_path)
    for objects in out.values():
        for obj in objects:
            errors = our_errors(Path(obj.filename), ds)
            assert not errors, "\n".join(errors)
            back = pydicom.dcmread(obj.filename)
            spacing = back.get("PixelSpacing")
            if spacing is not None:
                assert len(spacing) == 2 and all(float(v) > 0 for v in spacing)
            assert back.get("SpecificCharacterSet") != "ISO_IR 999"
            orientation = back.get("PatientOrientation")
            if orientation:
                assert all(set(str(v)) <= set("LRAPHF") for v in orientation)
    for pm in out["pm"]:
        measures = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert all(float(v) > 0 for v in measures.PixelSpacing)
        orientation = np.asarray(
            pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
            dtype=float,
        )
        assert np.allclose(np.linalg.norm(orientation.reshape(2, 3), axis=1), 1.0)
