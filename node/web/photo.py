"""A JPEG or PNG photograph wrapped as a DICOM image, so that an upload on the "Analyse a file"
page runs the same routing and analysis as an image sent over C-STORE.

Each kind of photograph becomes the IOD that a modality of that kind writes: Ophthalmic
Photography 8 Bit (OP) for a fundus photograph, VL Photographic (XC, SeriesDescription
"Dermoscopy", anatomic region skin) for dermoscopy, VL Microscopic (GM, "blood smear") for a smear,
Computed Radiography (CR, chest, greyscale) for an exported radiograph, and a secondary capture
otherwise (which the routing rules exclude: the page then says why). Every UID comes from the
node's UID root (``outputs.uid_root``). The pixels are decoded with Pillow (EXIF orientation
applied) and stored uncompressed; a JPEG source is marked as lossy compressed. The photograph's
own metadata (EXIF, comments) is not copied: only its pixels.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO

import highdicom as hd
import numpy as np
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    OphthalmicPhotography8BitImageStorage,
    SecondaryCaptureImageStorage,
    VLMicroscopicImageStorage,
    VLPhotographicImageStorage,
    generate_uid,
)

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PhotoRefused(Exception):
    """The photograph cannot be wrapped; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class PhotoKind:
    """One kind of photograph the page offers, and the DICOM image it becomes."""

    key: str
    label: str
    modality: str
    sop_class_uid: str
    series_description: str
    colour: bool = True


KINDS: dict[str, PhotoKind] = {
    k.key: k
    for k in (
        PhotoKind(
            "fundus",
            "Fundus photograph (OP, Ophthalmic Photography 8 Bit)",
            "OP",
            OphthalmicPhotography8BitImageStorage,
            "Fundus photograph",
        ),
        PhotoKind(
            "dermoscopy",
            "Dermoscopy photograph (XC, VL Photographic)",
            "XC",
            VLPhotographicImageStorage,
            "Dermoscopy",
        ),
        PhotoKind(
            "microscopy",
            "Blood smear micrograph (GM, VL Microscopic)",
            "GM",
            VLMicroscopicImageStorage,
            "blood smear",
        ),
        PhotoKind(
            "chest-xray",
            "Chest radiograph exported as a picture (CR, chest PA, greyscale)",
            "CR",
            ComputedRadiographyImageStorage,
            "Chest PA (from a picture)",
            colour=False,
        ),
        PhotoKind(
            "other",
            "Other picture (secondary capture)",
            "OT",
            SecondaryCaptureImageStorage,
            "Uploaded picture",
        ),
    )
}

#: SNOMED CT codes of the anatomy each kind shows (AnatomicRegionSequence).
_SKIN = hd.sr.CodedConcept("39937001", "SCT", "Skin")
_EYE = hd.sr.CodedConcept("81745001", "SCT", "Eye")


