"""The real-file corpus: real vendor files (the pydicom-data package and pydicom's own test files)
and variants derived from them for the quirks hospitals send, each with the outcome a radiologist
would accept.

Every case gets fresh Study/Series/SOP Instance UIDs (the vendor files share UIDs across their
transfer-syntax variants, and the node stores one SOP Instance UID once), except where the bytes
themselves are the point (the UN-VR file is sent exactly as it is).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

#: What the node may do with a case.
#: - ("model", id): routed to that model, job done, SR + heatmap SC written and sent;
#: - ("not routed", words): not routed, the reason containing ``words``;
#: - ("not routed or model", id): either of the two (no clinical preference);
#: - ("failed", words): routed, job failed permanently after one attempt, error containing ``words``;
#: - ("refused", ""): the C-STORE gets a failure status, nothing stored.
Expect = tuple[str, str]


@dataclass
class Case:
    """One file to send and what must come of it."""

    name: str
    source: str  # the real file it is, or derives from
    make: Callable[[Path], Path]
    expect: Expect
    frames: int = 1  # frames a finished job must have analysed
    notes: list[str] = field(default_factory=list)


def real_file(name: str) -> Path:
    """Path of a real vendor file (pydicom-data) or one of pydicom's own test files."""
    path = get_testdata_file(name, download=False)
    if not path:
        raise FileNotFoundError(
            f"{name}: not in pydicom-data nor pydicom's test files (pip install pydicom-data)"
        )
    return Path(path)


def _fresh(ds: Dataset) -> Dataset:
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    return ds


def derived(source: str, change: Callable[[Dataset], None] | None = None) -> Callable[[Path], Path]:
    """A maker: ``source`` with fresh UIDs and ``change`` applied, saved (same transfer syntax
    unless ``change`` re-encodes) under the folder given."""

    def make(folder: Path) -> Path:
        ds = _fresh(pydicom.dcmread(real_file(source)))
        if change is not None:
            change(ds)
        out = folder / f"{generate_uid()[-12:]}.dcm"
        ds.save_as(out, enforce_file_format=True)
        return out

    return make


def as_is(source: str) -> Callable[[Path], Path]:
    """A maker: the real file byte for byte."""

    def make(folder: Path) -> Path:
        out = folder / source
        shutil.copyfile(real_file(source), out)
        return out

    return make


# ---------------------------------------------------------------------------------- quirk edits
def _delete(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)

    return change


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)

    return change


def _malformed_spacing(ds: Dataset) -> None:
    """A DS value that is not a number, as some CR readers write it (written as raw bytes)."""
    from pydicom.dataelem import RawDataElement

    value = b"abc\\def"
    ds[0x00280030] = RawDataElement(pydicom.tag.Tag(0x00280030), "DS", len(value), value, 0, False, True)


def _private_tags(ds: Dataset) -> None:
    block = ds.private_block(0x0029, "ACME 1.1", create=True)
    block.add_new(0x01, "LO", "vendor text")
    block.add_new(0x02, "OB", b"\x00\x01\x02\x03")
    block.add_new(0x03, "UN", b"\x10\x20\x30\x40")


def _overlay_in_high_bits(ds: Dataset) -> None:
    """BitsStored 12 of 16 with an overlay burned into bit 15 (retired in-pixel overlays), as old
    MR/CT vendors wrote them: the node must mask, not read 32 768 + value."""
    arr = ds.pixel_array.astype(np.uint16)
    arr = np.clip(arr, 0, 4095)
    arr[::16, :] |= 0x8000
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.PixelData = arr.tobytes()
    for element, vr, value in (
        (0x0010, "US", ds.Rows),  # Overlay Rows
        (0x0011, "US", ds.Columns),  # Overlay Columns
        (0x0040, "CS", "G"),  # Overlay Type
        (0x0050, "SS", [1, 1]),  # Overlay Origin
        (0x0100, "US", 16),  # Overlay Bits Allocated
        (0x0102, "US", 15),  # Overlay Bit Position (retired: overlay in the pixel data)
    ):
        ds.add_new(0x60000000 | element, vr, value)
    if "WindowCenter" in ds:
        ds.WindowCenter, ds.WindowWidth = 2048, 4096


def _signed_cr(ds: Dataset) -> None:
    """The CR's stored values as signed 16-bit with a rescale intercept putting them back."""
    arr = ds.pixel_array.astype(np.int32) - 16384
    ds.PixelData = arr.astype(np.int16).tobytes()
    ds.PixelRepresentation = 1
    ds.BitsStored, ds.HighBit = 16, 15
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 16384, 1, "US"


def _drop_frames(keep: int) -> Callable[[Dataset], None]:
    """Keep only the first ``keep`` frames of encapsulated pixel data (NumberOfFrames unchanged)."""

    def change(ds: Dataset) -> None:
        from pydicom.encaps import encapsulate, generate_frames

        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
        ds.PixelData = encapsulate(frames[:keep])

    return change


def _sigmoid_voi(ds: Dataset) -> None:
    ds.VOILUTFunction = "SIGMOID"


def _downsampled_cr(ds: Dataset) -> None:
    """RG1 at a quarter of its size (a smaller detector; keeps the corpus quick)."""
    arr = ds.pixel_array[::4, ::4].copy()
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()


