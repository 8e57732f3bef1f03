"""Softcopy presentation states over the output cases (pydicom's CT_small, MR_small, a 2-frame RGB
secondary capture, node.synth DX and MG phantoms) and real pydicom-data files: one per marked
image, valid by dciodvfy and DCMTK's dcmpschk, the outline around the hotspot, the source's own
grey-scale pipeline, and DCMTK's dcmp2pgm reading and applying them.

OHIF 3.13 does not display presentation states (no PR SOP class handler; OHIF/Viewers#4106 is
open), and dcmp2pgm applies a state's grey-scale pipeline and displayed area but does not
rasterise its graphic annotations (it parses and lists them with -v). So the rendering peer is
dcmp2pgm for the pixels plus the graphics *as DCMTK parsed them*, drawn over its bitmap. Set
``PACS_NODE_GSPS_RENDERING=docs/gsps-dcmp2pgm.png`` to keep that picture of the DX case.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.outputs.gsps import CONTENT_LABEL, LAYER, build_presentation_states, marked_images
from node.types import AnalysisResult
from tests.helpers import need
from tests.outputs.conftest import Case
from tests.outputs.fabricate import IDENTITY, PNEUMONIA, PRIVATE_CODE, Spot, make_result, score
from tests.outputs.test_real_sources import REAL_FILES, our_errors, real, result_for
from tests.outputs.tools import dciodvfy

GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
CSPS = "1.2.840.10008.5.1.4.1.1.11.2"


@dataclass
class Built:
    """A case's presentation states, written next to its sources."""

    case: Case
    states: list[Dataset]
    state_files: list[Path]
    source_files: dict[str, Path]


def _write(case: Case, folder: Path, states: list[Dataset]) -> Built:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, state in enumerate(states):
        path = folder / f"{case.name}-pr{i}.dcm"
        state.save_as(path, enforce_file_format=True)
        files.append(path)
    sources = {}
    for i, ds in enumerate(case.sources):
        path = folder / f"{case.name}-src{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        sources[str(ds.SOPInstanceUID)] = path
    return Built(case, states, files, sources)


