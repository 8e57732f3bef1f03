"""Generate phantom studies on disk: render, build DICOM datasets, write Part 10 files, masks and truth."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset

from .common import StudyContext, make_study_context, write_part10
from .ct import ct_datasets, render_ct
from .cxr import cxr_datasets, render_cxr
from .derm import derm_datasets, render_derm
from .fundus import fundus_datasets, render_fundus
from .labels import MULTI_LABEL, LabelRequest, balanced_labels, check_kind, normalise_labels, random_labels
from .mammo import mammo_datasets, render_mammo
from .mr import mr_datasets, render_mr
from .photo import transfer_syntax
from .rendered import RenderedStudy
from .smear import render_smear, smear_datasets
from .texture import derive_seed, rng_stream
from .truth import InstanceTruth, StudyTruth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Kind:
    render: Callable[..., RenderedStudy]
    datasets: Callable[[RenderedStudy, StudyContext], list[Dataset]]
    description: str
    model: str
    sex: str | None = None


_KINDS: dict[str, _Kind] = {
    "cxr": _Kind(render_cxr, cxr_datasets, "XR CHEST", "Synth Chest Radiography"),
    "mammo": _Kind(render_mammo, mammo_datasets, "MG SCREENING BILATERAL", "Synth Mammography", sex="F"),
    "ct": _Kind(render_ct, ct_datasets, "CT ABDOMEN WITH CONTRAST", "Synth CT"),
    "mr": _Kind(render_mr, mr_datasets, "MR BRAIN", "Synth MR 1.5T"),
    "fundus": _Kind(render_fundus, fundus_datasets, "OP COLOUR FUNDUS PHOTOGRAPHY", "Synth Fundus Camera"),
    "derm": _Kind(render_derm, derm_datasets, "XC DERMOSCOPY SKIN LESION", "Synth Dermatoscope"),
    "smear": _Kind(render_smear, smear_datasets, "GM PERIPHERAL BLOOD SMEAR", "Synth Light Microscope"),
}


_REGION_STUDY_DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("ct", "head"): "CT HEAD WITHOUT CONTRAST",
    ("ct", "chest"): "CT CHEST WITH CONTRAST",
    ("ct", "pelvis"): "CT PELVIS WITH CONTRAST",
    ("mr", "abdomen"): "MR ABDOMEN",
    ("mr", "pelvis"): "MR PELVIS",
}


def _study_description(kind: str, options: dict[str, Any]) -> str:
    """The kind's study description, or the region's (``region`` option), or one naming no region
    (``body_part=False``)."""
    if options.get("body_part", True) is False:
        return f"{kind.upper()} EXAMINATION"
    region = str(options.get("region") or "").lower()
    return _REGION_STUDY_DESCRIPTIONS.get((kind, region), _KINDS[kind].description)


def study_labels(kind: str, seed: int, label: LabelRequest = None) -> tuple[str, ...]:
    """The label set a study gets: ``label`` normalised, or drawn uniformly from the seed when None."""
    kind = check_kind(kind)
    if label is None:
        return random_labels(kind, rng_stream(seed, "label"))
    return normalise_labels(kind, label)


def render_study(kind: str, seed: int, label: LabelRequest = None, **options: Any) -> RenderedStudy:
    """Render a study of ``kind`` in memory (no DICOM): see ``render_cxr``/``render_mammo``/
    ``render_ct``/``render_mr``/``render_fundus``/``render_derm``/``render_smear`` for the options
    each kind takes (sizes, slices, ...)."""
    kind = check_kind(kind)
    return _KINDS[kind].render(seed, study_labels(kind, seed, label), **options)


def generate_study(
    kind: str,
    out_dir: Path | str,
    seed: int,
    label: LabelRequest = None,
    *,
    uid_root: str | None = None,
    seeded_uids: bool = True,
    patient_number: int | None = None,
    write_masks: bool = True,
    **options: Any,
) -> StudyTruth:
    """Render a phantom study and write it to ``out_dir`` (the study directory, created if missing).

    Writes one DICOM Part 10 file per instance, ``masks/<file>.png`` for instances showing a lesion
    (when ``write_masks``), and ``truth.json``. UIDs are derived from ``seed`` under ``uid_root``
    (pydicom's root by default), or random under it when ``seeded_uids`` is False. Other keyword
    options go to the kind's renderer. Returns the study's :class:`StudyTruth`.
    """
    kind = check_kind(kind)
    spec = _KINDS[kind]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = spec.render(seed, study_labels(kind, seed, label), **options)
    ctx = make_study_context(
        kind,
        seed,
        uid_root=uid_root,
        seeded_uids=seeded_uids,
        patient_number=patient_number,
        sex=spec.sex,
        description=_study_description(kind, options),
        model=spec.model,
    )
    datasets = spec.datasets(study, ctx)
    instances: list[InstanceTruth] = []
    series: dict[str, dict[str, Any]] = {}
    for ds, image in zip(datasets, study.images, strict=True):
        stem = f"{ds.Modality}{int(ds.SeriesNumber):02d}_{int(ds.InstanceNumber):04d}"
        if "view" in image.attributes:
            stem += f"_{image.attributes['laterality']}{image.attributes['view']}"
        write_part10(ds, out / f"{stem}.dcm", transfer_syntax(ds))
        mask_name = None
        if write_masks and image.boxes:
            mask_name = f"masks/{stem}.png"
            (out / "masks").mkdir(exist_ok=True)
            if not cv2.imwrite(str(out / mask_name), image.mask, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
                raise OSError(f"could not write {out / mask_name}")
        visible = sorted({b.label for b in image.boxes}, key=list(study.labels).index)
        if not visible and kind not in MULTI_LABEL:
            visible = ["normal"]
        series.setdefault(
            ds.SeriesInstanceUID,
            {
                "series_instance_uid": ds.SeriesInstanceUID,
                "series_number": int(ds.SeriesNumber),
                "modality": ds.Modality,
                "description": ds.SeriesDescription,
            },
        )
        instances.append(
            InstanceTruth(
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                series_instance_uid=ds.SeriesInstanceUID,
                instance_number=int(ds.InstanceNumber),
                file=f"{stem}.dcm",
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                labels=visible,
                boxes=[b.as_dict() for b in image.boxes],
                mask=mask_name,
                attributes=_jsonable(image.attributes),
            )
        )
    truth = StudyTruth(
        kind=kind,
        seed=int(seed),
        labels=list(study.labels),
        study_instance_uid=ctx.study_uid,
        accession_number=ctx.accession,
        patient_id=ctx.patient_id,
        series=list(series.values()),
        geometry=_jsonable(study.geometry),
        lesions=[les.as_dict() for les in study.lesions],
        instances=instances,
        study_dir=out,
    )
    truth.write(out)
    log.info("synth %s study written: %d instances in %s", kind, len(instances), out)
    return truth


def generate_studies(
    kind: str,
    count: int,
    out_dir: Path | str,
    seed: int,
    label: LabelRequest = None,
    *,
    workers: int = 1,
    **options: Any,
) -> list[StudyTruth]:
    """Generate ``count`` studies of ``kind`` under ``out_dir`` (one sub-directory each).

    Study ``i`` gets seed ``derive_seed(seed, i)`` (recorded in its truth, so it can be rebuilt
    alone) and directory ``<kind>-s<seed>-<i:05d>``. Without ``label``, labels are balanced: every
    label choice appears ``count // n`` or ``count // n + 1`` times, in seeded random order.
    ``workers`` > 1 renders in that many processes. Writes ``<kind>-s<seed>-index.json`` listing the
    studies. Other options go to :func:`generate_study`. Returns the truths in study order.
    """
    kind = check_kind(kind)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if label is None:
        labels = balanced_labels(kind, count, rng_stream(seed, f"{kind}/batch-labels"))
    else:
        labels = [normalise_labels(kind, label)] * count
    jobs = [(kind, out / f"{kind}-s{seed}-{i:05d}", derive_seed(seed, i), labels[i]) for i in range(count)]
    if workers > 1 and count > 1:
        with ProcessPoolExecutor(max_workers=min(workers, count, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(generate_study, k, d, s, lab, **options) for k, d, s, lab in jobs]
            truths = [f.result() for f in futures]
    else:
        truths = [generate_study(k, d, s, lab, **options) for k, d, s, lab in jobs]
    index = [
        {
            "dir": t.study_dir.name if t.study_dir else None,
            "seed": t.seed,
            "labels": t.labels,
            "study_instance_uid": t.study_instance_uid,
            "instances": len(t.instances),
        }
        for t in truths
    ]
    (out / f"{kind}-s{seed}-index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return truths


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples inside ``value`` to plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    return value
