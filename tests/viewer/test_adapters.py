"""Node SRs rehydrated by @cornerstonejs/adapters (the code OHIF 3.13 uses to turn a TID 1500 SR
back into annotations): the positive finding is recognised with its outline and finding name, and
no SR (negative-only, multi-frame source, CR with 0\\0 spacing) makes it throw."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.outputs.sr import build_sr
from tests.outputs.fabricate import IDENTITY, PNEUMONIA, PRIVATE_CODE, Spot, make_result, score

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def node_bin() -> str:
    """node, with tests/viewer/node_modules installed (npm ci when missing); skip (fail in CI)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        if os.environ.get("CI"):
            pytest.fail("node/npm are not installed")
        pytest.skip("node/npm are not installed")
    if not (HERE / "node_modules" / "@cornerstonejs" / "adapters").exists():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=HERE, check=True, timeout=600
        )
    return node


def rehydrate(node: str, sr: pydicom.Dataset, sources: list[pydicom.Dataset], folder: Path) -> dict:
    """The adapters' view of ``sr`` (see rehydrate.mjs)."""
    sr_path, src_path = folder / "sr.dcm", folder / "sources.json"
    sr.save_as(sr_path, enforce_file_format=True)
    src_path.write_text(
        json.dumps(
            [{"uid": str(ds.SOPInstanceUID), "frames": int(ds.get("NumberOfFrames") or 1)} for ds in sources]
        )
    )
    proc = subprocess.run(
        [node, str(HERE / "rehydrate.mjs"), str(sr_path), str(src_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def real(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name, download=False)
    if not path:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return pydicom.dcmread(path)


def case(name: str, frame: int | None = None, positive: bool = True):
    ds = real(name)
    rows, cols = int(ds.Rows), int(ds.Columns)
    result = make_result(
        [ds],
        [score("nodule", PRIVATE_CODE, 0.9 if positive else 0.1), score("pneumonia", PNEUMONIA, 0.1)],
        [Spot(0, "nodule", rows // 2, cols // 3, max(min(rows, cols) / 12, 3))],
        frames=[frame],
    )
    return [ds], result


@pytest.mark.parametrize(
    ("name", "frame"), [("CT_small.dcm", None), ("RG1_UNCI.dcm", None), ("eCT_Supplemental.dcm", 2)]
)
def test_positive_outline_is_recognised(node_bin: str, tmp_path: Path, name: str, frame: int | None) -> None:
    sources, result = case(name, frame)
    sr = build_sr(result, sources, IDENTITY)
    out = rehydrate(node_bin, sr, sources, tmp_path)
    (measurement,) = out["measurements"]
    assert measurement["toolType"] == "PlanarFreehandROI"
    assert measurement["description"] == PRIVATE_CODE.meaning  # the finding's name
    assert measurement["referencedImageId"] == f"node:{sources[0].SOPInstanceUID}:{frame or 1}"
    polyline = np.asarray(measurement["polyline"], dtype=float)
    scoord = next(item for group in sr.ContentSequence for item in _walk(group) if item.ValueType == "SCOORD")
    points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)[:-1]  # closed: last = first
    assert len(polyline) == len(points) >= 3
    assert np.allclose(polyline[:, :2] + 0.5, points)  # identity geometry in rehydrate.mjs


def test_negative_only_sr_does_not_break_the_adapters(node_bin: str, tmp_path: Path) -> None:
    sources, result = case("CT_small.dcm", positive=False)
    negative = dataclasses.replace(result)
    out = rehydrate(node_bin, build_sr(negative, sources, IDENTITY), sources, tmp_path)
    assert out["measurements"] == []
    assert not [w for w in out["warnings"] if "Unable to generate tool state" in w]


def test_multi_frame_and_zero_spacing_sources_rehydrate_without_warnings(
    node_bin: str, tmp_path: Path
) -> None:
    for name, frame in (("emri_small.dcm", 3), ("RG1_J2KI.dcm", None)):
        sources, result = case(name, frame)
        out = rehydrate(node_bin, build_sr(result, sources, IDENTITY), sources, tmp_path)
        assert len(out["measurements"]) == 1, out
        assert not out["warnings"], out["warnings"]


def _walk(item: pydicom.Dataset):
    for child in item.get("ContentSequence") or []:
        yield child
        yield from _walk(child)
