"""The hotspot outlines as Softcopy Presentation States drawn over the source images themselves.

A presentation state is not a picture: it tells the viewer how to show an image it already has
(window, polarity) and which vector graphics and text to draw on it. One presentation state per
source instance that carries a positive finding (see :func:`marked_images`), all of a result in
one new series of the source study (deterministic UIDs, Modality PR):

- Grayscale Softcopy Presentation State for single-sample sources (MONOCHROME1/2); Color Softcopy
  Presentation State (with the source's ICC profile, else sRGB) for colour ones (RGB, YBR_*).
  Palette-colour sources get none (a Pseudo-Color Softcopy Presentation State would be needed).
- Graphic layer ``AI_FINDINGS`` (recommended colour cyan, as the secondary captures' outline),
  one Graphic Annotation per marked frame: for each positive finding a closed POLYLINE around the
  hotspot (PIXEL units: (column, row) with (0, 0) the top left corner of the top left pixel, so
  a pixel centre (row, col) is (col + 0.5, row + 0.5), as in the SR's SCOORD), and a text object
  above (or below) it, "<label>: p=0.91 (AI, not for diagnosis)", whose anchor is the outline's
  top (or bottom) centre. Frames of multi-frame sources are named (Referenced Frame Number).
- Grayscale states carry the source's own grey-scale pipeline so the image looks as it does
  without them: the Modality LUT (rescale slope/intercept of the frame, when valid), the VOI
  (the first window of the frame: functional groups of enhanced objects, else the top level;
  left out when the source states none, and the viewer then windows as it would anyway) and
  the source's Presentation LUT Shape, else INVERSE for MONOCHROME1 (IDENTITY otherwise).
- Displayed area: the whole image, SCALE TO FIT, pixel aspect ratio from the valid spacing.

An invalid optional value of a source is never copied (see :mod:`node.outputs.common`).
"""

from __future__ import annotations

import logging
import pkgutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from node.outputs import OutputError
from node.outputs.common import (
    NODE_MODEL_NAME,
    _floats,
    _macro_value,
    algorithm_equipment,
    ascii_text,
    clean_header,
    closed_polygon,
    plane_geometry,
    referenced_frame,
    safe_get,
    series_description,
    set_series_laterality,
    sources_by_uid,
)
from node.outputs.identity import output_uid
from node.types import AnalysisResult, Heatmap, ImageResult, LabelScore, OutputIdentity

log = logging.getLogger(__name__)

#: Series number of the presentation-state series (numbers need not be unique, the UIDs are).
GSPS_SERIES_NUMBER = 9903
LAYER = "AI_FINDINGS"
CONTENT_LABEL = "AI_FINDINGS"
#: Cyan, as the outline of the secondary captures.
LAYER_COLOUR = (0, 255, 255)
_MAX_POINTS = 256
_COLOUR_INTERPRETATIONS = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"}
_VOI_FUNCTIONS = {"LINEAR", "LINEAR_EXACT", "SIGMOID"}


@dataclass(frozen=True)
class Mark:
    """A positive finding on one shown image (and frame): what the presentation state draws and
    the Key Object Selection flags."""

    image: ImageResult
    finding: LabelScore
    heatmap: Heatmap
    #: the image's own probability for the label (the finding's when the image has none)
    probability: float


