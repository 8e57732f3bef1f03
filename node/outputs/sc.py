"""Heatmaps as RGB secondary captures that every viewer can show.

For each shown image (``ImageResult`` with a display image and heatmaps) one SC per label to show:
the labels found positive (in the image or in the aggregated findings), or else the label with the
highest score. Each SC is the windowed source image in grey (a colour source - fundus, dermoscopy,
microscopy, ultrasound - in its own RGB colours) with the heatmap blended over it where
the map is high (matplotlib's perceptual *inferno* colour map, via OpenCV), the hotspot outlined
for positive labels, a colour legend on the right and a text band below: the finding and its
score, the model, and for research models the line "RESEARCH USE ONLY - NOT FOR DIAGNOSIS".

All SCs of a result go into one new series of the source study (deterministic UIDs), with
ImageType DERIVED\\SECONDARY, Conversion Type WSD (workstation), a Source Image Sequence that
references the source image (purpose (121322, DCM, "Source image for image processing
operation")), Burned In Annotation YES and Recognizable Visual Features YES (the picture is the
patient's own image, which can show a face or other identifying features in head CT/MR).

Size: images are drawn at a long side between 512 and 1024 pixels (small CT/MR slices are
enlarged so the text is legible, mammograms are reduced); the factor is stated in the Derivation
Description. Pixel Spacing is omitted: a capture with a legend and a text band is not for
measuring.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from node.outputs import OutputError
from node.outputs.common import (
    BURNED_IN_WARNING,
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSIS,
    SC_SERIES_NUMBER,
    algorithm_equipment,
    ascii_text,
    clean_header,
    explanation_concept,
    referenced_frame,
    series_description,
    set_series_laterality,
)
from node.outputs.identity import output_uid
from node.types import AlgorithmIdentity, AnalysisResult, Heatmap, ImageResult, LabelScore, OutputIdentity

log = logging.getLogger(__name__)

#: Long side of the drawn image (before the legend and text band are added).
MIN_SIDE = 512
MAX_SIDE = 1024
#: Heatmap values below LOW are not coloured; the colour reaches ALPHA at HIGH and above.
LOW, HIGH, ALPHA = 0.25, 0.75, 0.65
COLORMAP = cv2.COLORMAP_INFERNO
_OUTLINE_RGB = (0, 255, 255)
_WARN_RGB = (255, 220, 0)
_TEXT_RGB = (255, 255, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX

SOURCE_FOR_PROCESSING = hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
SPATIAL_RESAMPLING = hd.sr.CodedConcept.from_code(codes.DCM.SpatialResampling)


def build_heatmap_scs(
    result: AnalysisResult, sources_by_uid: Mapping[str, Dataset], identity: OutputIdentity
) -> list[Dataset]:
    """RGB secondary captures of the heatmaps of ``result``, one new series (see the module doc).

    ``sources_by_uid`` maps SOP Instance UID to the source data set (pixel data not needed).
    Images without a display image or without heatmaps are skipped (logged). Raises
    :class:`~node.outputs.OutputError` when a shown image's source is missing.
    """
    sources = sources_by_uid
    algorithm = result.algorithm
    series_uid = output_uid(identity, result, "sc", "series")
    description = series_description("AI heatmap", algorithm)
    shown = [im for im in result.images if im.display is not None and im.heatmaps]
    if len(shown) < len(result.images):
        log.info(
            "model %s: %d of %d images have no display image or no heatmap; no SC for them",
            algorithm.model_id,
            len(result.images) - len(shown),
            len(result.images),
        )
    missing = [im for im in shown if im.sop_instance_uid not in sources]
    if missing:
        raise OutputError(f"{len(missing)} shown image(s) not among the source instances")
    shown_sources = [sources[im.sop_instance_uid] for im in shown]
    out: list[Dataset] = []
    for image in shown:
        assert image.display is not None
        source = sources[image.sop_instance_uid]
        ref = clean_header(source, image.frame, flatten=True)
        frame = referenced_frame(source, image.frame)
        for heatmap in heatmaps_to_show(image, result):
            score = _score_for(heatmap.label, image, result)
            pixels, scale = render_overlay(image.display, heatmap, score, algorithm)
            sc = _sc_dataset(
                result, image, heatmap, ref, pixels, scale, identity, series_uid, description, len(out) + 1
            )
            if frame is not None:  # the source frame the capture shows
                sc.SourceImageSequence[0].ReferencedFrameNumber = frame
            set_series_laterality(sc, shown_sources)
            out.append(sc)
    log.debug("%d heatmap SCs built for model %s", len(out), algorithm.model_id)
    return out


def heatmaps_to_show(image: ImageResult, result: AnalysisResult) -> list[Heatmap]:
    """The heatmaps of ``image`` for its positive labels (image or aggregated level), or the one of
    its highest-scoring label when none is positive; none for an image without heatmaps (a
    model with ``heatmap: none``)."""
    if not image.heatmaps:
        return []
    positive = {s.label for s in image.scores if s.positive and not s.normal} | {
        f.label for f in result.findings if f.positive and not f.normal
    }
    shown = [h for h in image.heatmaps if h.label in positive]
    if shown:
        return shown
    scores = {s.label: s.probability for s in image.scores}
    return [max(image.heatmaps, key=lambda h: (scores.get(h.label, -1.0), float(np.max(h.values))))]


def _score_for(label: str, image: ImageResult, result: AnalysisResult) -> LabelScore | None:
    for score in (*image.scores, *result.findings):
        if score.label == label:
            return score
    return None


def render_overlay(
    display: np.ndarray, heatmap: Heatmap, score: LabelScore | None, algorithm: AlgorithmIdentity
) -> tuple[np.ndarray, float]:
    """The RGB picture (uint8, rows x cols x 3) and the scale factor applied to the source image.

    ``display`` is the windowed greyscale image (rows, cols) or a colour photograph (rows, cols,
    3) RGB, which the heatmap is blended over in its own colours."""
    grey = np.asarray(display)
    if grey.size == 0 or not (grey.ndim == 2 or (grey.ndim == 3 and grey.shape[2] == 3)):
        raise OutputError(
            f"display image must be (rows, cols) or (rows, cols, 3) RGB, found shape {grey.shape}"
        )
    grey = grey.astype(np.uint8, copy=False)
    values: np.ndarray = np.asarray(heatmap.values, dtype=np.float32)  # only read, never written
    if values.ndim != 2:
        raise OutputError(f"heatmap {heatmap.label!r} must be 2-D, found shape {values.shape}")
    if not np.isfinite(values).all():  # a source-sized map is rarely anything but finite: no copy then
        values = np.nan_to_num(values, nan=0.0)
    rows, cols = grey.shape[:2]
    if values.shape != grey.shape[:2]:
        values = cv2.resize(values, (cols, rows), interpolation=cv2.INTER_LINEAR)
    if values.size and not (float(values.min()) >= 0.0 and float(values.max()) <= 1.0):
        values = np.clip(values, 0.0, 1.0)  # a normalised heatmap is within 0..1 already

    long_side = max(rows, cols)
    scale = 1.0
    if long_side > MAX_SIDE:
        scale = MAX_SIDE / long_side
    elif long_side < MIN_SIDE:
        scale = MIN_SIDE / long_side
    height, width = max(round(rows * scale), 1), max(round(cols * scale), 1)
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        grey = cv2.resize(grey, (width, height), interpolation=interp)
        values = cv2.resize(values, (width, height), interpolation=interp)

    # base * (1 - alpha) + colour * alpha + 0.5, clipped: the same float32 operations, in place
    base = (grey if grey.ndim == 3 else cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)).astype(np.float32)
    colour = _colormap(values)
    alpha = values - LOW
    alpha /= HIGH - LOW
    np.clip(alpha, 0.0, 1.0, out=alpha)
    alpha *= ALPHA
    weights = alpha[..., None]
    colour *= weights
    np.multiply(base, 1.0 - weights, out=base)
    base += colour
    base += 0.5
    np.clip(base, 0, 255, out=base)
    picture = base.astype(np.uint8)

    positive = bool(score and score.positive)
    if positive and heatmap.hotspot is not None and len(heatmap.hotspot.polygon) >= 3:
        pts = np.array([[(c + 0.5) * scale, (r + 0.5) * scale] for r, c in heatmap.hotspot.polygon])
        thickness = max(1, round(width / 400))
        cv2.polylines(picture, [np.round(pts).astype(np.int32)], True, _OUTLINE_RGB, thickness, cv2.LINE_AA)

    picture = _add_legend(picture)
    return _add_text_band(picture, heatmap, score, algorithm), scale


def _colormap(values: np.ndarray) -> np.ndarray:
    """RGB float image of ``values`` (0..1) through the colour map."""
    bgr = cv2.applyColorMap(np.round(values * 255).astype(np.uint8), COLORMAP)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)


def _font_scale(width: int) -> tuple[float, int]:
    scale = float(np.clip(width / 1100.0, 0.4, 1.0))
    return scale, 1 if scale < 0.7 else 2


def _add_legend(picture: np.ndarray) -> np.ndarray:
    """A vertical colour bar (1 at the top, 0 at the bottom) with ticks, right of the image."""
    height, width = picture.shape[:2]
    font, thick = _font_scale(width)
    (tw, th), _ = cv2.getTextSize("0.5", _FONT, font, thick)
    panel_w = max(24 + tw + 16, width // 10)
    panel = np.zeros((height, panel_w, 3), dtype=np.uint8)
    margin = th + 8
    bar_h = max(height - 2 * margin, 2)
    ramp = np.linspace(1.0, 0.0, bar_h, dtype=np.float32)[:, None].repeat(16, axis=1)
    panel[margin : margin + bar_h, 6:22] = _colormap(ramp).astype(np.uint8)
    for value in (1.0, 0.5, 0.0):
        y = margin + round((1.0 - value) * (bar_h - 1))
        cv2.line(panel, (22, y), (26, y), _TEXT_RGB, 1)
        cv2.putText(panel, f"{value:.1f}", (28, y + th // 2), _FONT, font, _TEXT_RGB, thick, cv2.LINE_AA)
    return np.hstack([picture, panel])


def _add_text_band(
    picture: np.ndarray, heatmap: Heatmap, score: LabelScore | None, algorithm: AlgorithmIdentity
) -> np.ndarray:
    """A black band under the picture with the finding, score, model and the research warning."""
    width = picture.shape[1]
    font, thick = _font_scale(width)
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if score is not None:
        verdict = "POSITIVE" if score.positive else "negative"
        lines.append(
            (
                f"{score.label}: p={score.probability:.2f} (threshold {score.threshold:.2f}) {verdict}",
                _TEXT_RGB,
            )
        )
    else:
        lines.append((f"{heatmap.label}", _TEXT_RGB))
    lines.append((f"{algorithm.name} {algorithm.version} - {heatmap.method} heatmap", _TEXT_RGB))
    if algorithm.research_use_only:
        lines.append((BURNED_IN_WARNING, _WARN_RGB))
    rendered = []
    for text, rgb in lines:
        text = ascii_text(text)
        size = font
        (tw, th), base = cv2.getTextSize(text, _FONT, size, thick)
        while tw > width - 16 and size > 0.3:
            size *= 0.9
            (tw, th), base = cv2.getTextSize(text, _FONT, size, thick)
        rendered.append((text, rgb, size, th, base))
    line_h = max(th + base for _, _, _, th, base in rendered) + 10
    band = np.zeros((line_h * len(rendered) + 10, width, 3), dtype=np.uint8)
    for i, (text, rgb, size, th, _) in enumerate(rendered):
        y = 8 + i * line_h + th
        cv2.putText(band, text, (8, y), _FONT, size, rgb, thick, cv2.LINE_AA)
    return np.vstack([picture, band])


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Patient Orientation of the source's rows and columns: its own value, else derived from
    Image Orientation (Patient); None when unknown."""
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2 and all(value):
        return str(value[0]), str(value[1])
    iop = source.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    return _orientation_letters([float(v) for v in iop[:3]]), _orientation_letters(
        [float(v) for v in iop[3:]]
    )


