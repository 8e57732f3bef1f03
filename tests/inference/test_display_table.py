"""The display of a shown image (node/inference/prepared.py display_image) through one table of
every stored value is, bit for bit, the per-pixel transform it replaces: real vendor files
(MONOCHROME1 CR, signed CT, VOI LUT sequences, rescaled MR) and the phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from node.inference import prepared
from node.inference.decode import iter_frames
from node.synth import generate_study

REAL = [
    "RG1_UNCR.dcm",  # CR, MONOCHROME1, 1955 x 1841
    "RG3_UNCI.dcm",
    "CT_small.dcm",  # signed, rescaled
    "MR_small.dcm",
    "mlut_18.dcm",  # a Modality LUT Sequence
    "vlut_04.dcm",  # a VOI LUT Sequence
]


def _frames(path: str, limit: int = 2):
    for i, frame in enumerate(iter_frames(path)):
        if i >= limit:
            return
        yield frame


def _per_pixel(frame, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    with monkeypatch.context() as m:
        m.setattr(prepared, "_display_table", lambda *a, **k: None)
        return prepared.display_image(frame)


@pytest.mark.parametrize("name", REAL)
def test_real_files_display_the_same(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"{name} should be in pydicom's or pydicom-data's files")
    for frame in _frames(str(path)):
        fast = prepared.display_image(frame)
        assert fast.dtype == np.uint8
        assert np.array_equal(fast, _per_pixel(frame, monkeypatch)), name


def test_phantoms_display_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for kind in ("cxr", "ct", "mr", "mammo"):
        generate_study(kind, tmp_path / kind, seed=2, write_masks=False)
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) >= 4
    for path in files[::3]:
        for frame in _frames(str(path), 1):
            assert np.array_equal(prepared.display_image(frame), _per_pixel(frame, monkeypatch)), path.name


def test_a_table_is_used_for_16_bit_frames() -> None:
    """The table path is the one taken (its absence would not fail the equality tests)."""
    path = get_testdata_file("RG1_UNCR.dcm")  # a header window: the table applies
    (frame,) = list(_frames(str(path), 1))
    table = prepared._display_table(frame.frame(0).dtype, frame.header)
    assert table is not None and table.shape == (65536,) and table.dtype == np.uint8