def sniff(data: bytes) -> str:
    """What the bytes are: ``dicom`` (Part 10 preamble), ``jpeg``, ``png`` or ``unknown``."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return "unknown"


def decode_photo(data: bytes, max_pixels: int, colour: bool = True) -> tuple[np.ndarray, str]:
    """The photograph's pixels, EXIF orientation applied: (rows, columns, 3) uint8 RGB, or
    (rows, columns) uint8 grey when not ``colour``; and its format (JPEG or PNG). A picture
    above ``max_pixels`` is refused (413) before its pixels are decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(BytesIO(data), formats=["JPEG", "PNG"])
            rows_cols = image.size[0] * image.size[1]
            if rows_cols > max_pixels:
                raise PhotoRefused(
                    413,
                    f"the picture is {image.size[0]}x{image.size[1]} pixels; "
                    f"the limit is {max_pixels} pixels (limits)",
                )
            image.load()
            fmt = str(image.format)
            upright = ImageOps.exif_transpose(image)
            pixels = np.asarray(upright.convert("RGB" if colour else "L"), dtype=np.uint8)
        except PhotoRefused:
            raise
        except (
            OSError,
            ValueError,
            SyntaxError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as exc:
            raise PhotoRefused(400, f"the picture cannot be decoded as JPEG or PNG: {exc}") from exc
    if pixels.shape[0] < 8 or pixels.shape[1] < 8:
        raise PhotoRefused(
            422, f"the picture is only {pixels.shape[1]}x{pixels.shape[0]} pixels: too small to analyse"
        )
    return np.ascontiguousarray(pixels), fmt


def _code_item(code: hd.sr.CodedConcept) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = (
        code.value,
        code.scheme_designator,
        code.meaning,
    )
    return item


def _pixels(ds: Dataset, pixels: np.ndarray) -> None:
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.tobytes()


def wrap_photo(
    pixels: np.ndarray,
    kind: PhotoKind,
    uid_root: str,
    source_format: str,
    source_bytes: int,
    eye: str = "R",
) -> bytes:
    """A DICOM Part 10 file of ``kind`` holding ``pixels``, every UID under ``uid_root``;
    ``source_bytes`` (the photograph's size) gives a JPEG's compression ratio, ``eye`` (R or L)
    the laterality of a fundus photograph."""
    now = datetime.now(UTC)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = kind.sop_class_uid
    ds.SOPInstanceUID = generate_uid(prefix=uid_root)
    ds.StudyInstanceUID = generate_uid(prefix=uid_root)
    ds.SeriesInstanceUID = generate_uid(prefix=uid_root)
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient and study: an upload names nobody (type 2: present, empty)
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.StudyDescription = "Analyse a file (web upload)"
    ds.Modality = kind.modality
    ds.SeriesNumber = 1
    ds.SeriesDescription = kind.series_description
    ds.Manufacturer = "pacs-node"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDate, ds.AcquisitionTime = date, time
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]  # the photograph as taken, only wrapped
    ds.BurnedInAnnotation = "NO"
    if source_format == "JPEG":
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = f"{pixels.nbytes / max(source_bytes, 1):.2f}"[:16]
    else:
        ds.LossyImageCompression = "00"
    _pixels(ds, pixels)
    if kind.key == "fundus":
        _fundus(ds, uid_root, eye)
    elif kind.key in ("dermoscopy", "microscopy"):
        ds.AcquisitionDateTime = f"{date}{time}"
        ds.AcquisitionContextSequence = []
        if kind.key == "dermoscopy":
            ds.AnatomicRegionSequence = [_code_item(_SKIN)]
            ds.Laterality = ""  # skin: paired or not depends on where; unknown for an upload
        else:
            _specimen(ds, uid_root)
    elif kind.key == "chest-xray":
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.ImageType = ["DERIVED", "PRIMARY"]  # re-captured from a picture; not a secondary capture
        ds.PresentationLUTShape = "IDENTITY"
    else:
        ds.ConversionType = "WSD"  # workstation: an uploaded picture
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.Laterality = ""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = generate_uid(prefix=uid_root, entropy_srcs=["pacs-node photo"])
    ds.file_meta.ImplementationVersionName = "PACSNODE_PHOTO"
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _fundus(ds: Dataset, uid_root: str, eye: str) -> None:
    """Ophthalmic Photography modules: the image, multi-frame (one frame), synchronization (none),
    ocular region and the acquisition parameters (type 2, unknown for an upload)."""
    if eye not in ("R", "L"):
        raise PhotoRefused(400, f"the eye of a fundus photograph is R or L, not {eye!r}")
    ds.SynchronizationFrameOfReferenceUID = generate_uid(prefix=uid_root)
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 0
    ds.AcquisitionDateTime = f"{ds.AcquisitionDate}{ds.AcquisitionTime}"
    ds.ImageLaterality = eye
    ds.AnatomicRegionSequence = [_code_item(_EYE)]
    ds.AcquisitionContextSequence = []
    ds.PatientEyeMovementCommanded = ""
    ds.HorizontalFieldOfView = None
    ds.RefractiveStateSequence = []
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = ""
    ds.AcquisitionDeviceTypeCodeSequence = [
        _code_item(hd.sr.CodedConcept("409898007", "SCT", "Fundus Camera"))
    ]
    ds.IlluminationTypeCodeSequence = []
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.ImagePathFilterTypeStackCodeSequence = []
    ds.LensesCodeSequence = []
    ds.DetectorType = "CCD"


def _specimen(ds: Dataset, uid_root: str) -> None:
    """Specimen module of a micrograph: one slide, one specimen, both unidentified but unique."""
    ds.ContainerIdentifier = str(generate_uid(prefix=uid_root))[-16:]
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [_code_item(codes.SCT.MicroscopeSlide)]
    specimen = Dataset()
    specimen.SpecimenIdentifier = ds.ContainerIdentifier
    specimen.SpecimenUID = generate_uid(prefix=uid_root)
    specimen.IssuerOfTheSpecimenIdentifierSequence = []
    specimen.SpecimenPreparationSequence = []
    ds.SpecimenDescriptionSequence = [specimen]