def _orientation_letters(vector: list[float]) -> str:
    """The letters (up to 3, most significant first) of a direction cosine vector, PS3.3 C.7.6.1.1.1."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = sorted(range(3), key=lambda i: -abs(vector[i]))
    return "".join(letters[i][0 if vector[i] > 0 else 1] for i in order if abs(vector[i]) > 1e-4)


def _sc_dataset(
    result: AnalysisResult,
    image: ImageResult,
    heatmap: Heatmap,
    ref: Dataset,
    pixels: np.ndarray,
    scale: float,
    identity: OutputIdentity,
    series_uid: str,
    description: str,
    number: int,
) -> Dataset:
    algorithm = result.algorithm
    orientation = patient_orientation(ref)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=output_uid(
                identity, result, "sc", image.sop_instance_uid, image.frame, heatmap.label
            ),
            instance_number=number,
            manufacturer=ascii_text(identity.manufacturer, 64) or "pacs-node",
            # highdicom checks single letters; the full value is set below
            patient_orientation=(orientation[0][0], orientation[1][0]) if orientation else ("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[algorithm_equipment(algorithm, identity)],
            series_description=description,
            manufacturer_model_name=NODE_MODEL_NAME,
            software_versions=ascii_text(identity.software_version, 64) or "0",
            institution_name=ascii_text(identity.institution_name, 64) or None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"secondary capture could not be built: {exc}") from exc
    # highdicom sets a list in its constructor, so mypy infers list[str]; the Type 2 element is
    # legitimately empty (None) when the source gives no orientation
    sc.PatientOrientation = list(orientation) if orientation else None  # type: ignore[assignment]
    sc.DeviceUID = identity.device_uid  # General Equipment: the node
    if ref.get("BodyPartExamined"):
        sc.BodyPartExamined = ref.BodyPartExamined
    sc.ConversionType = "WSD"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "YES"
    sc.LossyImageCompression = "01" if str(ref.get("LossyImageCompression", "00")) == "01" else "00"
    resized = "" if scale == 1.0 else f"; source resampled by {scale:.3g}"
    over = (
        "the colour source image"
        if int(ref.get("SamplesPerPixel") or 1) == 3
        else "the windowed source image"
    )
    sc.DerivationDescription = ascii_text(
        f"{heatmap.method} heatmap of '{heatmap.label}' by {algorithm.name} {algorithm.version} "
        f"blended over {over}{resized}; legend and text burned in",
        1024,
    )
    derivation = [explanation_concept(heatmap.method)]
    if scale != 1.0:
        derivation.append(SPATIAL_RESAMPLING)
    sc.DerivationCodeSequence = [_code_item(c) for c in derivation]
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = ref.SOPClassUID
    source_item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    source_item.PurposeOfReferenceCodeSequence = [_code_item(SOURCE_FOR_PROCESSING)]
    sc.SourceImageSequence = [source_item]
    sc.ImageComments = ascii_text(
        f"AI heatmap for {heatmap.label} ({algorithm.model_id})"
        + (f". {NOT_FOR_DIAGNOSIS}" if algorithm.research_use_only else ""),
        10240,
    )
    return sc


def _code_item(concept: hd.sr.CodedConcept) -> Dataset:
    item = Dataset()
    item.CodeValue = concept.value
    item.CodingSchemeDesignator = concept.scheme_designator
    item.CodeMeaning = concept.meaning
    return item
