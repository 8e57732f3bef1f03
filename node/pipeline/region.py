"""The body region of a series, from what its images say, for routing.

Routing must not send a CT or MR to a body-region model (liver CT, brain MR) on the modality alone:
a head CT without BodyPartExamined is not an abdomen. This module derives the region from the
evidence, strongest first, and says which evidence decided:

1. ``BodyPartExamined`` (CID 4031 defined terms, mapped to a region);
2. coded anatomy: ``AnatomicRegionSequence`` at the top level, or ``FrameAnatomySequence`` in the
   Shared / Per-Frame Functional Groups of enhanced objects (SNOMED CT, the older SNOMED RT / SNM3
   codes through pydicom's mapping, else the code meaning in words);
3. the Series description, Protocol name or Study description naming a region;
4. the pixels (:func:`region_from_pixels`), only for CT and MR with none of the above: a bounded
   look at one down-sampled slice. CT: lung parenchyma inside the body means chest; a closed bone
   ring around brain-density tissue, head-sized, means head; large bone on both sides of the
   midline means pelvis; a trunk-sized soft-tissue body without lungs means abdomen. MR: an axial
   head-sized, head-shaped outline means head; a trunk-sized one means trunk (level unknown).

Anything else is "unknown" (``regions == ()``), never a guess. Every result carries the text that
names its evidence, which ends up in the routing reason stored on the series.

Reads no patient attributes. Pure functions except :func:`region_from_files`, which reads the
given files (the runner and the rule tester call it).
"""

from __future__ import annotations

import logging
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)

#: The regions routing knows. OTHER: the images name a region none of these covers (knee, spine...).
REGIONS: tuple[str, ...] = ("HEAD", "NECK", "CHEST", "ABDOMEN", "PELVIS", "TRUNK", "OTHER")

#: What pydicom raises on malformed values (UnicodeError is a ValueError).
_VALUE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, struct.error)

#: Attributes read for the header evidence (none identifies the patient).
REGION_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "AnatomicRegionSequence",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "SeriesDescription",
    "ProtocolName",
    "StudyDescription",
)

#: Pixel work is bounded: slices are resampled to this spacing (mm) and at most this many pixels a side.
_TARGET_MM = 2.0
_MAX_SIDE = 256


@dataclass(frozen=True)
class RegionEvidence:
    """The body region(s) an object shows and the evidence, in words.

    ``regions`` is empty when unknown; ``source`` is ``BodyPartExamined``, ``AnatomicRegionSequence``,
    ``FrameAnatomySequence``, ``description``, ``pixels`` or ``none``; ``text`` names the evidence
    (e.g. ``body region from pixels: chest (lung air 34 % of body area)``).
    """

    regions: tuple[str, ...]
    source: str
    text: str

    @property
    def known(self) -> bool:
        """True when a region was established."""
        return bool(self.regions)


UNKNOWN_HEADER = RegionEvidence(
    (), "none", "no BodyPartExamined, anatomy code or description naming a region"
)


# ------------------------------------------------------------------------------------------- header

#: BodyPartExamined (CID 4031 defined terms and common vendor spellings) -> regions.
_BODY_PARTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("HEAD", "BRAIN", "SKULL", "CEREBRUM", "CEREBELLUM", "IAC", "ORBIT", "SINUS"), ("HEAD",)),
    **dict.fromkeys(("HEADNECK", "HEAD_NECK", "HEADANDNECK"), ("HEAD", "NECK")),
    **dict.fromkeys(("NECK", "LARYNX", "THYROID", "PHARYNX"), ("NECK",)),
    **dict.fromkeys(("CHEST", "THORAX", "LUNG", "HEART", "MEDIASTINUM"), ("CHEST",)),
    **dict.fromkeys(
        ("ABDOMEN", "LIVER", "PANCREAS", "KIDNEY", "SPLEEN", "GALLBLADDER", "STOMACH", "ADRENAL", "BILIARY"),
        ("ABDOMEN",),
    ),
    **dict.fromkeys(("PELVIS", "PROSTATE", "BLADDER", "UTERUS", "OVARY", "RECTUM"), ("PELVIS",)),
    "ABDOMENPELVIS": ("ABDOMEN", "PELVIS"),
    "ABDPELVIS": ("ABDOMEN", "PELVIS"),
    "CHESTABDOMEN": ("CHEST", "ABDOMEN"),
    "CHESTABDPELVIS": ("CHEST", "ABDOMEN", "PELVIS"),
    "CHESTABDOMENPELVIS": ("CHEST", "ABDOMEN", "PELVIS"),
}