def marked_images(result: AnalysisResult, sources: Mapping[str, Dataset] | None = None) -> list[Mark]:
    """Where the positive findings of ``result`` are: for each positive, non-normal finding, every
    shown image whose heatmap for it has a hotspot and whose own score for it is positive, plus
    the image with the strongest hotspot (the one the SR's region is on) when it is not among
    them. In the order of ``result.images``. A segmentation result has none (its SEG shows it).
    Images not in ``sources`` (when given) are skipped."""
    if result.segmentation is not None:
        return []
    marks: list[tuple[int, Mark]] = []
    for finding in result.findings:
        if not finding.positive or finding.normal:
            continue
        candidates: list[tuple[tuple[float, float, int], int, Mark]] = []
        for order, image in enumerate(result.images):
            if sources is not None and image.sop_instance_uid not in sources:
                continue
            score = next((s for s in image.scores if s.label == finding.label), None)
            probability = score.probability if score is not None else finding.probability
            for heatmap in image.heatmaps:
                if heatmap.label != finding.label or heatmap.hotspot is None:
                    continue
                mark = Mark(image, finding, heatmap, probability)
                key = (heatmap.hotspot.peak_value, probability, -order)
                candidates.append((key, order, mark))
                if score is not None and score.positive:
                    marks.append((order, mark))
        if candidates:
            _, order, best = max(candidates, key=lambda c: c[0])
            if not any(m is best for _, m in marks):
                marks.append((order, best))
    marks.sort(key=lambda pair: pair[0])
    return [m for _, m in marks]


def build_presentation_states(
    result: AnalysisResult, sources: Sequence[Dataset], identity: OutputIdentity
) -> list[Dataset]:
    """One Grayscale (or Color) Softcopy Presentation State per source instance with a positive
    finding (see the module doc); [] when there is none. ``sources`` need no pixel data. Raises
    :class:`~node.outputs.OutputError` when one cannot be built."""
    by_uid = sources_by_uid(sources)
    marks = marked_images(result, by_uid)
    by_instance: dict[str, list[Mark]] = defaultdict(list)
    for mark in marks:
        by_instance[mark.image.sop_instance_uid].append(mark)
    series_uid = output_uid(identity, result, "gsps", "series")
    description = series_description("AI outlines", result.algorithm)
    marked_sources = [by_uid[uid] for uid in by_instance]
    out: list[Dataset] = []
    for uid, instance_marks in by_instance.items():
        source = by_uid[uid]
        photometric = str(safe_get(source, "PhotometricInterpretation") or "").strip().upper()
        if photometric == "PALETTE COLOR":
            log.info("model %s: no presentation state for a palette-colour image", result.algorithm.model_id)
            continue
        state = _presentation_state(
            result, source, instance_marks, identity, series_uid, description, len(out) + 1
        )
        set_series_laterality(state, marked_sources)
        out.append(state)
    log.debug("%d presentation states built for model %s", len(out), result.algorithm.model_id)
    return out


