"""Volume classifiers: a classifier whose input is ``NCDHW`` sees the whole series at once.

The series' slices are prepared by the manifest's 2-D steps (as every model's are), stacked in
spatial order into (C, D, H, W), resampled along the slice axis to the input's depth when it is
fixed (linear, on slice centres: PyTorch's ``interpolate(..., mode="trilinear",
align_corners=False)`` restricted to depth, which is how a 3-D network is usually fed a volume
of another length), and classified in one call. The series' findings are the model's, given on
its middle slice; it has no heatmap yet, so no display of that slice is made (no SC shows it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import InferenceError
from node.inference.batcher import RunsBatches
from node.inference.postprocess import label_scores
from node.inference.prepared import Preparer
from node.inference.registry import LoadedModel
from node.runner.analyse import Stopwatch, algorithm_identity, make_predictor, prepare_all
from node.runner.segment import stack_volume
from node.types import AnalysisResult, ImageResult


def resample_depth(volume: np.ndarray, depth: int) -> np.ndarray:
    """(C, D, H, W) resampled to (C, ``depth``, H, W) along D: linear between slice centres,
    edges clamped (``align_corners=False``)."""
    source = volume.shape[1]
    if source == depth:
        return volume
    scale = source / depth
    z = np.clip((np.arange(depth) + 0.5) * scale - 0.5, 0.0, None)
    lo = np.minimum(np.floor(z).astype(np.intp), source - 1)
    hi = np.minimum(lo + 1, source - 1)
    w = (z - lo).astype(np.float32)[None, :, None, None]
    return (volume[:, lo] * (1.0 - w) + volume[:, hi] * w).astype(np.float32)


def analyse_volume(
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
    """Classify one series as a volume (see the module docstring)."""
    manifest = model.manifest
    with watch.stage("preprocessing"):
        images = prepare_all(files, manifest, False, budget, preparer, watch.deadline)
        volume = stack_volume(manifest, images)
        depth = manifest.input.spatial3d[0]
        if depth is not None:
            volume = resample_depth(volume, depth)
    predict = make_predictor(manifest, session, watch.batches)
    with watch.stage("inferring"):
        probs = predict(volume[np.newaxis])
        if probs.shape[0] != 1:
            raise InferenceError(
                f"model {manifest.id}: one volume gave {probs.shape[0]} rows of probabilities"
            )
        findings = label_scores(manifest, probs[0])
        middle = len(images) // 2
        shown = images[middle]
        result_image = ImageResult(
            sop_instance_uid=shown.header.sop_instance_uid,
            sop_class_uid=shown.header.sop_class_uid,
            scores=tuple(findings),
            heatmaps=(),
            display=None,  # no heatmap to show over it (analyse.shows_images)
            frame=shown.header.frame_number,
        )
    sources = list({id(im.dataset): im.dataset for im in images}.values())
    result = AnalysisResult(
        algorithm=algorithm_identity(model),
        study_uid=str(sources[0].StudyInstanceUID),
        series_uids=tuple(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in sources)),
        level=level,
        findings=tuple(findings),
        images=(result_image,),
        uid_seed=uid_seed,
        frames_analysed=len(images),
    )
    return result, sources