#: SNOMED CT concepts (pydicom's codes.SCT keyword) -> regions; also their older SNOMED RT codes.
_SCT_KEYWORDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("Head", "Brain", "Skull", "Cerebrum", "Cerebellum", "Orbit", "Face"), ("HEAD",)),
    "HeadAndNeck": ("HEAD", "NECK"),
    **dict.fromkeys(("Neck", "Larynx", "ThyroidGland"), ("NECK",)),
    **dict.fromkeys(("Chest", "Thorax", "Lung", "Heart", "Mediastinum"), ("CHEST",)),
    **dict.fromkeys(
        ("Abdomen", "Liver", "Pancreas", "Kidney", "Spleen", "Gallbladder", "Stomach"), ("ABDOMEN",)
    ),
    **dict.fromkeys(("Pelvis", "Prostate", "Bladder", "Uterus", "Ovary", "Rectum"), ("PELVIS",)),
    "ChestAndAbdomen": ("CHEST", "ABDOMEN"),
    "AbdomenAndPelvis": ("ABDOMEN", "PELVIS"),
    "ChestAbdomenAndPelvis": ("CHEST", "ABDOMEN", "PELVIS"),
}
#: Older codes pydicom's SNOMED RT -> CT mapping does not hold (or vendors use with SCT), checked by hand
#: against the SNOMED RT tables: Thorax, Abdomen, Pelvis as SCT 51185008 / 113345001 / 12921003.
_LEGACY_SCT: dict[str, tuple[str, ...]] = {
    "51185008": ("CHEST",),
    "113345001": ("ABDOMEN",),
    "12921003": ("PELVIS",),
}
_SNOMED_SCHEMES = frozenset({"SCT", "SNM3", "SRT", "99SDM"})

#: Code meanings or descriptions in words -> region (the first that matches, in this order).
_WORDS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (region, re.compile(pattern, re.IGNORECASE))
    for region, pattern in (
        ("HEAD", r"(?<![a-z])head(?![a-z])|brain|neuro|cran|skull|cereb|sinus|orbit|(?<![a-z])iac(?![a-z])"),
        ("NECK", r"(?<![a-z])neck(?![a-z])|laryn|thyroid|pharyn"),
        ("CHEST", r"chest|thora[xc]|t[oó]rax|lung|pulmo|cardiac|heart|coronar|ctpa|mediastin"),
        ("ABDOMEN", r"abd|liver|hepat|pancrea|renal|kidney|spleen|mrcp|(?<![a-z])upper gi(?![a-z])"),
        ("PELVIS", r"pelvi|prostat|bladder|(?<![a-z])rect|(?<![a-z])uter|ovar"),
        (
            "OTHER",
            r"spine|spinal|lumbar|sacr|cocc|shoulder|elbow|wrist|(?<![a-z])hands?(?![a-z])|finger|"
            r"(?<![a-z])hips?(?![a-z])|knee|ankle|foot|feet|(?<![a-z])toes?(?![a-z])|extremit|femur|tibia|"
            r"(?<![a-z])legs?(?![a-z])|(?<![a-z])arms?(?![a-z])|breast|mamm",
        ),
    )
)


def _sct_table() -> dict[str, tuple[str, ...]]:
    """SNOMED CT code value -> regions, built from pydicom's dictionaries (not typed by hand)."""
    from pydicom.sr.codedict import codes

    table: dict[str, tuple[str, ...]] = dict(_LEGACY_SCT)
    for keyword, regions in _SCT_KEYWORDS.items():
        try:
            table[str(getattr(codes.SCT, keyword).value)] = regions
        except AttributeError:
            log.debug("routing: SNOMED CT keyword %s not in pydicom's dictionary", keyword)
    return table