@pytest.fixture(scope="module")
def pr(cases: dict[str, Case], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    folder = tmp_path_factory.mktemp("gsps")
    return {
        name: _write(case, folder / name, build_presentation_states(case.result, case.sources, IDENTITY))
        for name, case in cases.items()
    }


def outline_of(state: Dataset) -> tuple[np.ndarray, Dataset]:
    """The first POLYLINE (as (column, row) points) and its annotation."""
    for annotation in state.GraphicAnnotationSequence:
        for graphic in annotation.get("GraphicObjectSequence", []):
            if graphic.GraphicType == "POLYLINE":
                return np.array(graphic.GraphicData, dtype=float).reshape(-1, 2), annotation
    raise AssertionError("no POLYLINE")


def inside(points: np.ndarray, row: int, col: int) -> bool:
    """Whether the pixel centre (row, col) is inside the closed polygon."""
    contour = points.astype(np.float32).reshape(-1, 1, 2)
    return cv2.pointPolygonTest(contour, (col + 0.5, row + 0.5), False) >= 0


def test_one_state_per_marked_image_in_a_new_series_of_the_study(pr: dict[str, Built]) -> None:
    for name, b in pr.items():
        marked = {m.image.sop_instance_uid for m in marked_images(b.case.result)}
        refs = [
            str(s.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
            for s in b.states
        ]
        assert sorted(refs) == sorted(marked) and marked, name
        for state in b.states:
            assert state.Modality == "PR"
            assert state.StudyInstanceUID == b.case.result.study_uid
            assert state.SeriesInstanceUID not in b.case.result.series_uids
            assert state.ContentLabel == CONTENT_LABEL
            assert "not for diagnosis" in state.SeriesDescription
            assert state.GraphicLayerSequence[0].GraphicLayer == LAYER
            assert state.ContributingEquipmentSequence[0].ManufacturerModelName == "Demo Model"
        assert len({s.SeriesInstanceUID for s in b.states}) == 1
    # CT: the nodule is on both slices (both image scores positive)
    assert len(pr["ct"].states) == 2
    # grey sources get a GSPS, the RGB multi-frame SC a colour one with an ICC profile
    assert {str(s.SOPClassUID) for n, b in pr.items() if n != "mf" for s in b.states} == {GSPS}
    (colour,) = pr["mf"].states
    assert colour.SOPClassUID == CSPS and len(colour.ICCProfile) > 128
    assert "SoftcopyVOILUTSequence" not in colour


def test_states_are_valid_by_dciodvfy_and_dcmpschk(pr: dict[str, Built]) -> None:
    checker = need("dcmpschk")
    for name, b in pr.items():
        for path in b.state_files:
            report = dciodvfy(path)
            assert not report.errors, f"{name}: {report.errors}"
            proc = subprocess.run([checker, str(path)], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0 and "Test passed" in proc.stdout + proc.stderr, (
                f"{name}: {proc.stdout}{proc.stderr}"
            )


def test_outline_is_a_closed_polyline_around_the_hotspot_with_its_label(pr: dict[str, Built]) -> None:
    for name, b in pr.items():
        marks = {m.image.sop_instance_uid: m for m in marked_images(b.case.result)}
        for state in b.states:
            uid = str(state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
            mark = marks[uid]
            points, annotation = outline_of(state)
            graphic = annotation.GraphicObjectSequence[0]
            assert graphic.GraphicAnnotationUnits == "PIXEL" and graphic.GraphicFilled == "N"
            assert np.array_equal(points[0], points[-1]), f"{name}: not closed"
            hotspot = mark.heatmap.hotspot
            assert hotspot is not None
            assert inside(points, hotspot.peak_row, hotspot.peak_col), f"{name}: peak outside the outline"
            top, left, bottom, right = hotspot.box
            assert points[:, 0].min() >= left - 1 and points[:, 0].max() <= right + 2, name
            assert points[:, 1].min() >= top - 1 and points[:, 1].max() <= bottom + 2, name
            (text,) = annotation.TextObjectSequence
            assert text.UnformattedTextValue.startswith(f"{mark.finding.label}: p={mark.probability:.2f}")
            assert "not for diagnosis" in text.UnformattedTextValue
            rows, cols = int(b.case.by_uid[uid].Rows), int(b.case.by_uid[uid].Columns)
            box = [
                float(v) for v in (*text.BoundingBoxTopLeftHandCorner, *text.BoundingBoxBottomRightHandCorner)
            ]
            assert 0 <= box[0] < box[2] <= cols and 0 <= box[1] < box[3] <= rows, f"{name}: {box}"
            frame = annotation.ReferencedImageSequence[0].get("ReferencedFrameNumber")
            assert frame == (2 if name == "mf" else None), name


def test_grey_scale_pipeline_is_the_sources(pr: dict[str, Built]) -> None:
    for name in ("dx", "mg"):
        for state in pr[name].states:
            source = pr[name].case.by_uid[
                str(state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
            ]
            (voi,) = state.SoftcopyVOILUTSequence
            assert float(voi.WindowCenter) == pytest.approx(float(source.WindowCenter))
            assert float(voi.WindowWidth) == pytest.approx(float(source.WindowWidth))
            assert state.PresentationLUTShape == "IDENTITY"
    ct = pr["ct"].states[0]
    assert float(ct.RescaleIntercept) == -1024 and float(ct.RescaleSlope) == 1 and ct.RescaleType == "HU"
    assert "SoftcopyVOILUTSequence" not in ct  # CT_small states no window: the viewer's own
    area = ct.DisplayedAreaSelectionSequence[0]
    assert [int(v) for v in area.DisplayedAreaBottomRightHandCorner] == [128, 128]
    assert "PixelOriginInterpretation" not in area


def test_monochrome1_source_gets_an_inverse_presentation_lut(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["dx"]
    source = copy.deepcopy(case.sources[0])
    source.PhotometricInterpretation = "MONOCHROME1"
    del source.PresentationLUTShape  # the phantom's says IDENTITY, for its MONOCHROME2
    (state,) = build_presentation_states(case.result, [source], IDENTITY)
    assert state.PresentationLUTShape == "INVERSE"
    path = tmp_path / "m1.dcm"
    state.save_as(path, enforce_file_format=True)
    assert not dciodvfy(path).errors


def test_negative_result_has_no_state(cases: dict[str, Case]) -> None:
    case = cases["dx"]
    negative = make_result(
        case.sources,
        [score("pneumonia", PNEUMONIA, 0.2), score("nodule", PRIVATE_CODE, 0.1)],
        [Spot(0, "pneumonia", 260, 200, 30)],
        seed="job-negative",
    )
    assert marked_images(negative) == []
    assert build_presentation_states(negative, case.sources, IDENTITY) == []


def test_uids_are_deterministic_per_job(cases: dict[str, Case]) -> None:
    case = cases["dx"]
    first = build_presentation_states(case.result, case.sources, IDENTITY)
    again = build_presentation_states(case.result, case.sources, IDENTITY)
    other = build_presentation_states(_reseeded(case.result, "another job"), case.sources, IDENTITY)
    assert [s.SOPInstanceUID for s in first] == [s.SOPInstanceUID for s in again]
    assert not {s.SOPInstanceUID for s in first} & {s.SOPInstanceUID for s in other}


def _reseeded(result: AnalysisResult, seed: str) -> AnalysisResult:
    from dataclasses import replace

    return replace(result, uid_seed=seed)


# -- DCMTK's dcmp2pgm as the rendering peer ----------------------------------------------------------

_POINTS = re.compile(r"graphic \d+: points=(\d+) type=(\w+)")
_BOX = re.compile(r"bounding box: TLHC=([-0-9.e]+)\\([-0-9.e]+) BRHC=([-0-9.e]+)\\([-0-9.e]+)")
_TEXT = re.compile(r'text \d+: "(.*)"')


@dataclass
class Rendering:
    """What dcmp2pgm made of an image and its presentation state."""

    pixels: np.ndarray  # the bitmap with the state's grey-scale pipeline applied
    polylines: list[np.ndarray]  # (column, row) points as DCMTK parsed them
    texts: list[tuple[str, tuple[float, float, float, float]]]


def dcmp2pgm(image: Path, state: Path | None, folder: Path) -> Rendering:
    """Render ``image`` (with ``state``) with DCMTK's dcmp2pgm; parse its -v dump of the graphics."""
    tool = need("dcmp2pgm")
    out = folder / f"{image.stem}-{state.stem if state else 'plain'}.pgm"
    args = [tool, "-v", *(["-p", str(state)] if state else []), str(image), str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    polylines, texts = [], []
    for i, line in enumerate(lines):
        if (match := _POINTS.search(line)) and match.group(2) == "polyline":
            coords = lines[i + 1].split("coordinates:")[1].strip().strip(",").split(",")
            polylines.append(np.array([[float(v) for v in c.split("\\")] for c in coords if c.strip()]))
        if match := _TEXT.search(line):
            box = _BOX.search(lines[i + 2]) or _BOX.search(lines[i + 1])
            assert box, lines[i : i + 3]
            texts.append((match.group(1), tuple(float(v) for v in box.groups())))  # type: ignore[misc]
    pixels = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert pixels is not None
    return Rendering(pixels, polylines, texts)


def draw(rendering: Rendering) -> np.ndarray:
    """The dcmp2pgm bitmap in colour with the graphics DCMTK parsed drawn over it (the layer's
    recommended cyan), each text in its bounding box."""
    picture = cv2.cvtColor(rendering.pixels.astype(np.uint8), cv2.COLOR_GRAY2BGR)
    thickness = max(1, round(picture.shape[1] / 400))
    for points in rendering.polylines:
        cv2.polylines(picture, [np.round(points - 0.5).astype(np.int32)], False, (255, 255, 0), thickness)
    for text, (x0, y0, _x1, y1) in rendering.texts:
        height = y1 - y0
        scale = cv2.getFontScaleFromHeight(cv2.FONT_HERSHEY_SIMPLEX, max(int(height * 0.7), 6), 1)
        cv2.putText(
            picture,
            text,
            (int(x0) + 2, int(y1 - height * 0.2)),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 0),
            1,
            cv2.LINE_AA,
        )
    return picture


def test_dcmtk_applies_the_state_and_reads_the_outline(pr: dict[str, Built], tmp_path: Path) -> None:
    b = pr["dx"]
    (state_file,) = b.state_files
    (state,) = b.states
    uid = str(state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
    with_state = dcmp2pgm(b.source_files[uid], state_file, tmp_path)
    plain = dcmp2pgm(b.source_files[uid], None, tmp_path)
    # the state's window is the image's own: the picture looks the same as without it
    assert np.array_equal(with_state.pixels, plain.pixels)
    (polyline,) = with_state.polylines
    ours, _ = outline_of(state)
    assert np.allclose(polyline, ours, atol=1e-3)
    (mark,) = marked_images(b.case.result)
    hotspot = mark.heatmap.hotspot
    assert hotspot is not None and inside(polyline, hotspot.peak_row, hotspot.peak_col)
    assert with_state.texts and with_state.texts[0][0].startswith("pneumonia: p=0.91")
    picture = draw(with_state)
    # the outline's pixels are drawn where the hotspot is, and nowhere else outside the text
    drawn = np.all(picture == (255, 255, 0), axis=2)
    top, left, bottom, right = hotspot.box
    around = np.zeros_like(drawn)
    around[max(top - 3, 0) : bottom + 4, max(left - 3, 0) : right + 4] = True
    (x0, y0, x1, y1) = with_state.texts[0][1]
    around[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1] = True
    assert drawn[around].sum() > 50 and not drawn[~around].any()
    keep = os.environ.get("PACS_NODE_GSPS_RENDERING")
    if keep:
        cv2.imwrite(keep, picture, [cv2.IMWRITE_PNG_COMPRESSION, 9])


def test_monochrome1_renders_as_the_image_does(cases: dict[str, Case], tmp_path: Path) -> None:
    case = cases["dx"]
    source = copy.deepcopy(case.sources[0])
    source.PhotometricInterpretation = "MONOCHROME1"
    del source.PresentationLUTShape  # the phantom's says IDENTITY, for its MONOCHROME2
    (state,) = build_presentation_states(case.result, [source], IDENTITY)
    image, state_file = tmp_path / "m1-image.dcm", tmp_path / "m1-state.dcm"
    source.save_as(image, enforce_file_format=True)
    state.save_as(state_file, enforce_file_format=True)
    assert np.array_equal(
        dcmp2pgm(image, state_file, tmp_path).pixels, dcmp2pgm(image, None, tmp_path).pixels
    )


# -- real files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_file_states_are_valid(name: str, tmp_path: Path) -> None:
    ds = real(name)
    frame = REAL_FILES[name]
    result = result_for(ds, frame)
    states = build_presentation_states(result, [ds], IDENTITY)
    if str(ds.get("PhotometricInterpretation")) == "PALETTE COLOR":
        assert states == []
        return
    (state,) = states
    path = tmp_path / "pr.dcm"
    state.save_as(path, enforce_file_format=True)
    errors = our_errors(path, ds)
    assert not errors, "\n".join(errors)
    colour = int(ds.get("SamplesPerPixel") or 1) == 3
    assert str(state.SOPClassUID) == (CSPS if colour else GSPS)
    _, annotation = outline_of(state)
    expected = None if name == "OBXXXX1A_2frame.dcm" else frame  # single-frame US class: no frame
    assert annotation.ReferencedImageSequence[0].get("ReferencedFrameNumber") == expected
    again = pydicom.dcmread(path)
    assert again.SOPInstanceUID == state.SOPInstanceUID
