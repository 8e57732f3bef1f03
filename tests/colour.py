"""Colour photographs for the tests of issue 20: fundus (Ophthalmic Photography, OP), dermoscopy
(VL Photographic, XC) and blood-smear microscopy (VL Microscopic, GM) images with the headers the
phantoms use, in RGB, YBR_FULL, YBR_FULL_422 (native) or JPEG baseline (YBR_FULL_422), planar
configuration 0 or 1."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
VL_MICROSCOPIC = "1.2.840.10008.5.1.4.1.1.77.1.2"

KINDS = {
    "fundus": dict(sop_class=OP_8BIT, modality="OP", description="Fundus photograph"),
    "derm": dict(sop_class=VL_PHOTOGRAPHIC, modality="XC", description="Dermoscopy of a lesion"),
    "smear": dict(sop_class=VL_MICROSCOPIC, modality="GM", description="Thin blood smear, Giemsa"),
}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def picture(kind: str, rows: int = 96, cols: int = 128, seed: int = 0) -> np.ndarray:
    """An RGB picture (uint8) of each kind: a reddish disc with dark vessels on black (fundus), a
    brown blob on skin colour (dermoscopy), pink cells on a pale background (smear)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    img = np.zeros((rows, cols, 3), dtype=np.float64)
    if kind == "fundus":
        disc = (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 <= (0.46 * rows) ** 2
        img[disc] = (190, 80, 40)
        img[disc & (np.abs(yy - rows / 2 - 8 * np.sin(xx / 11)) < 1.5)] = (110, 30, 20)
        img[(yy - rows * 0.45) ** 2 + (xx - cols * 0.62) ** 2 < 25] = (240, 220, 120)  # an exudate
    elif kind == "derm":
        img[:] = (215, 170, 150)
        blob = ((yy - rows * 0.5) / (0.3 * rows)) ** 2 + ((xx - cols * 0.45) / (0.25 * cols)) ** 2 <= 1
        img[blob] = (110, 70, 50)
    else:
        img[:] = (235, 225, 230)
        for cy, cx in rng.uniform(8, (rows - 8, cols - 8), size=(12, 2)):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = (220, 140, 150)
        img[(yy - rows * 0.5) ** 2 + (xx - cols * 0.5) ** 2 <= 4] = (90, 40, 120)  # a ring form
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def colour_dataset(
    kind: str,
    pixels: np.ndarray | None = None,
    encoding: str = "RGB",
    planar: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    **attrs: object,
) -> Dataset:
    """A data set (with file meta) of ``kind`` holding ``pixels`` (RGB uint8) encoded as
    ``encoding``: RGB, YBR_FULL, YBR_FULL_422 (native) or JPEG (baseline, YBR_FULL_422)."""
    spec = KINDS[kind]
    rgb = picture(kind) if pixels is None else pixels
    rows, cols = rgb.shape[:2]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = spec["sop_class"]
    ds.SOPClassUID = spec["sop_class"]
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Colour^Test",
        "C-0001",
        "19800101",
        "F",
    )
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261201", "120000", "A-1", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = spec["modality"]
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SeriesDescription = spec["description"]
    ds.Manufacturer = "pacs-node tests"
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20261201", "120000", "20261201120000"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ""
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation, ds.RecognizableVisualFeatures = "NO", "NO"
    if kind == "fundus":
        ds.ImageLaterality = "R"
        ds.AnatomicRegionSequence = [_code("81745001", "SCT", "Eye")]
    elif kind == "derm":
        ds.AnatomicRegionSequence = [_code("39937001", "SCT", "Skin")]
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = planar
    if encoding == "JPEG":
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "10"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        frame = hd.frame.encode_frame(
            rgb,
            transfer_syntax_uid=JPEGBaseline8Bit,
            bits_allocated=8,
            bits_stored=8,
            photometric_interpretation="YBR_FULL_422",
            pixel_representation=0,
            planar_configuration=0,
        )
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        return ds
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PhotometricInterpretation = encoding
    values = rgb if encoding == "RGB" else convert_color_space(rgb, "RGB", "YBR_FULL")
    if encoding == "YBR_FULL_422":
        if cols % 2:
            raise ValueError("YBR_FULL_422 needs an even number of columns")
        ds.PlanarConfiguration = 0  # 422 is always colour-by-pixel (PS3.3 C.7.6.3.1.3)
        y = values[..., 0].reshape(rows, cols // 2, 2)
        cb = values[..., 1].reshape(rows, cols // 2, 2).mean(axis=2).round().astype(np.uint8)
        cr = values[..., 2].reshape(rows, cols // 2, 2).mean(axis=2).round().astype(np.uint8)
        packed = np.stack([y[..., 0], y[..., 1], cb, cr], axis=-1)  # Y1 Y2 Cb Cr per pixel pair
        ds.PixelData = packed.tobytes()
    elif planar == 1:
        ds.PixelData = np.ascontiguousarray(values.transpose(2, 0, 1)).tobytes()
    else:
        ds.PixelData = np.ascontiguousarray(values).tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def write(ds: Dataset, path: Path) -> Path:
    """Save ``ds`` as a DICOM file (with preamble) at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