def _presentation_state(
    result: AnalysisResult,
    source: Dataset,
    marks: Sequence[Mark],
    identity: OutputIdentity,
    series_uid: str,
    description: str,
    number: int,
) -> Dataset:
    algorithm = result.algorithm
    ref = _bare_reference(clean_header(source))
    rows, cols = _positive_int(ref.get("Rows")), _positive_int(ref.get("Columns"))
    if not rows or not cols:
        raise OutputError("a marked source image has no valid Rows/Columns")
    samples = _positive_int(ref.get("SamplesPerPixel")) or 1
    photometric = str(ref.get("PhotometricInterpretation") or "").strip().upper()
    colour = samples == 3 or photometric in _COLOUR_INTERPRETATIONS
    if colour:
        ref.SamplesPerPixel = 3
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER,
        order=1,
        description=ascii_text(f"AI findings of {algorithm.name or algorithm.model_id}", 64),
        display_color=hd.color.CIELabColor.from_rgb(*LAYER_COLOUR),
    )
    by_frame: dict[int | None, list[Mark]] = defaultdict(list)
    for mark in marks:
        by_frame[referenced_frame(source, mark.image.frame)].append(mark)
    annotations = []
    for frame, frame_marks in by_frame.items():
        graphics, texts = [], []
        for mark in frame_marks:
            outline = hotspot_outline(mark.heatmap, rows, cols)
            if outline is None:
                continue
            graphics.append(
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=outline,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    is_filled=False,
                    tracking_id=ascii_text(f"{mark.finding.label} hotspot", 64),
                    tracking_uid=output_uid(
                        identity,
                        result,
                        "gsps",
                        "outline",
                        mark.image.sop_instance_uid,
                        frame,
                        mark.finding.label,
                    ),
                )
            )
            texts.append(_label(mark, outline, rows, cols, algorithm.research_use_only))
        if not graphics:
            continue
        try:
            annotations.append(
                hd.pr.GraphicAnnotation(
                    referenced_images=[ref],
                    graphic_layer=layer,
                    referenced_frame_number=frame,
                    graphic_objects=graphics,
                    text_objects=texts,
                )
            )
        except (ValueError, TypeError) as exc:
            raise OutputError(f"graphic annotation could not be built: {exc}") from exc
    if not annotations:
        raise OutputError("no hotspot outline could be drawn on a marked image")
    common: _StateArguments = {
        "referenced_images": [ref],
        "series_instance_uid": series_uid,
        "series_number": GSPS_SERIES_NUMBER,
        "sop_instance_uid": output_uid(identity, result, "gsps", "instance", ref.SOPInstanceUID),
        "instance_number": number,
        "manufacturer": ascii_text(identity.manufacturer, 64) or "pacs-node",
        "manufacturer_model_name": NODE_MODEL_NAME,
        "software_versions": ascii_text(identity.software_version, 64) or "0",
        "content_label": CONTENT_LABEL,
        "content_description": description,
        "graphic_annotations": annotations,
        "graphic_layers": [layer],
        "institution_name": ascii_text(identity.institution_name, 64) or None,
        "contributing_equipment": [algorithm_equipment(algorithm, identity)],
    }
    frames = [f for f in by_frame if f is not None]
    try:
        state: hd.pr.ColorSoftcopyPresentationState | hd.pr.GrayscaleSoftcopyPresentationState
        if colour:
            state = hd.pr.ColorSoftcopyPresentationState(
                **common,
                # highdicom annotates str; it accepts None (Type 2: empty), as its docstring says
                device_serial_number=None,  # type: ignore[arg-type]
                icc_profile=_icc_profile(source),
            )
        else:
            state = hd.pr.GrayscaleSoftcopyPresentationState(
                **common,
                device_serial_number=None,  # type: ignore[arg-type]  # as above
                modality_lut_transformation=_modality_lut(source, frames[0] if frames else None),
                voi_lut_transformations=_voi(source, ref, frames),
                presentation_lut_transformation=hd.PresentationLUTTransformation(
                    presentation_lut_shape=presentation_lut_shape(source)
                ),
            )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"presentation state could not be built: {exc}") from exc
    state.SeriesDescription = description
    state.DeviceUID = identity.device_uid  # General Equipment: the node
    _fix_displayed_area(state, source, frames[0] if frames else None)
    return state


#: What highdicom would copy into a presentation state from its referenced image when it is not
#: given a Modality or VOI LUT (unvalidated, and failing on multi-frame images without shared
#: functional groups): the copy handed to highdicom lacks them, this module sets them itself.
_PIPELINE_KEYWORDS = (
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
)


def _bare_reference(ref: Dataset) -> Dataset:
    """``ref`` without its grey-scale pipeline; functional groups reduced to one empty shared item
    and no per-frame items (only frame counts and UIDs matter to the presentation state)."""
    for keyword in _PIPELINE_KEYWORDS:
        if keyword in ref:
            delattr(ref, keyword)
    from highdicom._standard_utils import is_multiframe_image

    if is_multiframe_image(ref):  # highdicom reads the groups of every multi-frame class
        ref.SharedFunctionalGroupsSequence = [Dataset()]
        ref.PerFrameFunctionalGroupsSequence = []
    return ref


def presentation_lut_shape(source: Dataset) -> hd.PresentationLUTShapeValues:
    """The source's own Presentation LUT Shape (DX, MG, IO state one) when valid, else INVERSE
    for MONOCHROME1 and IDENTITY otherwise (what the source's photometric interpretation means)."""
    stated = str(safe_get(source, "PresentationLUTShape") or "").strip().upper()
    if stated in ("IDENTITY", "INVERSE"):
        return hd.PresentationLUTShapeValues(stated)
    photometric = str(safe_get(source, "PhotometricInterpretation") or "").strip().upper()
    if photometric == "MONOCHROME1":
        return hd.PresentationLUTShapeValues.INVERSE
    return hd.PresentationLUTShapeValues.IDENTITY


