"""Native pixel data mapped from the file instead of read into memory (issue 16, item 1): the
preparation reads a file with ``read_dataset(path, map_pixels=True)``, which leaves values of
``MAP_PIXELS_BYTES`` or more in the file; a native frame is then a view of the file's pages.

What it must keep: the prepared tensors and displays are those of the data set read whole
(every layout the fast path takes, the frames pydicom corrects, multi-frame, deflated); a file
cut short fails as it did; the data set handed on holds every other value read (it may travel
to another process, where the file is not read again); no mapping outlives its instance.
Images here are small, so the threshold is lowered to exercise the mapping.
"""

from __future__ import annotations

import gc
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.errors import DecodeError
from node.inference import decode as dec
from node.inference.prepared import DisplaySpec, PrepareSpec
from node.inference.registry import load_registry
from tests.inference.test_prepare_speed_exact import _native_dataset

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dec, "MAP_PIXELS_BYTES", 1024)


@pytest.fixture(scope="module")
def manifest():  # noqa: ANN201
    return load_registry(REPO / "models" / "onnx").get("cxr").manifest


def _write(
    path: Path,
    values: np.ndarray,
    bits: int,
    *,
    photometric: str = "MONOCHROME2",
    ts: str = ExplicitVRLittleEndian,
    window: tuple[float, float] | None = (2000.0, 3000.0),
    extra: dict | None = None,
) -> Path:
    """A CR file of ``values`` ((frames,) rows, cols) with ``bits`` stored."""
    frames = values if values.ndim == 3 else values[np.newaxis]
    ds = _native_dataset(frames.reshape(-1, frames.shape[2]), bits, values.dtype.kind == "i", ts)
    ds.Rows = frames.shape[1]
    if values.ndim == 3:
        ds.NumberOfFrames = values.shape[0]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.5", "CR"
    ds.PhotometricInterpretation = photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def _image(rows: int = 96, cols: int = 80, top: int = 4000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, top, (rows, cols)).astype(np.uint16)


def _same(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert (x.index, x.header) == (y.index, y.header)
        if x.model_input is not None:
            assert x.model_input.tensor.dtype == y.model_input.tensor.dtype
            np.testing.assert_array_equal(x.model_input.tensor, y.model_input.tensor)
            assert x.model_input.geometry == y.model_input.geometry
        assert (x.display is None) == (y.display is None)
        if x.display is not None:
            np.testing.assert_array_equal(x.display, y.display)


def _mapped(ds: Dataset) -> bool:
    """Whether the first frame ``iter_frames`` gives is a view of a mapping of the file."""
    frame = next(dec.iter_frames(ds))
    base: object = frame.pixels
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and base.readonly


CASES = {
    "12 in 16, MONOCHROME2": (lambda: _image(), 12, "MONOCHROME2", ExplicitVRLittleEndian),
    "12 in 16, MONOCHROME1, implicit VR": (lambda: _image(seed=1), 12, "MONOCHROME1", ImplicitVRLittleEndian),
    "16 in 16": (lambda: _image(top=65535, seed=2), 16, "MONOCHROME2", ExplicitVRLittleEndian),
    "signed 12 in 16": (
        lambda: (_image(seed=3).astype(np.int32) - 2048).astype(np.int16),
        12,
        "MONOCHROME2",
        ExplicitVRLittleEndian,
    ),
    "8 bits, odd columns": (
        lambda: _image(97, 81, 256, seed=4).astype(np.uint8),
        8,
        "MONOCHROME2",
        ExplicitVRLittleEndian,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mapped_frame_prepares_as_the_data_set_read_whole(tmp_path: Path, manifest, case: str) -> None:  # noqa: ANN001
    make, bits, photometric, ts = CASES[case]
    window = (100.0, 150.0) if bits == 8 else (2000.0, 3000.0)
    path = _write(tmp_path / "a.dcm", make(), bits, photometric=photometric, ts=ts, window=window)
    assert _mapped(dec.read_dataset(path, map_pixels=True)), "the fast path maps the file"
    assert not _mapped(dec.read_dataset(path))
    spec = PrepareSpec(manifest)
    _same(spec.prepare(path, 0), spec.prepare(pydicom.dcmread(path), 0))
    shown = DisplaySpec(((0,),))
    _same(shown.prepare(path, 0), shown.prepare(pydicom.dcmread(path), 0))


def test_frames_pydicom_corrects_multi_frame_and_deflated_images_are_read_as_before(
    tmp_path: Path,
    manifest,  # noqa: ANN001
) -> None:
    spec = PrepareSpec(manifest)
    high = _image(seed=5)
    high[::7, ::5] |= 0xF000  # bits above BitsStored: pydicom clears them
    frames = np.stack([_image(seed=6), _image(seed=7), _image(seed=8)])
    for path in (
        _write(tmp_path / "high.dcm", high, 12),
        _write(tmp_path / "multi.dcm", frames, 12),
        _write(tmp_path / "deflated.dcm", _image(seed=9), 12, ts=DeflatedExplicitVRLittleEndian),
    ):
        _same(spec.prepare(path, 0), spec.prepare(pydicom.dcmread(path), 0))
    ds = dec.read_dataset(tmp_path / "deflated.dcm", map_pixels=True)
    assert dec._deferred(ds, "PixelData") is None, "a deflated data set is read whole"


def test_a_file_cut_short_fails_as_it_did(tmp_path: Path, manifest) -> None:  # noqa: ANN001
    whole = _write(tmp_path / "whole.dcm", _image(), 12).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) - 4000])
    with pytest.raises(DecodeError) as before:
        list(dec.iter_frames(dec.read_dataset(cut)))
    with pytest.raises(DecodeError) as now:
        PrepareSpec(manifest).prepare(cut, 0)
    assert type(now.value) is type(before.value)
    assert str(now.value) == str(before.value)


