"""A segmentation model's analysis (``kind: segmentation``): per-pixel classes over every frame of
a series, mapped back to the source pixels, post-processed into one mask per label, measured.

- ``segmentation.dimensions: 2``: the frames are run in batches, one 2-D input per frame;
  8-connected components under ``min_area_px`` are removed slice by slice.
- ``segmentation.dimensions: 3``: the frames are prepared one by one by the same 2-D
  preprocessing, stacked in spatial order into one (C, D, H, W) volume and run by sliding-window
  inference (:mod:`node.inference.sliding`, MONAI semantics); each slice of the blended output is
  mapped back to its source frame like a 2-D output, and 26-connected components under
  ``min_volume_voxels`` are removed over the whole volume.

Both end the same way: findings per label (present when pixels remain, probability the highest
class probability over the kept mask, else over the frames), areas and volumes where the geometry
allows, the top-k frames shown with the mask as their heatmap, and the masks (with the kept
pixels' probabilities for a FRACTIONAL SEG) for :mod:`node.outputs.seg`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import InferenceError
from node.inference.batcher import RunsBatches
from node.inference.explain import find_hotspot, map_to_source, top_slices
from node.inference.manifest import Manifest
from node.inference.postprocess import pixel_probabilities, remove_small_volumes, segment_masks
from node.inference.prepared import Preparer
from node.inference.registry import LoadedModel
from node.inference.sliding import sliding_window_inference
from node.outputs.common import plane_geometry
from node.runner.analyse import JobTimeout, Stopwatch, _displays, _Image, algorithm_identity, prepare_all
from node.types import (
    AnalysisResult,
    Code,
    Heatmap,
    ImageResult,
    LabelScore,
    SegmentationResult,
    SegmentFrame,
    SegmentSummary,
)

log = logging.getLogger(__name__)


@dataclass
class _FrameMasks:
    """One frame's post-processed masks (labels, H, W) in source pixels and the probabilities of
    the kept pixels (0 elsewhere); both None when no label has a pixel. ``peak``: each label's
    highest probability over the whole frame; ``shape`` the source frame's (rows, cols)."""

    peak: np.ndarray
    shape: tuple[int, int]
    masks: np.ndarray | None = None
    probs: np.ndarray | None = None


