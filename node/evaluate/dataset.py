"""Find the cases of a folder of labelled DICOM and their labels.

A case is what the node analyses as one job for the model's aggregation level: one instance
(``image``), one series (``series``) or one study (``study``). Labels come from either

- a CSV with one key column (``sop_instance_uid``, ``series_instance_uid`` or ``study_instance_uid``)
  and either a ``labels`` column (label names separated by ``;`` or ``|``, empty for none) or one
  0/1 column per finding (named as the manifest's labels); more columns (site, device, ...) can be
  used to group the results; or
- phantom truth sidecars (``truth.json`` written by ``pacs-node synth`` beside the files).

A series/study case whose instances are labelled separately is positive for a finding when any
of its instances is. ``label_map`` renames truth labels to the model's (``malignant`` -> ``mass``);
a case labelled by a truth sidecar keeps it (``Case.truth``, ``Case.truth_dir``) for the mask
metrics of segmentation models (:mod:`node.evaluate.segmentation`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from node.errors import NodeError

KEY_COLUMNS = ("sop_instance_uid", "series_instance_uid", "study_instance_uid")
TRUTH_FILE = "truth.json"


class DatasetError(NodeError):
    """The evaluation set cannot be read or labelled."""


@dataclass
class Case:
    """One job's files, its ground-truth labels and its group (for per-group results)."""

    key: str
    files: list[Path]
    labels: set[str]
    group: str | None = None
    study_uid: str = ""
    series_uids: list[str] = field(default_factory=list)
    truth: dict[str, Any] | None = None  # the truth.json sidecar that labelled the case
    truth_dir: Path | None = None  # its folder (truth masks are relative to it)


@dataclass(frozen=True)
class _Header:
    path: Path
    sop: str
    series: str
    study: str
    attrs: dict[str, str]


def _iter_files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if (
            path.is_file()
            and path.name != TRUTH_FILE
            and path.suffix.lower() not in (".png", ".json", ".csv")
        ):
            yield path


def read_headers(root: Path, group_by: str | None = None) -> list[_Header]:
    """Headers (no pixels) of every DICOM file under ``root``; non-DICOM files are skipped."""
    headers = []
    for path in _iter_files(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            continue
        if "SOPInstanceUID" not in ds or "StudyInstanceUID" not in ds:
            continue
        attrs = {}
        if group_by and group_by in ds:
            attrs[group_by] = str(ds[group_by].value)
        headers.append(
            _Header(path, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), attrs)
        )
    return headers


