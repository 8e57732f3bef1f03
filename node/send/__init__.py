"""Destinations that receive the node's outputs (C-STORE now; DICOMweb later), behind one Protocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class OutgoingFile:
    """A Part 10 file to deliver and the SOP class / transfer syntax it is stored in."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the destination answered for one file."""

    path: Path
    ok: bool
    detail: str = ""


class Destination(Protocol):
    """Something that takes a batch of files and says, per file, whether it has them now."""

    name: str

    def send(self, files: list[OutgoingFile]) -> list[Delivery]:
        """Deliver ``files`` (one connection for the batch); never raises for a peer failure."""
        ...
