"""Photographs as DICOM (node/web/photo.py): each kind wrapped passes dciodvfy with no error,
a picture over the pixel budget is refused before it is decoded, and EXIF orientation is applied."""

from __future__ import annotations

import subprocess

import pydicom
import pytest

from node.web.photo import KINDS, PhotoRefused, decode_photo, wrap_photo
from tests.web.conftest import UID_ROOT, picture


def test_wrapped_photographs_are_valid_dicom(tmp_path):
    data = picture()
    for key, kind in KINDS.items():
        pixels, fmt = decode_photo(data, 10**8, kind.colour)
        path = tmp_path / f"{key}.dcm"
        path.write_bytes(wrap_photo(pixels, kind, UID_ROOT, fmt, len(data)))
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == kind.sop_class_uid and ds.Modality == kind.modality
        assert str(ds.SOPInstanceUID).startswith(UID_ROOT) and str(ds.StudyInstanceUID).startswith(UID_ROOT)
        assert ds.PatientName == "" and ds.LossyImageCompression == "01"
        assert ds.pixel_array.shape[:2] == (64, 96)
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, (key, errors)
    derm = pydicom.dcmread(tmp_path / "dermoscopy.dcm")
    assert derm.SeriesDescription == "Dermoscopy"
    assert derm.AnatomicRegionSequence[0].CodeValue == "39937001"
    assert pydicom.dcmread(tmp_path / "microscopy.dcm").SeriesDescription == "blood smear"
    assert pydicom.dcmread(tmp_path / "fundus.dcm").ImageLaterality == "R"


def test_picture_over_the_pixel_budget_is_refused_before_decoding():
    with pytest.raises(PhotoRefused) as refused:
        decode_photo(picture(size=(96, 64)), max_pixels=96 * 64 - 1)
    assert refused.value.status == 413 and "96x64 pixels; the limit is 6143 pixels" in refused.value.message
    assert decode_photo(picture(size=(96, 64)), max_pixels=96 * 64)[0].shape == (64, 96, 3)


def test_exif_orientation_is_applied():
    pixels, fmt = decode_photo(picture(size=(96, 64), exif_rotate=True), 10**8)
    assert fmt == "JPEG" and pixels.shape == (96, 64, 3)  # shown rotated: portrait
    grey, _ = decode_photo(picture(fmt="PNG"), 10**8, colour=False)
    assert grey.shape == (64, 96)