def analyse_segmentation(
    model: LoadedModel,
    session: RunsBatches,
    files: Sequence[Path],
    *,
    level: str,
    uid_seed: str,
    watch: Stopwatch,
    budget: Budget = DEFAULT_BUDGET,
    preparer: Preparer | None = None,
) -> tuple[AnalysisResult, list[Dataset]]:
    """Analyse one series with a segmentation model (see the module doc); return the result and
    the source data sets (pixel data dropped) the outputs reference. ``preparer``: see
    :func:`node.runner.analyse.analyse`."""
    manifest = model.manifest
    spec = manifest.segmentation
    assert spec is not None
    with watch.stage("preprocessing"):
        images = prepare_all(files, manifest, False, budget, preparer, watch.deadline)
    n_labels = len(manifest.labels)
    frames: list[SegmentFrame] = []
    peaks = np.zeros((len(images), n_labels), dtype=np.float64)  # max prob per frame
    kept = np.zeros((len(images), n_labels), dtype=np.float64)  # max prob in the mask
    pixels = np.zeros((len(images), n_labels), dtype=np.int64)
    maps: dict[int, np.ndarray] = {}  # frame -> (labels, H, W) kept probabilities
    fractional = spec.output == "fractional"
    with watch.stage("inferring"):
        per_frame = _volume_masks(manifest, session, images, watch) if spec.dimensions == 3 else None
        masks_of = (
            iter(per_frame) if per_frame is not None else _slice_masks(manifest, session, images, watch)
        )
        for i, (im, fm) in enumerate(zip(images, masks_of, strict=True)):
            peaks[i] = fm.peak
            if fm.masks is not None and fm.probs is not None:
                pixels[i] = fm.masks.reshape(n_labels, -1).sum(axis=1)
                kept[i] = fm.probs.reshape(n_labels, -1).max(axis=1)
                maps[i] = fm.probs
            header = im.header
            frames.append(
                SegmentFrame(
                    sop_instance_uid=header.sop_instance_uid,
                    sop_class_uid=header.sop_class_uid,
                    frame=header.frame_number,
                    rows=fm.shape[0],
                    cols=fm.shape[1],
                    masks=fm.masks,
                    probabilities=fm.probs if fractional else None,
                )
            )
        segmentation = _segmentation_result(manifest, images, frames, pixels)
        findings = [
            _segment_score(manifest, k, pixels[:, k].sum() > 0, kept[:, k].max(), peaks[:, k].max())
            for k in range(n_labels)
        ]
        shown = _frames_to_show(manifest, kept, peaks, len(images))
        displays = _displays(images, shown, budget, preparer, watch.deadline)
        results = []
        for i in shown:
            scores = [
                _segment_score(manifest, k, pixels[i, k] > 0, kept[i, k], peaks[i, k])
                for k in range(n_labels)
            ]
            shown_maps = []
            if i in maps:
                for k, label in enumerate(manifest.labels):
                    if pixels[i, k]:
                        values = maps[i][k]
                        shown_maps.append(
                            Heatmap(label.name, values, "segmentation", find_hotspot(values, 1e-6))
                        )
            results.append(
                ImageResult(
                    sop_instance_uid=images[i].header.sop_instance_uid,
                    sop_class_uid=images[i].header.sop_class_uid,
                    scores=tuple(scores),
                    heatmaps=tuple(shown_maps),
                    display=displays.get(i),
                    frame=images[i].header.frame_number,
                )
            )
    sources = list({id(im.dataset): im.dataset for im in images}.values())
    result = AnalysisResult(
        algorithm=algorithm_identity(model),
        study_uid=str(sources[0].StudyInstanceUID),
        series_uids=tuple(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in sources)),
        level=level,
        findings=tuple(findings),
        images=tuple(results),
        uid_seed=uid_seed,
        frames_analysed=len(images),
        segmentation=segmentation,
    )
    return result, sources


def _source_probabilities(frame_probs: np.ndarray, image: _Image) -> np.ndarray:
    """(C, h, w) model-pixel probabilities -> (C, H, W) source pixels (the preprocessing geometry)."""
    return np.stack(
        [map_to_source(frame_probs[c], image.model_input.geometry) for c in range(frame_probs.shape[0])]
    )


def _source_per_model_pixel(image: _Image) -> float:
    geometry = image.model_input.geometry
    return 1.0 / (geometry.scale_y * geometry.scale_x)


def _frame_masks(manifest: Manifest, source: np.ndarray, masks: np.ndarray) -> _FrameMasks:
    label_probs = source[[lb.index for lb in manifest.labels]]
    peak = label_probs.reshape(len(manifest.labels), -1).max(axis=1)
    shape = (int(source.shape[1]), int(source.shape[2]))
    if not masks.any():
        return _FrameMasks(peak, shape)
    return _FrameMasks(peak, shape, masks, np.where(masks, label_probs, 0.0).astype(np.float32))


def _slice_masks(
    manifest: Manifest, session: RunsBatches, images: list[_Image], watch: Stopwatch
) -> Iterator[_FrameMasks]:
    """2-D: every frame's masks, the frames run in batches of ``segmentation.batch_size``."""
    spec = manifest.segmentation
    assert spec is not None
    output = manifest.outputs.probabilities
    for start in range(0, len(images), spec.batch_size):
        chunk = images[start : start + spec.batch_size]
        batch = np.concatenate([im.model_input.tensor for im in chunk], axis=0)
        watch.batches.append(int(batch.shape[0]))
        probs = pixel_probabilities(manifest, session.run(batch, [output])[output])
        for im, frame_probs in zip(chunk, probs, strict=True):
            source = _source_probabilities(frame_probs, im)
            yield _frame_masks(manifest, source, segment_masks(manifest, source, _source_per_model_pixel(im)))


