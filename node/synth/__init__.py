"""Synthetic DICOM phantoms with known lesions (chest radiographs, mammograms, abdominal CT, brain MR,
colour fundus photographs, dermoscopy, blood smear microscopy).

Used to train the reference models, and by tests, benchmarks and demos. Two layers:

- in memory: :func:`render_study` (or ``render_cxr``/``render_mammo``/``render_ct``/``render_mr``/
  ``render_fundus``/``render_derm``/``render_smear``)
  returns a :class:`RenderedStudy` of stored pixel arrays, header values and lesion masks/boxes;
- on disk: :func:`generate_study` / :func:`generate_studies` write DICOM Part 10 files, lesion
  masks and a ``truth.json`` per study (see :mod:`node.synth.truth`).

Everything is seeded: the same seed gives the same pixels and (by default) the same UIDs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ct import render_ct
    from .cxr import render_cxr
    from .derm import render_derm
    from .fundus import render_fundus
    from .labels import KINDS, LABELS, label_choices
    from .mammo import render_mammo
    from .mr import render_mr
    from .rendered import Box, Lesion, RenderedImage, RenderedStudy
    from .smear import render_smear
    from .study import generate_studies, generate_study, render_study, study_labels
    from .truth import InstanceTruth, StudyTruth

# Where each public name lives: imported on first use (PEP 562), so `pacs-node --help` and the
# commands that never render a phantom do not load OpenCV and the renderers.
_HOMES = {
    "render_ct": "ct",
    "render_cxr": "cxr",
    "render_derm": "derm",
    "render_fundus": "fundus",
    "render_smear": "smear",
    "KINDS": "labels",
    "LABELS": "labels",
    "label_choices": "labels",
    "render_mammo": "mammo",
    "render_mr": "mr",
    "Box": "rendered",
    "Lesion": "rendered",
    "RenderedImage": "rendered",
    "RenderedStudy": "rendered",
    "generate_studies": "study",
    "generate_study": "study",
    "render_study": "study",
    "study_labels": "study",
    "InstanceTruth": "truth",
    "StudyTruth": "truth",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "KINDS",
    "LABELS",
    "Box",
    "InstanceTruth",
    "Lesion",
    "RenderedImage",
    "RenderedStudy",
    "StudyTruth",
    "generate_studies",
    "generate_study",
    "label_choices",
    "render_ct",
    "render_cxr",
    "render_derm",
    "render_fundus",
    "render_mammo",
    "render_mr",
    "render_smear",
    "render_study",
    "study_labels",
]