def hotspot_outline(heatmap: Heatmap, rows: int, cols: int) -> np.ndarray | None:
    """The hotspot polygon of ``heatmap`` as closed (column, row) PIXEL points inside the image
    (at most ~256), or None when fewer than 3 distinct points remain."""
    hotspot = heatmap.hotspot
    if hotspot is None or len(hotspot.polygon) < 3:
        return None
    points = np.array([(c + 0.5, r + 0.5) for r, c in hotspot.polygon], dtype=np.float64)
    if not np.all(np.isfinite(points)):
        return None
    return closed_polygon(np.clip(points, 0.0, [cols, rows]), _MAX_POINTS)


def label_text(mark: Mark, research: bool) -> str:
    """The text drawn beside an outline: finding, probability, and who says so."""
    tail = "AI, not for diagnosis" if research else "AI"
    return ascii_text(f"{mark.finding.label}: p={mark.probability:.2f} ({tail})", 1024)


def _label(mark: Mark, outline: np.ndarray, rows: int, cols: int, research: bool) -> hd.pr.TextObject:
    """The text object of one outline: a box above the outline (below when there is no room),
    anchored at the outline's top (bottom) centre, all inside the image."""
    text = label_text(mark, research)
    height = float(max(min(rows / 20.0, 48.0), 10.0))
    width = float(min(cols, max(len(text) * height * 0.55, height)))
    left, right = float(outline[:, 0].min()), float(outline[:, 0].max())
    top, bottom = float(outline[:, 1].min()), float(outline[:, 1].max())
    centre = (left + right) / 2.0
    x0 = float(np.clip(centre - width / 2.0, 0.0, cols - width))
    gap = height / 4.0
    if top - gap - height >= 0.0:
        y0, anchor = top - gap - height, (centre, top)
    else:
        y0, anchor = min(bottom + gap, rows - height), (centre, bottom)
    y0 = max(y0, 0.0)
    return hd.pr.TextObject(
        text_value=text,
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=(x0, y0, x0 + width, min(y0 + height, float(rows))),
        anchor_point=(float(np.clip(anchor[0], 0, cols)), float(np.clip(anchor[1], 0, rows))),
        text_justification=hd.pr.TextJustificationValues.LEFT,
        anchor_point_visible=True,
    )


class _StateArguments(TypedDict):
    """What the grey and the colour presentation state are built with alike."""

    referenced_images: Sequence[Dataset]
    series_instance_uid: str
    series_number: int
    sop_instance_uid: str
    instance_number: int
    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    content_label: str
    content_description: str | None
    graphic_annotations: Sequence[hd.pr.GraphicAnnotation]
    graphic_layers: Sequence[hd.pr.GraphicLayer]
    institution_name: str | None
    contributing_equipment: Sequence[hd.ContributingEquipment]


def _positive_int(value: Any) -> int:
    """A non-negative int of a data set value (as pydicom gives it: any type); 0 when it is none."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return 0
    return max(number, 0)


def _modality_lut(source: Dataset, frame: int | None) -> hd.ModalityLUTTransformation | None:
    """The frame's rescale (slope, intercept, type) when valid, else None (no Modality LUT)."""
    slope = _floats(_macro_value(source, frame, "PixelValueTransformationSequence", "RescaleSlope"), 1)
    intercept = _floats(
        _macro_value(source, frame, "PixelValueTransformationSequence", "RescaleIntercept"), 1
    )
    if slope is None or intercept is None or slope[0] == 0:
        return None
    kind = str(_macro_value(source, frame, "PixelValueTransformationSequence", "RescaleType") or "").strip()
    if not kind or len(kind) > 16 or not all(ch.isupper() or ch.isdigit() or ch in "_ " for ch in kind):
        kind = "HU" if str(source.get("Modality") or "").upper() == "CT" else "US"
    return hd.ModalityLUTTransformation(
        rescale_intercept=intercept[0], rescale_slope=slope[0], rescale_type=kind
    )


