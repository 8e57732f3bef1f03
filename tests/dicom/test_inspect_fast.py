"""The fast header walk (node.dicom.inspect._fast_header) against the pydicom walk it stands in
for: on every little endian file of pydicom's test data, and on many damaged copies of one, it
either gives up or returns exactly the header the pydicom walk returns (and never accepts a data
set the pydicom walk refuses)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.dicom.inspect import Header, _fast_header, _pydicom_header, inspect_dataset
from node.errors import IngestError
from tests.helpers import sample_file


def _body(path: str) -> tuple[bytes, UID] | None:
    """The data set bytes (after the File Meta group) and transfer syntax of a Part 10 file."""
    data = Path(path).read_bytes()
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    stream = io.BytesIO(data)
    stream.seek(132)
    try:
        meta = _read_file_meta_info(stream)
    except Exception:
        return None
    syntax = meta.get("TransferSyntaxUID")
    if not syntax:
        return None
    return data[stream.tell() :], UID(str(syntax))


def _slow(body: bytes, syntax: UID) -> Header | IngestError:
    try:
        return _pydicom_header(io.BytesIO(body), io.BytesIO(body), syntax)
    except IngestError as exc:
        return exc


def _check(body: bytes, syntax: UID) -> bool:
    """Assert the fast walk agrees with the pydicom walk; True when the fast walk answered."""
    fast = _fast_header(memoryview(body), syntax.is_implicit_VR)
    if fast is None:
        return False
    assert _slow(body, syntax) == fast
    return True


def _little_endian_files() -> list[tuple[str, bytes, UID]]:
    found = []
    for path in get_testdata_files("*.dcm"):
        got = _body(path)
        if got is not None and got[1].is_little_endian and got[1] != DeflatedExplicitVRLittleEndian:
            found.append((Path(path).name, *got))
    return found


def test_fast_walk_matches_pydicom_on_test_data() -> None:
    files = _little_endian_files()
    assert len(files) > 50
    answered = sum(_check(body, syntax) for _, body, syntax in files)
    assert answered > len(files) // 2  # the fast walk answers for most real files


@pytest.mark.parametrize("implicit", [False, True])
def test_fast_walk_matches_pydicom_on_damaged_copies(implicit: bool) -> None:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.SeriesDescription = "chest  "
    ds.SeriesNumber = "  7"
    syntax = UID(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    body, _ = _body_of(buffer.getvalue())
    assert _check(body, syntax)
    rng = random.Random(16)
    answered = 0
    for _ in range(400):
        damaged = bytearray(body)
        kind = rng.randrange(3)
        if kind == 0:  # truncated
            damaged = damaged[: rng.randrange(len(damaged))]
        elif kind == 1:  # a few bytes changed
            for _ in range(rng.randrange(1, 4)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        else:  # a header byte changed (a tag, VR or length of an early element)
            damaged[rng.randrange(min(len(damaged), 2000))] ^= 1 << rng.randrange(8)
        answered += _check(bytes(damaged), syntax)
    assert answered > 50


def _body_of(data: bytes) -> tuple[bytes, UID]:
    stream = io.BytesIO(data)
    stream.seek(132)
    meta = _read_file_meta_info(stream)
    return data[stream.tell() :], UID(str(meta.TransferSyntaxUID))


def test_values_the_fast_walk_leaves_to_pydicom() -> None:
    """Values with a backslash, non-ASCII bytes or a non-integer IS give the pydicom walk's
    header (the fast walk gives up on them)."""
    for name, value in (
        ("SeriesDescription", "a\\b"),
        ("SeriesDescription", "Thorax ä"),
        ("SeriesNumber", "1.0"),
        ("Modality", "ct"),
    ):
        copy = pydicom.dcmread(sample_file("CT_small.dcm"))
        if name == "SeriesNumber":  # not an integer string: written without validation
            copy[0x00200011] = pydicom.DataElement(0x00200011, "IS", value, validation_mode=0)
        else:
            if "ä" in value:
                copy.SpecificCharacterSet = "ISO_IR 100"
            setattr(copy, name, value)
        buffer = io.BytesIO()
        copy.save_as(buffer, enforce_file_format=True)
        body, syntax = _body_of(buffer.getvalue())
        assert _fast_header(memoryview(body), syntax.is_implicit_VR) is None or name == "Modality"
        header = inspect_dataset(io.BytesIO(body), syntax)
        assert header == _slow(body, syntax)
        if name == "Modality":
            assert header.modality == "CT"
