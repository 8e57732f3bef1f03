"""What every synthetic instance shares: UIDs, patient/study/series/equipment modules, pixel module, writing.

UIDs are derived deterministically from the seed under a configurable root (so the same seed gives
the same UIDs), or drawn at random under that root when ``seeded_uids`` is off.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    UID,
    ExplicitVRLittleEndian,
    generate_uid,
)

from node import __version__

from .rendered import RenderedImage
from .texture import rng_stream

log = logging.getLogger(__name__)

MANUFACTURER = "pacs-node synth"
INSTITUTION = "Synthetic Phantom Hospital"
IMPLEMENTATION_VERSION = "PACSNODE_SYNTH"
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


def normalise_uid_root(root: str | None) -> str:
    """The UID root with a trailing dot (pydicom's root when None); ValueError if it is invalid."""
    if root is None or root == "":
        return PYDICOM_ROOT_UID
    r = root if root.endswith(".") else root + "."
    if not _UID_ROOT_RE.match(r) or len(r) > 40:
        raise ValueError(
            f"invalid UID root {root!r}: digits and dots, no leading zeros, at most 40 characters"
        )
    return r


class UidMaker:
    """Makes UIDs under a root: derived from ``(namespace, seed, key...)``, or random when seed is None."""

    def __init__(self, root: str | None, seed: int | None, namespace: str) -> None:
        self.root = normalise_uid_root(root)
        self.seed = seed
        self.namespace = namespace

    def __call__(self, *key: object) -> str:
        """A UID for ``key`` (for example ``("series", 1)``)."""
        if self.seed is None:
            return str(generate_uid(prefix=self.root))
        return str(
            generate_uid(prefix=self.root, entropy_srcs=[self.namespace, str(self.seed), *map(str, key)])
        )


@dataclass(frozen=True)
class Equipment:
    """General Equipment module values."""

    manufacturer: str
    model: str
    station: str
    serial: str
    software: str


@dataclass(frozen=True)
class StudyContext:
    """Everything shared by the instances of one study (patient, study, equipment, frame of reference)."""

    kind: str
    seed: int
    uids: UidMaker
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    study_uid: str
    study_id: str
    accession: str
    study_datetime: dt.datetime
    study_description: str
    frame_of_reference_uid: str
    equipment: Equipment


def make_study_context(
    kind: str,
    seed: int,
    *,
    uid_root: str | None = None,
    seeded_uids: bool = True,
    patient_number: int | None = None,
    sex: str | None = None,
    description: str,
    model: str,
) -> StudyContext:
    """Build the shared study context of a phantom study; all values are synthetic and seeded."""
    uids = UidMaker(uid_root, seed if seeded_uids else None, f"pacs-node-synth/{kind}")
    rng = rng_stream(seed, "study")
    number = int(seed % 100_000_000 if patient_number is None else patient_number)
    prng = rng_stream(number, "patient")  # the same patient number always has the same demographics
    if sex is None:
        sex = "F" if prng.random() < 0.5 else "M"
    start = dt.date(2019, 1, 1)
    study_date = start + dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    study_time = dt.time(int(rng.integers(7, 20)), int(rng.integers(0, 60)), int(rng.integers(0, 60)))
    when = dt.datetime.combine(study_date, study_time)
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(prng.integers(0, 65 * 365)))
    age = study_date.year - birth.year - ((study_date.month, study_date.day) < (birth.month, birth.day))
    age = max(age, 18)
    accession_no = int(rng.integers(0, 100_000_000))
    return StudyContext(
        kind=kind,
        seed=seed,
        uids=uids,
        patient_name=f"SYNTH^PHANTOM^{number:08d}",
        patient_id=f"SYN{number:08d}",
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_sex=sex,
        patient_age=f"{age:03d}Y",
        study_uid=uids("study"),
        study_id=f"S{int(rng.integers(0, 10_000_000)):07d}",
        accession=f"SYNACC{accession_no:08d}",
        study_datetime=when,
        study_description=description,
        frame_of_reference_uid=uids("frame-of-reference"),
        equipment=Equipment(
            manufacturer=MANUFACTURER,
            model=model,
            station=f"SYNTH{int(rng.integers(1, 20)):02d}",
            serial=f"SN{int(rng.integers(0, 1_000_000)):06d}",
            software=f"pacs-node {__version__}",
        ),
    )


@dataclass(frozen=True)
class SeriesInfo:
    """General Series module values of one series."""

    uid: str
    number: int
    modality: str
    description: str
    body_part: str
    offset: dt.timedelta


