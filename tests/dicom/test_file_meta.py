"""The File Meta group the SCP writes before a received data set: encoded directly, byte for byte
what pydicom's write_file_meta_info wrote for pynetdicom's event.file_meta."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from node.dicom.scp import _pydicom_file_meta, file_meta_bytes


@pytest.mark.parametrize(
    ("sop_class", "syntax", "ae"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian, "STORESCU"),
        ("1.2.840.10008.5.1.4.1.1.1.1", ImplicitVRLittleEndian, "A"),
        ("1.2.840.10008.5.1.4.1.1.7", JPEG2000Lossless, "MODALITY 16 CHAR"),
        ("1.2.3", "1.2.840.10008.1.2.1.99", "ODD"),
    ],
)
def test_file_meta_is_pydicoms(sop_class: str, syntax: str, ae: str) -> None:
    for instance in (generate_uid(), generate_uid() + "1", "1.2"):
        direct = file_meta_bytes(sop_class, instance, syntax, ae)
        assert direct == _pydicom_file_meta(sop_class, instance, syntax, ae)
        part10 = b"\0" * 128 + b"DICM" + direct
        meta = pydicom.dcmread(io.BytesIO(part10), force=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == instance
        assert meta.SourceApplicationEntityTitle == ae


def test_file_meta_not_plain_goes_through_pydicom() -> None:
    weird = "1.2.3\\4"
    assert file_meta_bytes(weird, "1.2", ExplicitVRLittleEndian, "AE") == _pydicom_file_meta(
        weird, "1.2", ExplicitVRLittleEndian, "AE"
    )