def window_of(source: Dataset, frame: int | None) -> tuple[float, float, str, str | None] | None:
    """The first (center, width, VOI LUT function, explanation) the frame states, when valid
    (finite, width >= 1, a known function), else None."""
    centers = _first_number(_macro_value(source, frame, "FrameVOILUTSequence", "WindowCenter"))
    widths = _first_number(_macro_value(source, frame, "FrameVOILUTSequence", "WindowWidth"))
    if centers is None or widths is None or widths < 1.0:
        return None
    function = str(_macro_value(source, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR")
    function = function.strip().upper() or "LINEAR"
    if function not in _VOI_FUNCTIONS:
        function = "LINEAR"
    explanation = _macro_value(source, frame, "FrameVOILUTSequence", "WindowCenterWidthExplanation")
    if explanation is not None and not isinstance(explanation, str):
        try:
            explanation = str(list(explanation)[0])  # type: ignore[call-overload]
        except (TypeError, IndexError):
            explanation = None
    text = ascii_text(str(explanation), 64) if explanation else None
    return centers, widths, function, text or None


def _first_number(value: object) -> float | None:
    if value is None or isinstance(value, bytes) or value == "":
        return None
    items = [value] if isinstance(value, str | int | float) else list(value)  # type: ignore[call-overload]
    if not items:
        return None
    numbers = _floats(items[0], 1)
    return None if numbers is None else numbers[0]


def _voi(
    source: Dataset, ref: Dataset, frames: Sequence[int]
) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """Softcopy VOI LUT items: the window of the (single-frame) image, or one item per distinct
    window of the marked frames, each naming its frames. None when no valid window is stated."""
    if not frames:
        window = window_of(source, None)
        return None if window is None else [_voi_item(window, None)]
    groups: dict[tuple[float, float, str, str | None], list[int]] = defaultdict(list)
    for frame in frames:
        window = window_of(source, frame)
        if window is not None:
            groups[window].append(frame)
    if not groups:
        return None
    return [
        _voi_item(window, hd.ReferencedImageSequence(referenced_images=[ref], referenced_frame_number=listed))
        for window, listed in groups.items()
    ]


def _voi_item(
    window: tuple[float, float, str, str | None], refs: hd.ReferencedImageSequence | None
) -> hd.pr.SoftcopyVOILUTTransformation:
    center, width, function, explanation = window
    return hd.pr.SoftcopyVOILUTTransformation(
        # lists: highdicom splits a bare explanation string into characters
        window_center=[center],
        window_width=[width],
        window_explanation=[explanation] if explanation else None,
        voi_lut_function=function,
        referenced_images=refs,
    )


def _icc_profile(source: Dataset) -> bytes:
    """The source's ICC profile, else highdicom's sRGB profile."""
    profile = safe_get(source, "ICCProfile")
    if isinstance(profile, bytes) and len(profile) > 128:
        return profile
    data = pkgutil.get_data("highdicom", "_icc_profiles/sRGB_v4_ICC_preference.icc")
    if data is None:
        raise OutputError("highdicom's sRGB ICC profile is missing")
    return data


def _fix_displayed_area(state: Dataset, source: Dataset, frame: int | None) -> None:
    """The displayed area as PS3.3 C.10.4 wants it for an ordinary image: no Pixel Origin
    Interpretation (only for tiled images), and the pixel aspect ratio of the source's valid
    spacing (1:1 when unknown)."""
    geometry = plane_geometry(source, frame)
    for item in state.DisplayedAreaSelectionSequence:
        if "PixelOriginInterpretation" in item:
            del item.PixelOriginInterpretation
        spacing = geometry.pixel_spacing
        if spacing and abs(spacing[0] - spacing[1]) > 1e-6 * max(spacing):
            # row spacing \ column spacing, as integers (PS3.3 C.10.4: Presentation Pixel Aspect Ratio)
            item.PresentationPixelAspectRatio = [round(spacing[0] * 1000), round(spacing[1] * 1000)]