def read_label_csv(
    path: Path, label_names: Sequence[str]
) -> tuple[str, dict[str, set[str]], dict[str, dict]]:
    """(key column, key -> labels, key -> row) from a label CSV (see the module docstring)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise DatasetError(f"cannot read label CSV {path}: {exc}") from exc
    if not rows:
        raise DatasetError(f"label CSV {path} has no rows")
    columns = [c.strip().lower() for c in rows[0]]
    key = next((k for k in KEY_COLUMNS if k in columns), None)
    if key is None:
        raise DatasetError(f"label CSV {path} needs one of the columns {', '.join(KEY_COLUMNS)}")
    per_label = [n for n in label_names if n.lower() in columns]
    if "labels" not in columns and not per_label:
        raise DatasetError(
            f"label CSV {path} needs a 'labels' column or one 0/1 column per label ({', '.join(label_names)})"
        )
    labels: dict[str, set[str]] = {}
    extra: dict[str, dict] = {}
    for i, raw in enumerate(rows, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in raw.items() if k is not None}
        uid = row.get(key, "")
        if not uid:
            raise DatasetError(f"{path}:{i}: empty {key}")
        found: set[str] = set()
        if "labels" in row:
            found |= {t.strip() for t in row["labels"].replace("|", ";").split(";") if t.strip()}
        for name in per_label:
            value = row.get(name.lower(), "")
            if value not in ("0", "1", "", "true", "false", "yes", "no"):
                raise DatasetError(f"{path}:{i}: column {name!r} must be 0 or 1 (found {value!r})")
            if value in ("1", "true", "yes"):
                found.add(name)
        labels.setdefault(uid, set()).update(found)
        extra[uid] = row
    return key, labels, extra


def _truth_for(path: Path, root: Path, cache: dict[Path, dict | None]) -> tuple[dict | None, Path | None]:
    """The nearest ``truth.json`` above ``path`` (up to ``root``) and its folder."""
    for folder in [path.parent, *path.parent.parents]:
        if folder not in cache:
            sidecar = folder / TRUTH_FILE
            cache[folder] = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None
        if cache[folder] is not None:
            return cache[folder], folder
        if folder == root or root not in folder.parents:
            break
    return None, None


def collect_cases(
    root: Path,
    level: str,
    label_names: Sequence[str],
    *,
    labels_csv: Path | None = None,
    group_by: str | None = None,
    label_map: Mapping[str, str] | None = None,
) -> list[Case]:
    """The cases under ``root`` for aggregation ``level`` with their labels (CSV or truth sidecars).

    ``group_by``: a CSV column or a DICOM keyword (e.g. ``PatientID``, ``InstitutionName``) whose
    value groups the cases. Cases without a label are an error naming the first few."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    headers = read_headers(root, group_by)
    if not headers:
        raise DatasetError(f"no DICOM files found under {root}")
    grouping = {"image": lambda h: h.sop, "series": lambda h: h.series, "study": lambda h: h.study}[level]
    by_case: dict[str, list[_Header]] = {}
    for h in headers:
        by_case.setdefault(grouping(h), []).append(h)

    csv_key: str | None = None
    csv_labels: dict[str, set[str]] = {}
    csv_rows: dict[str, dict] = {}
    if labels_csv is not None:
        csv_key, csv_labels, csv_rows = read_label_csv(labels_csv, label_names)
    truth_cache: dict[Path, dict | None] = {}
    cases: list[Case] = []
    unlabelled: list[str] = []
    for key, members in by_case.items():
        labels: set[str] | None = None
        group: str | None = None
        truth: dict | None = None
        truth_dir: Path | None = None
        if csv_key is not None:
            attr = {"sop_instance_uid": "sop", "series_instance_uid": "series", "study_instance_uid": "study"}
            uids = {getattr(h, attr[csv_key]) for h in members}
            hits = [u for u in uids if u in csv_labels]
            if hits:
                labels = set().union(*(csv_labels[u] for u in hits))
                if group_by and group_by.lower() in csv_rows[hits[0]]:
                    group = csv_rows[hits[0]][group_by.lower()]
        else:
            truth, truth_dir = _truth_for(members[0].path, root, truth_cache)
            if truth is not None:
                if level == "image":
                    inst = {i["sop_instance_uid"]: i for i in truth.get("instances", [])}
                    found = inst.get(members[0].sop)
                    labels = set(found["labels"]) if found is not None else set(truth.get("labels", []))
                else:
                    labels = set(truth.get("labels", []))
        if group is None and group_by:
            group = members[0].attrs.get(group_by)
        if labels is None:
            unlabelled.append(key)
            continue
        if label_map:
            labels = {label_map.get(name, name) for name in labels}
        members.sort(key=lambda h: str(h.path))
        cases.append(
            Case(
                key=key,
                files=[h.path for h in members],
                labels=labels,
                group=group,
                study_uid=members[0].study,
                series_uids=sorted({h.series for h in members}),
                truth=truth,
                truth_dir=truth_dir,
            )
        )
    if unlabelled:
        source = f"in {labels_csv}" if labels_csv is not None else "(no truth.json sidecar found)"
        raise DatasetError(
            f"{len(unlabelled)} case(s) have no label {source}, e.g. {', '.join(unlabelled[:3])}"
        )
    return cases