def _cr(change: Callable[[Dataset], None]) -> Callable[[Dataset], None]:
    """A CR quirk applied to the quarter-size RG1 chest radiograph (uncompressed)."""

    def both(ds: Dataset) -> None:
        _downsampled_cr(ds)
        change(ds)

    return both


def cases() -> list[Case]:
    """The corpus."""
    cxr: Expect = ("model", "cxr")
    out: list[Case] = []
    # ---- real chest CR (MONOCHROME1, PixelSpacing 0\0, no ImagerPixelSpacing) in four syntaxes
    for name in ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm"):
        out.append(Case(name, name, derived(name), cxr))
    # ---- CR quirks hospitals send (on the quarter-size chest CR)
    quirks: dict[str, Callable[[Dataset], None]] = {
        "no PixelSpacing": _delete("PixelSpacing"),
        "PixelSpacing malformed": _malformed_spacing,
        "PixelSpacing 3 values": _set(PixelSpacing=[0.1, 0.1, 0.1]),
        "PixelSpacing negative": _set(PixelSpacing=[-0.1, 0.1]),
        "ImagerPixelSpacing 0\\0": _set(ImagerPixelSpacing=[0, 0]),
        "no PatientOrientation/ViewPosition/Laterality": _delete(
            "PatientOrientation", "ViewPosition", "Laterality", "ImageLaterality"
        ),
        "unknown SpecificCharacterSet": _set(SpecificCharacterSet="ISO_IR 999"),
        "multi-valued SpecificCharacterSet": _set(SpecificCharacterSet=["", "ISO 2022 IR 100"]),
        "private tags": _private_tags,
        "signed pixels": _signed_cr,
        "SIGMOID VOI": _sigmoid_voi,
    }
    for label, change in quirks.items():
        out.append(Case(f"RG1 {label}", "RG1_UNCI.dcm", derived("RG1_UNCI.dcm", _cr(change)), cxr))
    # ---- other radiographs: a CR of an extremity is no chest
    for name in ("RG3_UNCI.dcm", "RG3_J2KR.dcm"):
        out.append(Case(name, name, derived(name), ("not routed", "")))
    # ---- CT: real head CT (WG04 693, no BodyPartExamined), pydicom's thoracic slice, UN VRs, neck
    for name in ("693_UNCI.dcm", "693_J2KR.dcm"):
        out.append(Case(name, name, derived(name), ("not routed", "")))
    out.append(Case("CT_small.dcm", "CT_small.dcm", derived("CT_small.dcm"), ("not routed", "")))
    out.append(
        Case(
            "explicit_VR-UN.dcm",
            "explicit_VR-UN.dcm",
            as_is("explicit_VR-UN.dcm"),
            ("not routed or model", "ct-liver"),
        )
    )
    out.append(Case("bad_sequence.dcm", "bad_sequence.dcm", derived("bad_sequence.dcm"), ("not routed", "")))
    # enhanced brain-perfusion CT: never the liver model
    out.append(
        Case(
            "eCT_Supplemental.dcm",
            "eCT_Supplemental.dcm",
            derived("eCT_Supplemental.dcm"),
            ("not routed", ""),
        )
    )
    # ---- MR: enhanced head MR (10 frames) in five syntaxes, all frames analysed
    for name in (
        "emri_small.dcm",
        "emri_small_RLE.dcm",
        "emri_small_big_endian.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
    ):
        out.append(Case(name, name, derived(name), ("model", "mr-brain"), frames=10))
    # like emri_small_jpeg_2k_lossless_too_short.dcm: frames missing from the pixel data
    out.append(
        Case(
            "enhanced MR, 3 of 10 frames missing",
            "emri_small_jpeg_2k_lossless.dcm",
            derived("emri_small_jpeg_2k_lossless.dcm", _drop_frames(7)),
            ("failed", "frame"),
        )
    )
    out.append(
        Case(
            "MR overlay in high bits",
            "MR_small.dcm",
            derived(
                "MR_small.dcm",
                _chain(
                    _overlay_in_high_bits,
                    _set(ImageType=["ORIGINAL", "PRIMARY", "OTHER"], BodyPartExamined="HEAD"),
                ),
            ),
            ("model", "mr-brain"),
        )
    )
    # a real shoulder MR and an abdominal MR: no model reads them
    for name in ("MR2_UNCI.dcm", "MR2_J2KI.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"):
        out.append(Case(name, name, derived(name), ("not routed", "")))
    # ---- not radiology the node reads: US (palette, YBR, multi-frame), NM, SC, SEG, LUT files
    for name in (
        "US1_UNCI.dcm",
        "US1_J2KI.dcm",
        "OBXXXX1A.dcm",
        "OBXXXX1A_rle_2frame.dcm",
        "gdcm-US-ALOKA-16.dcm",
        "color3d_jpeg_baseline.dcm",
        "JPEG-LL.dcm",
        "SC_rgb.dcm",
        "SC_ybr_full_uncompressed.dcm",
        "liver.dcm",
        "mlut_18.dcm",
        "vlut_04.dcm",
    ):
        out.append(Case(name, name, derived(name), ("not routed", "")))
    return out


def _chain(*changes: Callable[[Dataset], None]) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for one in changes:
            one(ds)

    return change
