"""Ground truth of a generated study: the ``truth.json`` sidecar and its in-memory form.

``truth.json`` (format ``pacs-node-synth-truth/1``) holds::

    {
      "format": "pacs-node-synth-truth/1",
      "generator": "pacs-node <version>",
      "kind": "ct",                       # cxr | mammo | ct | mr | fundus | derm | smear
      "seed": 42,                         # generate_study(kind, dir, seed=42, label=labels) rebuilds it
      "labels": ["malignant"],            # study labels (cxr: subset of tuberculosis/pneumonia, may be [])
      "study_instance_uid": "...", "accession_number": "...", "patient_id": "SYN00000042",
      "series": [{"series_instance_uid": "...", "series_number": 1, "modality": "CT", "description": "..."}],
      "geometry": {...},                  # series-level values (slice thickness, pixel spacing, ...)
      "lesions": [{"id": 1, "label": "malignant", "type": "hypoenhancing_mass", "shape": {...}}],
      "instances": [{
          "sop_instance_uid": "...", "sop_class_uid": "...", "series_instance_uid": "...",
          "instance_number": 1, "file": "CT01_0001.dcm", "rows": 512, "columns": 512,
          "labels": ["malignant"],          # labels visible on this image (cxr: [] when none;
                                            # others: ["normal"] when no lesion is visible)
          "boxes": [{"lesion": 1, "label": "malignant", "x0": 10, "y0": 20, "x1": 40, "y1": 52}],
          "mask": "masks/CT01_0001.png",    # or null: PNG, uint8, pixel value = lesion id, 0 = none
          "attributes": {...}               # view, laterality, slice position ...
      }]
    }

Boxes are in stored-pixel coordinates, ``x`` = column, ``y`` = row, ``x1``/``y1`` exclusive.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node import __version__

TRUTH_FORMAT = "pacs-node-synth-truth/1"
TRUTH_FILE = "truth.json"


@dataclass
class InstanceTruth:
    """Ground truth of one written instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    instance_number: int
    file: str
    rows: int
    columns: int
    labels: list[str]
    boxes: list[dict[str, Any]] = field(default_factory=list)
    mask: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyTruth:
    """Ground truth of one generated study; ``study_dir`` is where its files are (not serialised)."""

    kind: str
    seed: int
    labels: list[str]
    study_instance_uid: str
    accession_number: str
    patient_id: str
    series: list[dict[str, Any]]
    geometry: dict[str, Any]
    lesions: list[dict[str, Any]]
    instances: list[InstanceTruth]
    study_dir: Path | None = None
    format: str = TRUTH_FORMAT
    generator: str = f"pacs-node {__version__}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (without ``study_dir``)."""
        data = asdict(self)
        data.pop("study_dir")
        ordered = {"format": data.pop("format"), "generator": data.pop("generator")}
        ordered.update(data)
        return ordered

    def write(self, study_dir: Path) -> Path:
        """Write ``truth.json`` into ``study_dir`` and return its path."""
        path = Path(study_dir) / TRUTH_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @property
    def files(self) -> list[Path]:
        """Paths of the written DICOM files (relative to the current directory)."""
        base = self.study_dir or Path(".")
        return [base / inst.file for inst in self.instances]

    @classmethod
    def from_dict(cls, data: dict[str, Any], study_dir: Path | None = None) -> StudyTruth:
        """Rebuild from the dictionary form; raises ValueError for an unknown format."""
        if data.get("format") != TRUTH_FORMAT:
            raise ValueError(f"not a {TRUTH_FORMAT} document: format={data.get('format')!r}")
        fields = dict(data)
        fields["instances"] = [InstanceTruth(**inst) for inst in fields["instances"]]
        return cls(study_dir=study_dir, **fields)

    @classmethod
    def load(cls, path: Path) -> StudyTruth:
        """Read a ``truth.json`` file (or the one inside a study directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / TRUTH_FILE
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), study_dir=path.parent)