def series_info(
    ctx: StudyContext, number: int, modality: str, description: str, body_part: str, minutes: float = 2.0
) -> SeriesInfo:
    """Series ``number`` of the study, acquired ``minutes`` after the study start."""
    return SeriesInfo(
        uid=ctx.uids("series", number),
        number=number,
        modality=modality,
        description=description,
        body_part=body_part,
        offset=dt.timedelta(minutes=minutes),
    )


def base_dataset(
    ctx: StudyContext,
    series: SeriesInfo,
    sop_class_uid: str,
    instance_number: int,
    content_offset: dt.timedelta = dt.timedelta(0),
) -> Dataset:
    """A dataset with the SOP Common, Patient, General Study, Patient Study, General Series,
    General Equipment and General Image/Acquisition attributes filled in."""
    ds = Dataset()
    sop_uid = ctx.uids("instance", series.number, instance_number)
    series_time = ctx.study_datetime + series.offset
    content_time = series_time + content_offset
    created = content_time + dt.timedelta(seconds=5)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = created.strftime("%Y%m%d")
    ds.InstanceCreationTime = created.strftime("%H%M%S")
    ds.InstanceCreatorUID = ctx.uids.root.rstrip(".")

    ds.PatientName = ctx.patient_name
    ds.PatientID = ctx.patient_id
    ds.IssuerOfPatientID = "PACS-NODE-SYNTH"
    ds.PatientBirthDate = ctx.patient_birth_date
    ds.PatientSex = ctx.patient_sex
    ds.PatientAge = ctx.patient_age
    ds.PatientComments = "Synthetic phantom; not a real patient"

    ds.StudyInstanceUID = ctx.study_uid
    ds.StudyDate = ctx.study_datetime.strftime("%Y%m%d")
    ds.StudyTime = ctx.study_datetime.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = ctx.study_id
    ds.AccessionNumber = ctx.accession
    ds.StudyDescription = ctx.study_description

    ds.Modality = series.modality
    ds.SeriesInstanceUID = series.uid
    ds.SeriesNumber = series.number
    ds.SeriesDate = series_time.strftime("%Y%m%d")
    ds.SeriesTime = series_time.strftime("%H%M%S")
    ds.SeriesDescription = series.description
    ds.BodyPartExamined = series.body_part

    eq = ctx.equipment
    ds.Manufacturer = eq.manufacturer
    ds.InstitutionName = INSTITUTION
    ds.StationName = eq.station
    ds.ManufacturerModelName = eq.model
    ds.DeviceSerialNumber = eq.serial
    ds.SoftwareVersions = eq.software

    ds.InstanceNumber = instance_number
    ds.ContentDate = content_time.strftime("%Y%m%d")
    ds.ContentTime = content_time.strftime("%H%M%S")
    ds.AcquisitionDate = content_time.strftime("%Y%m%d")
    ds.AcquisitionTime = content_time.strftime("%H%M%S")
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def add_frame_of_reference(ds: Dataset, ctx: StudyContext) -> None:
    """Frame of Reference module."""
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""


def _ds_number(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.8e}"[:16]


def add_image_pixel(ds: Dataset, image: RenderedImage, voi: bool = True) -> None:
    """Image Pixel module (and VOI LUT window) from a rendered image; pixels are written as stored."""
    px = image.pixels
    if px.dtype not in (np.uint16, np.int16):
        raise TypeError(f"stored pixels must be uint16 or int16, got {px.dtype}")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = image.photometric
    ds.Rows, ds.Columns = int(px.shape[0]), int(px.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = int(image.bits_stored)
    ds.HighBit = int(image.bits_stored) - 1
    ds.PixelRepresentation = 1 if image.signed else 0
    if voi:
        ds.WindowCenter = _ds_number(image.window_center)
        ds.WindowWidth = _ds_number(max(image.window_width, 1.0))
    ds.PixelData = np.ascontiguousarray(px, dtype=px.dtype.newbyteorder("<")).tobytes()


def write_part10(ds: Dataset, path: Path, transfer_syntax: str | None = None) -> None:
    """Write ``ds`` as a DICOM Part 10 file (preamble, file meta, explicit VR little endian unless
    ``transfer_syntax`` names the encapsulated syntax its Pixel Data is already in)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    meta.SourceApplicationEntityTitle = "SYNTH"
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    log.debug("wrote %s", path.name)


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item."""
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item