def _srt_table(sct: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """SNOMED RT (SRT, SNM3) code value -> regions, through pydicom's SNOMED RT -> CT mapping."""
    try:
        from pydicom.sr._snomed_dict import mapping
    except ImportError:  # a pydicom without the private mapping: meanings still work
        return {}
    return {srt: sct[str(ct)] for srt, ct in mapping.get("SRT", {}).items() if str(ct) in sct}


class _Codes:
    """The code tables, built on first use (nothing is built at import)."""

    _sct: dict[str, tuple[str, ...]] | None = None
    _srt: dict[str, tuple[str, ...]] | None = None

    @classmethod
    def lookup(cls, scheme: str, value: str) -> tuple[str, ...] | None:
        if cls._sct is None or cls._srt is None:
            cls._sct = _sct_table()
            cls._srt = _srt_table(cls._sct)
        if scheme not in _SNOMED_SCHEMES:
            return None
        return cls._sct.get(value) or cls._srt.get(value)


def regions_from_text(text: str | None) -> tuple[str, ...]:
    """The regions a description (or a code meaning) names, in :data:`REGIONS` order; () for none."""
    if not text:
        return ()
    found = [region for region, pattern in _WORDS if pattern.search(text)]
    named = [r for r in found if r != "OTHER"]
    return tuple(named) if named else tuple(found)


def regions_from_body_part(body_part: str | None) -> tuple[str, ...]:
    """The regions a BodyPartExamined value names (OTHER for a value that names none of them)."""
    if not body_part:
        return ()
    key = re.sub(r"[\s_-]+", "", body_part.strip().upper())
    if key in _BODY_PARTS:
        return _BODY_PARTS[key]
    return regions_from_text(body_part) or ("OTHER",)


def _get(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` as pydicom gives it (of any type: callers check it); None when it
    is absent or cannot be read."""
    try:
        return ds.get(keyword)
    except _VALUE_ERRORS as exc:
        log.warning("routing: %s cannot be read (%s); treated as missing", keyword, type(exc).__name__)
        return None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _code_regions(item: Dataset) -> tuple[tuple[str, ...], str] | None:
    """(regions, "meaning (scheme value)") of one code item, or None when it has no code at all."""
    scheme = (_text(item, "CodingSchemeDesignator") or "").upper()
    value = _text(item, "CodeValue") or _text(item, "LongCodeValue") or _text(item, "URNCodeValue") or ""
    meaning = _text(item, "CodeMeaning") or ""
    if not (value or meaning):
        return None
    regions = _Codes.lookup(scheme, value) if value else None
    if not regions:
        regions = regions_from_text(meaning) or ("OTHER",)
    shown = meaning or value
    return regions, f"{shown} ({scheme} {value})" if value else shown


def _sequence_items(value: Any) -> list[Dataset]:
    if value is None:
        return []
    try:
        return [item for item in value if isinstance(item, Dataset)]
    except TypeError:
        return []


def _anatomy(ds: Dataset) -> tuple[tuple[str, ...], str] | None:
    """Regions from AnatomicRegionSequence, else FrameAnatomySequence (shared, then the first frame)."""
    for item in _sequence_items(_get(ds, "AnatomicRegionSequence"))[:1]:
        got = _code_regions(item)
        if got:
            return got[0], f"AnatomicRegionSequence: {got[1]}"
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for functional in _sequence_items(_get(ds, group))[:1]:
            for frame_anatomy in _sequence_items(_get(functional, "FrameAnatomySequence"))[:1]:
                for item in _sequence_items(_get(frame_anatomy, "AnatomicRegionSequence"))[:1]:
                    got = _code_regions(item)
                    if got:
                        return got[0], f"FrameAnatomySequence: {got[1]}"
    return None


def header_region(ds: Dataset) -> RegionEvidence:
    """The region the header names: BodyPartExamined, coded anatomy, then the descriptions.

    Returns :data:`UNKNOWN_HEADER` (``regions == ()``) when none of them names a region.
    """
    body_part = _text(ds, "BodyPartExamined")
    if body_part:
        regions = regions_from_body_part(body_part)
        return RegionEvidence(regions, "BodyPartExamined", f"BodyPartExamined {body_part}")
    anatomy = _anatomy(ds)
    if anatomy:
        regions, text = anatomy
        return RegionEvidence(regions, text.split(":", 1)[0], text)
    for keyword, label in (
        ("SeriesDescription", "SeriesDescription"),
        ("ProtocolName", "ProtocolName"),
        ("StudyDescription", "StudyDescription"),
    ):
        described = _text(ds, keyword)
        regions = regions_from_text(described)
        if regions:
            return RegionEvidence(regions, "description", f"{label} '{described}'")
    return UNKNOWN_HEADER


def needs_pixels(modality: str | None, evidence: RegionEvidence) -> bool:
    """Whether the pixels must be looked at: a CT or MR whose header names no region."""
    return (modality or "").strip().upper() in ("CT", "MR") and not evidence.known


# ------------------------------------------------------------------------------------------- pixels


@dataclass(frozen=True)
class _Slice:
    """One slice resampled to ~2 mm pixels: values (HU for CT), mm per pixel, and whether it is axial."""

    values: np.ndarray
    mm: float
    axial: bool | None


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    candidates: list[Any] = [_get(ds, "PixelSpacing")]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for functional in _sequence_items(_get(ds, group))[:1]:
            for measures in _sequence_items(_get(functional, "PixelMeasuresSequence"))[:1]:
                candidates.append(_get(measures, "PixelSpacing"))
    for value in candidates:
        try:
            row, col = (float(v) for v in value)
        except (*_VALUE_ERRORS, StopIteration):
            continue
        if 0.01 < row < 20 and 0.01 < col < 20:
            return row, col
    return None


def _orientation(ds: Dataset) -> bool | None:
    """True for an axial slice, False for another plane, None when the orientation is not given."""
    values: Any = _get(ds, "ImageOrientationPatient")
    if values is None:
        for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            for functional in _sequence_items(_get(ds, group))[:1]:
                for plane in _sequence_items(_get(functional, "PlaneOrientationSequence"))[:1]:
                    values = _get(plane, "ImageOrientationPatient")
    try:
        row = np.array([float(v) for v in values][:3])
        col = np.array([float(v) for v in values][3:6])
    except _VALUE_ERRORS:
        return None
    if row.size != 3 or col.size != 3:
        return None
    normal = np.cross(row, col)
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        return None
    return abs(float(normal[2])) / length > 0.8


def _rescale(ds: Dataset, frame: int) -> tuple[float, float]:
    slope, intercept = _get(ds, "RescaleSlope"), _get(ds, "RescaleIntercept")
    if slope is None or intercept is None:
        for group in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            items = _sequence_items(_get(ds, group))
            if not items:
                continue
            functional = items[min(frame, len(items) - 1)] if group.startswith("PerFrame") else items[0]
            for transform in _sequence_items(_get(functional, "PixelValueTransformationSequence"))[:1]:
                slope = _get(transform, "RescaleSlope")
                intercept = _get(transform, "RescaleIntercept")
    try:
        return float(slope if slope is not None else 1.0), float(intercept if intercept is not None else 0.0)
    except _VALUE_ERRORS:
        return 1.0, 0.0


def _slice_of(ds: Dataset) -> _Slice | str:
    """The middle frame of ``ds`` resampled to about 2 mm pixels, or why it cannot be used."""
    spacing = _spacing(ds)
    if spacing is None:
        return "no usable PixelSpacing"
    if int(_get(ds, "SamplesPerPixel") or 1) != 1:
        return "not a greyscale image"
    frames = int(_get(ds, "NumberOfFrames") or 1)
    frame = frames // 2
    try:
        from pydicom.pixels import pixel_array

        pixels = pixel_array(ds, index=frame) if frames > 1 else ds.pixel_array
    except (*_VALUE_ERRORS, NotImplementedError, RuntimeError) as exc:
        return f"the pixels cannot be decoded ({type(exc).__name__})"
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or min(pixels.shape) < 16:
        return "not a single 2-D greyscale frame"
    slope, intercept = _rescale(ds, frame)
    values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = _get(ds, "PixelPaddingValue")
    if isinstance(padding, int):
        values[pixels == padding] = np.nan
    row_mm, col_mm = spacing
    scale = min(col_mm / _TARGET_MM, row_mm / _TARGET_MM, 1.0)
    scale = min(scale, _MAX_SIDE / max(pixels.shape))
    size = (
        max(int(round(pixels.shape[1] * col_mm / row_mm * scale)), 8),
        max(int(round(pixels.shape[0] * scale)), 8),
    )
    mm = row_mm / scale
    nan = np.isnan(values)
    if nan.any():
        values = np.where(nan, np.float32(np.nanmin(values) if (~nan).any() else 0.0), values)
    if (_text(ds, "Modality") or "").upper() == "CT":
        values = np.clip(values, -1024.0, 3071.0)
    small = cv2.resize(values, size, interpolation=cv2.INTER_AREA)
    return _Slice(small, mm, _orientation(ds))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every hole (background not connected to the image border) filled."""
    padded = np.pad(mask.astype(np.uint8), 1)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 2)
    return (flood != 2)[1:-1, 1:-1]


def _largest(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros(mask.shape, dtype=bool)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def _disk(px: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))


def _border_fraction(mask: np.ndarray) -> float:
    """The share of the image border that ``mask`` touches."""
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    return float(edge.mean())


def _ct_region(s: _Slice) -> RegionEvidence:
    hu, mm = s.values, s.mm
    px_cm2 = (mm / 10.0) ** 2
    tissue = hu > -500
    # an opening over 1 cm drops the couch and the head holder, which would otherwise close air
    # under the patient into a "hole" of the body
    tissue = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_OPEN, _disk(2)).astype(bool)
    body = _fill_holes(_largest(tissue))
    cut = _border_fraction(body) > 0.02
    # lungs: air inside the body outline (holes in it), or, where a tight field of view cuts the
    # body, parenchyma-density regions at the image border (-920..-500 HU over 1 cm: not pure air)
    lung = body & (hu < -500)
    if cut:
        smooth = cv2.blur(hu, (5, 5))
        parenchyma = (smooth > -920) & (smooth < -500)
        lung |= _border_touching(parenchyma) & ~body
    lung = cv2.morphologyEx(lung.astype(np.uint8), cv2.MORPH_OPEN, _disk(2)).astype(bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(lung.astype(np.uint8), connectivity=8)
    keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] * px_cm2 >= 4.0]
    lung = np.isin(labels, keep) if keep else np.zeros(hu.shape, dtype=bool)
    trunk_area = int((body | lung).sum())
    if trunk_area * px_cm2 < 20:
        return _pixels(None, "no body in the image")
    lung_pct = 100.0 * float(lung.sum()) / trunk_area
    ys, xs = np.nonzero(body)
    width_mm = (xs.max() - xs.min() + 1) * mm if xs.size else 0.0
    height_mm = (ys.max() - ys.min() + 1) * mm if ys.size else 0.0
    if lung_pct >= 8.0:
        return _pixels("CHEST", f"lung air {lung_pct:.0f} % of body area")
    skull = _skull(hu, body, px_cm2)
    if skull is not None:
        if not cut and width_mm <= 240 and height_mm <= 270:
            return _pixels(
                "HEAD",
                f"closed bone ring around {skull:.0f} cm² of brain-density tissue, "
                f"outline {width_mm:.0f} x {height_mm:.0f} mm",
            )
        return _pixels(None, "a bone ring around brain-density tissue, but not a head-sized outline")
    if lung_pct >= 2.0:
        return _pixels(None, f"some lung air ({lung_pct:.1f} % of body area): chest or upper abdomen")
    if cut:
        return _pixels(None, "the body outline is cut by the field of view and shows no lungs or skull")
    if width_mm < 220 or height_mm < 140:
        return _pixels(
            None, f"outline {width_mm:.0f} x {height_mm:.0f} mm is not trunk-sized and shows no skull"
        )
    pelvis = _pelvic_bone(hu, body, xs, px_cm2)
    if pelvis is not None:
        return _pixels(
            "PELVIS",
            f"large bone on both sides of the midline ({pelvis[0]:.0f} and "
            f"{pelvis[1]:.0f} cm²), no lung air, outline {width_mm:.0f} x {height_mm:.0f} mm",
        )
    soft = float(((hu > -150) & (hu < 250) & body).sum()) / max(int(body.sum()), 1)
    if soft < 0.6:
        return _pixels(None, f"only {100 * soft:.0f} % of the body is fat or soft tissue")
    return _pixels(
        "ABDOMEN",
        f"soft-tissue trunk {width_mm:.0f} x {height_mm:.0f} mm, no lung air "
        f"({lung_pct:.1f} %), no skull or pelvic bone",
    )


def _border_touching(mask: np.ndarray) -> np.ndarray:
    """The components of ``mask`` that touch the image border."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    return np.isin(labels, edge) if edge.size else np.zeros(mask.shape, dtype=bool)


def _skull(hu: np.ndarray, body: np.ndarray, px_cm2: float) -> float | None:
    """The area (cm²) enclosed by a closed bone ring when it holds brain-density tissue, else None."""
    bone = cv2.morphologyEx(((hu > 300) & body).astype(np.uint8), cv2.MORPH_CLOSE, _disk(1)).astype(bool)
    inside = _largest(_fill_holes(bone) & ~bone)
    area = float(inside.sum()) * px_cm2
    if not 40.0 <= area <= 320.0:
        return None
    inner = hu[cv2.erode(inside.astype(np.uint8), _disk(1)).astype(bool)]
    if inner.size == 0:
        return None
    brain = float(((inner > -5) & (inner < 95)).mean())
    fat = float(((inner > -250) & (inner < -30)).mean())
    return area if brain > 0.8 and fat < 0.05 else None


def _pelvic_bone(
    hu: np.ndarray, body: np.ndarray, xs: np.ndarray, px_cm2: float
) -> tuple[float, float] | None:
    """The largest bone areas (cm²) left and right of the midline when both are pelvis-like, else None."""
    bone = ((hu > 200) & body).astype(np.uint8)
    count, _, stats, centroids = cv2.connectedComponentsWithStats(bone, connectivity=8)
    cx = (xs.min() + xs.max()) / 2.0
    half = (xs.max() - xs.min()) / 2.0
    sides = {-1: 0.0, 1: 0.0}
    for i in range(1, count):
        offset = (centroids[i][0] - cx) / max(half, 1.0)
        if abs(offset) < 0.2:
            continue  # the spine and sacrum sit in the midline
        side = 1 if offset > 0 else -1
        sides[side] = max(sides[side], float(stats[i, cv2.CC_STAT_AREA]) * px_cm2)
    left, right = sides[-1], sides[1]
    return (right, left) if min(left, right) >= 5.0 else None


def _mr_region(s: _Slice) -> RegionEvidence:
    img, mm = s.values, s.mm
    hi = float(np.percentile(img, 99.5))
    if hi <= 0:
        return _pixels(None, "a blank image")
    smooth = cv2.GaussianBlur(img, (0, 0), 1.0)
    body = smooth > np.float32(0.12 * hi)
    body = cv2.morphologyEx(body.astype(np.uint8), cv2.MORPH_CLOSE, _disk(2)).astype(bool)
    body = _fill_holes(_largest(body))
    if body.sum() * (mm / 10) ** 2 < 20:
        return _pixels(None, "no body in the image")
    if _border_fraction(body) > 0.02:
        return _pixels(None, "the body outline is cut by the field of view")
    if s.axial is not True:
        return _pixels(None, "not an axial slice" if s.axial is False else "no ImageOrientationPatient")
    ys, xs = np.nonzero(body)
    width = (xs.max() - xs.min() + 1) * mm
    height = (ys.max() - ys.min() + 1) * mm
    area = float(body.sum()) * (mm / 10) ** 2
    contours, _ = cv2.findContours(body.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.contourArea(cv2.convexHull(max(contours, key=cv2.contourArea))) * (mm / 10) ** 2
    solidity = area / max(hull, 1e-6)
    shape = f"outline {width:.0f} x {height:.0f} mm, {area:.0f} cm²"
    if (
        120 <= width <= 200
        and 150 <= height <= 250
        and 1.05 <= height / width <= 1.5
        and area >= 140
        and solidity >= 0.9
    ):
        return _pixels("HEAD", f"head-sized oval {shape}")
    if width >= 250 and height >= 150 and height / width <= 0.95:
        return _pixels("TRUNK", f"trunk-sized {shape}")
    return _pixels(None, f"{shape} is neither head- nor trunk-shaped")


def _pixels(region: str | None, why: str) -> RegionEvidence:
    if region is None:
        return RegionEvidence((), "pixels", f"body region from pixels: unknown ({why})")
    return RegionEvidence((region,), "pixels", f"body region from pixels: {region.lower()} ({why})")


def region_from_pixels(ds: Dataset) -> RegionEvidence:
    """The body region one CT or MR image shows, from its middle frame (bounded: ~2 mm pixels).

    Deterministic; ``regions == ()`` with the reason in ``text`` when it cannot tell.
    """
    modality = (_text(ds, "Modality") or "").upper()
    if modality not in ("CT", "MR"):
        return _pixels(None, f"no pixel rule for modality {modality or 'missing'}")
    got = _slice_of(ds)
    if isinstance(got, str):
        return _pixels(None, got)
    if modality == "CT":
        if got.axial is False:
            return _pixels(None, "not an axial slice")
        return _ct_region(got)
    return _mr_region(got)


def combine(evidence: Sequence[RegionEvidence]) -> RegionEvidence:
    """One decision from a few slices: the region most of them show (more than half), else unknown."""
    if not evidence:
        return _pixels(None, "no image could be read")
    if len(evidence) == 1:
        return evidence[0]
    votes = Counter(e.regions for e in evidence)
    regions, count = votes.most_common(1)[0]
    if regions and count * 2 > len(evidence):
        chosen = next(e for e in evidence if e.regions == regions)
        return RegionEvidence(regions, "pixels", f"{chosen.text}; {count} of {len(evidence)} slices agree")
    if len(votes) == 1:  # every slice unknown: say why (the middle slice's reason)
        return RegionEvidence((), "pixels", f"{evidence[0].text}; {len(evidence)} of {len(evidence)} slices")
    seen = ", ".join(f"{'/'.join(r).lower() or 'unknown'} x{n}" for r, n in votes.most_common())
    return _pixels(None, f"the slices disagree: {seen}")


def middle_paths(paths: Sequence[Path], count: int = 3) -> list[Path]:
    """Up to ``count`` paths around the middle of an ordered series (the middle one first)."""
    n = len(paths)
    if n == 0:
        return []
    if n < 3 or count <= 1:
        return [paths[n // 2]]
    picks = [n // 2, (n * 3) // 10, (n * 7) // 10][:count]
    return [paths[i] for i in dict.fromkeys(picks)]


def region_from_files(paths: Iterable[Path], read: Callable[[Path], Dataset] | None = None) -> RegionEvidence:
    """Read each file (pixels included) and combine their pixel regions (see :func:`combine`).

    Files that cannot be read are skipped (and logged without patient data).
    """
    reader = read or (lambda p: pydicom.dcmread(p))
    found = []
    for path in paths:
        try:
            ds = reader(path)
        except (InvalidDicomError, OSError, EOFError, *_VALUE_ERRORS) as exc:
            log.warning("routing: %s cannot be read for its pixels (%s)", path.name, type(exc).__name__)
            continue
        try:
            found.append(region_from_pixels(ds))
        except (cv2.error, MemoryError, *_VALUE_ERRORS) as exc:
            log.warning("routing: the pixels of %s cannot be analysed (%s)", path.name, type(exc).__name__)
    return combine(found)