def test_the_data_set_handed_on_holds_every_value_and_no_mapping_is_left(tmp_path: Path, manifest) -> None:  # noqa: ANN001
    """A large value other than the pixel data (here a 4 kB document, over the lowered
    threshold) is read before the data set leaves: it is there after the file is gone."""
    blob = bytes(range(256)) * 16
    path = _write(tmp_path / "blob.dcm", _image(), 12, extra={"EncapsulatedDocument": blob})
    assert dec._deferred(dec.read_dataset(path, map_pixels=True), "EncapsulatedDocument") is not None
    (frame,) = PrepareSpec(manifest).prepare(path, 0)
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert str(path) not in maps, "the mapping went with the instance"
    assert "PixelData" not in frame.dataset
    moved = pickle.loads(pickle.dumps(frame.dataset))
    path.unlink()
    assert moved.EncapsulatedDocument == blob
    assert frame.dataset.EncapsulatedDocument == blob


REAL = ["RG1_UNCR.dcm", "RG3_UNCI.dcm", "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm"]


@pytest.mark.parametrize("name", REAL)
def test_real_vendor_files_prepare_as_read_whole(
    monkeypatch: pytest.MonkeyPatch,
    manifest,  # noqa: ANN001
    name: str,
) -> None:
    """pydicom-data's real CRs (7.2 and 6.2 MB, MONOCHROME1, 15 and 10 bits: mapped at the node's
    own threshold), a CT, an MR and an RGB ultrasound (pydicom's decode reads its deferred
    pixel data; its display only) prepare as the data set read whole."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data lacks {name}"
    path = Path(path)
    if path.stat().st_size > 4 * 2**20:
        monkeypatch.setattr(dec, "MAP_PIXELS_BYTES", 4 * 2**20)  # the node's own
        assert _mapped(dec.read_dataset(path, map_pixels=True))
    shown = DisplaySpec(((0,),))
    _same(shown.prepare(path, 0), shown.prepare(pydicom.dcmread(path), 0))
    if pydicom.dcmread(path, stop_before_pixels=True).SamplesPerPixel == 1:  # the chest steps are greyscale
        spec = PrepareSpec(manifest, check_size=False)
        _same(spec.prepare(path, 0), spec.prepare(pydicom.dcmread(path), 0))
