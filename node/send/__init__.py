"""Destinations that receive the node's results, behind one Protocol: C-STORE and STOW-RS take the
DICOM objects, HL7 v2 (MLLP) and FHIR take one study-level message per finished job.

Every kind is fed by the same outbox (one row and one durable file per destination and object or
message), so back-off, parking and exactly-once bookkeeping are the outbox's, whatever the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.prometheus import NodeMetrics
    from node.settings import DestinationSettings


@dataclass(frozen=True, slots=True)
class OutgoingFile:
    """A file to deliver: a Part 10 file (with its SOP class / transfer syntax) or a message."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the destination answered for one file. ``permanent``: the peer refused the content
    itself, so sending the same bytes again cannot succeed (the outbox parks it at once)."""

    path: Path
    ok: bool
    detail: str = ""
    permanent: bool = False


class Destination(Protocol):
    """Something that takes a batch of files and says, per file, whether it has them now."""

    name: str

    def send(self, files: list[OutgoingFile]) -> list[Delivery]:
        """Deliver ``files`` (one connection for the batch); never raises for a peer failure."""
        ...


@dataclass(frozen=True, slots=True)
class StudyContext:
    """The study and patient attributes a RIS or an EHR needs to file a result (HL7 PID/OBR,
    FHIR Patient/ImagingStudy). They are patient data: they go into messages, never into logs."""

    study_uid: str
    accession_number: str = ""
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""  # DICOM PN, "Family^Given^Middle^Prefix^Suffix"
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M, F, O or ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    modality: str = ""
    referring_physician: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset, study_uid: str) -> StudyContext:
        """Read the attributes from one source image; a missing or odd value is left empty."""

        def text(keyword: str) -> str:
            try:
                value = ds.get(keyword, "")
            except (ValueError, TypeError, KeyError):  # an invalid value: left out, never copied
                return ""
            return "" if value is None else str(value).strip()

        return cls(
            study_uid=study_uid,
            accession_number=text("AccessionNumber"),
            patient_id=text("PatientID"),
            issuer_of_patient_id=text("IssuerOfPatientID"),
            patient_name=text("PatientName"),
            birth_date=text("PatientBirthDate")[:8],
            sex=text("PatientSex")[:1].upper() if text("PatientSex")[:1].upper() in ("M", "F", "O") else "",
            study_date=text("StudyDate")[:8],
            study_time=text("StudyTime")[:6],
            study_description=text("StudyDescription"),
            modality=text("Modality"),
            referring_physician=text("ReferringPhysicianName"),
        )


def make_destination(
    settings: DestinationSettings, calling_aet: str, metrics: NodeMetrics | None = None
) -> Destination:
    """The sender for a destination's kind (the registry: one class per kind)."""
    if settings.kind == "dicomweb":
        from node.send.dicomweb import StowDestination

        return StowDestination(settings, metrics=metrics)
    if settings.kind == "hl7":
        from node.send.hl7 import MllpDestination

        return MllpDestination(settings, metrics=metrics)
    if settings.kind == "fhir":
        from node.send.fhir import FhirDestination

        return FhirDestination(settings, metrics=metrics)
    from node.send.cstore import CStoreDestination

    return CStoreDestination(settings, calling_aet=calling_aet, metrics=metrics)