def slice_tensor(image: _Image) -> np.ndarray:
    """One prepared slice as (C, H, W) float32, whatever layout the preprocessing wrote it in
    (a 3-D manifest's ``NCDHW`` is not a 2-D layout: the steps then leave the slice channel-last)."""
    tensor = image.model_input.tensor[0]
    if image.model_input.layout != "NCHW":
        tensor = tensor.transpose(2, 0, 1)
    return tensor


def stack_volume(manifest: Manifest, images: list[_Image]) -> np.ndarray:
    """The prepared slices in spatial order as one (C, D, H, W) float32 volume."""
    slices = [slice_tensor(im) for im in images]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise InferenceError(
            f"model {manifest.id}: a 3-D model needs every slice prepared to one size "
            f"(found {len(shapes)}: {sorted(shapes)[:3]})"
        )
    channels = slices[0].shape[0]
    if channels != manifest.input.channels:
        raise InferenceError(
            f"model {manifest.id}: slices have {channels} channels, the input {manifest.input.channels}"
        )
    return np.ascontiguousarray(np.stack(slices, axis=1), dtype=np.float32)


def volume_logits(
    manifest: Manifest,
    session: RunsBatches,
    volume: np.ndarray,
    batches: list[int],
    deadline: float | None = None,
) -> np.ndarray:
    """The blended raw output (K, D, H, W) of a 3-D model over ``volume`` (C, D, H, W); past
    ``deadline`` (monotonic) before a window batch: JobTimeout."""
    spec = manifest.segmentation
    roi = manifest.roi_size
    assert spec is not None and roi is not None
    output = manifest.outputs.probabilities

    def predict(batch: np.ndarray) -> np.ndarray:
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimeout(f"job timed out after {len(batches)} sliding-window call(s)")
        batches.append(int(batch.shape[0]))
        return session.run(batch, [output])[output]

    raw = sliding_window_inference(
        volume, roi, predict, overlap=spec.overlap, mode=spec.blend, sw_batch_size=spec.batch_size
    )
    if raw.shape[0] < manifest.n_outputs:
        raise InferenceError(
            f"model {manifest.id}: output {output} has {raw.shape[0]} channels; "
            f"expected >= {manifest.n_outputs}"
        )
    return raw


def _volume_masks(
    manifest: Manifest, session: RunsBatches, images: list[_Image], watch: Stopwatch
) -> list[_FrameMasks]:
    """3-D: sliding-window inference over the stacked slices, each output slice mapped back to its
    source frame and thresholded, then small 26-connected components removed over the volume."""
    spec = manifest.segmentation
    assert spec is not None
    raw = volume_logits(manifest, session, stack_volume(manifest, images), watch.batches, watch.deadline)
    n_labels = len(manifest.labels)
    per_frame: list[_FrameMasks] = []
    for z, im in enumerate(images):
        probs = pixel_probabilities(manifest, raw[np.newaxis, :, z])[0]
        source = _source_probabilities(probs, im)
        per_frame.append(_frame_masks(manifest, source, segment_masks(manifest, source)))
    del raw
    min_voxels = int(np.ceil(spec.min_volume_voxels * _source_per_model_pixel(images[0])))
    if min_voxels <= 1 or all(fm.masks is None for fm in per_frame):
        return per_frame
    shapes = {fm.shape for fm in per_frame}
    if len(shapes) != 1:
        raise InferenceError(f"model {manifest.id}: the frames differ in size; no 3-D components")
    rows, cols = shapes.pop()
    for k in range(n_labels):
        volume = np.zeros((len(images), rows, cols), dtype=bool)
        for z, fm in enumerate(per_frame):
            if fm.masks is not None:
                volume[z] = fm.masks[k]
        cleaned = remove_small_volumes(volume, min_voxels)
        for z, fm in enumerate(per_frame):
            if fm.masks is not None and fm.probs is not None:
                fm.masks[k] = cleaned[z]
                fm.probs[k] = np.where(cleaned[z], fm.probs[k], 0.0)
    for fm in per_frame:
        if fm.masks is not None and not fm.masks.any():
            fm.masks = fm.probs = None
    log.debug("model %s: components under %d source voxels removed", manifest.id, min_voxels)
    return per_frame


def _segment_score(manifest: Manifest, k: int, present: bool, kept: float, peak: float) -> LabelScore:
    """A label's score from its mask: present when pixels remain; the probability is the highest
    class probability over the kept mask, or over the frame(s) when nothing remains."""
    label = manifest.labels[k]
    return LabelScore(
        label=label.name,
        code=Code(label.code.value, label.code.scheme_designator, label.code.meaning),
        probability=float(np.clip(kept if present else peak, 0.0, 1.0)),
        threshold=label.threshold,
        positive=bool(present),
        triage=bool(present and label.triage),
    )


def _frames_to_show(manifest: Manifest, kept: np.ndarray, peaks: np.ndarray, count: int) -> list[int]:
    """Every frame for an image-level model; else the top-k frames by kept-mask probability
    (frames with pixels first), in spatial order."""
    keep = manifest.aggregation.keep_top_slices
    if manifest.aggregation.level != "series" or count <= keep:
        return list(range(count))
    suspicion = np.where(kept.max(axis=1) > 0, 1.0 + kept.max(axis=1), peaks.max(axis=1))
    return sorted(top_slices(suspicion, keep))


def _slice_spacing(images: list[_Image]) -> float | None:
    """The spacing between consecutive frames along the slice normal (mm), when the positions are
    regular (every step within 10 % of the median); None otherwise."""
    headers = [im.header for im in images]
    if len(headers) < 2 or any(h.image_position_patient is None for h in headers):
        return None
    orientation = headers[0].image_orientation_patient
    if orientation is None or any(h.image_orientation_patient != orientation for h in headers):
        return None
    normal = np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))
    along = np.array([np.dot(normal, h.image_position_patient) for h in headers])  # type: ignore[arg-type]
    steps = np.abs(np.diff(along))
    median = float(np.median(steps))
    if median <= 0 or np.any(np.abs(steps - median) > 0.1 * median):
        return None
    return median


def _segmentation_result(
    manifest: Manifest, images: list[_Image], frames: list[SegmentFrame], pixels: np.ndarray
) -> SegmentationResult:
    spec = manifest.segmentation
    assert spec is not None
    notes: list[str] = []
    areas = np.full(pixels.shape, np.nan)
    for i, im in enumerate(images):
        geometry = plane_geometry(im.dataset, im.header.frame_number)
        if geometry.spacing_source == "PixelSpacing" and geometry.pixel_spacing:
            areas[i] = pixels[i] * geometry.pixel_spacing[0] * geometry.pixel_spacing[1]
    if np.isnan(areas).any() and pixels.any():
        notes.append("area not measured: a segmented frame has no valid Pixel Spacing")
    spacing = _slice_spacing(images)
    if spacing is None and len(images) > 1 and pixels.any():
        notes.append("volume not measured: the frames have no regular slice positions")
    segments = []
    for k, label in enumerate(manifest.labels):
        total = int(pixels[:, k].sum())
        area = volume = None
        if total and not np.isnan(areas[:, k]).any():
            area = float(areas[:, k].max())
            if spacing is not None:
                volume = float(areas[:, k].sum() * spacing)
        category = label.category
        assert category is not None
        segments.append(
            SegmentSummary(
                number=k + 1,
                label=label.name,
                code=Code(label.code.value, label.code.scheme_designator, label.code.meaning),
                category=Code(category.value, category.scheme_designator, category.meaning),
                pixels=total,
                frames_with_pixels=int((pixels[:, k] > 0).sum()),
                area_mm2=area,
                volume_mm3=volume,
            )
        )
    region = spec.anatomic_region
    return SegmentationResult(
        segments=tuple(segments),
        frames=tuple(frames),
        series_description=spec.series_description,
        anatomic_region=None
        if region is None
        else Code(region.value, region.scheme_designator, region.meaning),
        notes=tuple(notes),
        fractional=spec.output == "fractional",
    )
