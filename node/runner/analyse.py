"""One job's analysis: decode -> preprocess -> infer -> explain -> aggregate, over the files of a
series or study. The same path serves the pipeline, the rule tester and evaluation."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import DecodeError, NodeError
from node.inference.decode import decode_frame, read_dataset, slice_order
from node.inference.explain import aggregate, heatmaps, patch_scores, top_slices
from node.inference.isolate import PreparationDeadline
from node.inference.manifest import Manifest, PatchHeatmap
from node.inference.postprocess import label_scores, probabilities
from node.inference.prepared import DisplaySpec, Preparer, PrepareSpec, display_image, prepare_items
from node.inference.registry import LoadedModel
from node.inference.runtime import ModelSession
from node.types import (
    AlgorithmIdentity,
    AnalysisResult,
    ImageHeader,
    ImageResult,
    ModelInput,
)

log = logging.getLogger(__name__)


class JobTimeout(NodeError):
    """The job ran past its time limit."""


@dataclass
class Stopwatch:
    """Seconds spent per stage, and the deadline every stage checks."""

    deadline: float
    timings: dict[str, float] = field(default_factory=dict)
    on_stage: Callable[[str], None] | None = None
    batches: list[int] = field(default_factory=list)  # images (or patches) per inference call

    def stage(self, name: str) -> _Stage:
        """Time a stage (and report its start, e.g. to record the job state)."""
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"job timed out before stage {name}")
        if self.on_stage is not None:
            self.on_stage(name)
        return _Stage(self, name)


class _Stage:
    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name = watch, name

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        spent = time.monotonic() - self.started
        self.watch.timings[self.name] = self.watch.timings.get(self.name, 0.0) + spent


@dataclass
class _Image:
    """One analysed frame (the only one of a single-frame image): the source dataset (pixel data
    dropped), that frame's header, its model input, and its display when it was kept."""

    dataset: Dataset
    header: ImageHeader
    model_input: ModelInput
    source: Path | None  # the file, to decode the frame again for display; None: display kept
    index: int = 0  # 0-based frame index in the source
    display: np.ndarray | None = None


def algorithm_identity(model: LoadedModel) -> AlgorithmIdentity:
    """How outputs name this model."""
    m = model.manifest
    thresholds = " ".join(f"{lb.name}={lb.threshold:g}" for lb in m.labels if not lb.normal)
    parameters = f"thresholds {thresholds}"
    if m.segmentation is not None and m.segmentation.dimensions == 3:
        parameters += f" min volume {m.segmentation.min_volume_voxels} vx"
    elif m.segmentation is not None:
        parameters += f" min area {m.segmentation.min_area_px} px"
    return AlgorithmIdentity(
        model_id=m.id,
        name=m.name,
        version=m.version,
        sha256=m.model.sha256,
        research_use_only=m.research_use_only,
        parameters=parameters[:64],
    )


def analyse(
    model: LoadedModel,
    session: ModelSession,
    files: Sequence[Path],
    *,
    level: str,
    uid_seed: str,
    watch: Stopwatch,
    budget: Budget = DEFAULT_BUDGET,
    preparer: Preparer | None = None,
) -> tuple[AnalysisResult, list[Dataset]]:
    """Run ``model`` over ``files`` (one series or study); return the result and the source
    data sets (pixel data dropped) that the outputs reference. Nothing is decoded over
    ``budget`` (the node's ``limits``): BudgetExceeded, a permanent DecodeError. ``preparer``
    (the node's :class:`~node.inference.isolate.PreparePool`) decodes and prepares the files in
    a child process under a memory and time limit; None: in this process."""
    manifest = model.manifest
    if manifest.kind == "segmentation" or manifest.input.is_volume:
        # per-pixel models (node.runner.segment) and volume classifiers (node.runner.volume), both
        # imported here: they use this module
        if manifest.kind == "segmentation":
            from node.runner.segment import analyse_segmentation as other
        else:  # a volume classifier: the series as one NCDHW input
            from node.runner.volume import analyse_volume as other
        return other(
            model,
            session,
            files,
            level=level,
            uid_seed=uid_seed,
            watch=watch,
            budget=budget,
            preparer=preparer,
        )
    is_patch = isinstance(manifest.heatmap, PatchHeatmap)
    with watch.stage("preprocessing"):
        images = prepare_all(files, manifest, is_patch, budget, preparer, watch.deadline)
    predict = make_predictor(manifest, session, watch.batches)
    with watch.stage("inferring"):
        outputs, probs, patch_results = infer_images(
            manifest, session, images, predict, is_patch, watch.batches
        )
        per_image = [label_scores(manifest, row) for row in probs]
        agg = manifest.aggregation
        findings = label_scores(manifest, aggregate(probs, agg.method, agg.k))
        shown = _images_to_show(manifest, probs, len(images))
        displays = _displays(images, shown, budget, preparer, watch.deadline)
        results = []
        for i in shown:
            image_outputs = {name: value[i : i + 1] for name, value in outputs.items()}
            maps = heatmaps(
                manifest,
                images[i].model_input,
                image_outputs,
                predict,
                patch_result=patch_results[i] if is_patch else None,
            )
            results.append(
                ImageResult(
                    sop_instance_uid=images[i].header.sop_instance_uid,
                    sop_class_uid=images[i].header.sop_class_uid,
                    scores=tuple(per_image[i]),
                    heatmaps=tuple(maps),
                    display=displays[i],
                    frame=images[i].header.frame_number,
                )
            )
    sources = list({id(im.dataset): im.dataset for im in images}.values())  # one per instance
    result = AnalysisResult(
        algorithm=algorithm_identity(model),
        study_uid=str(sources[0].StudyInstanceUID),
        series_uids=tuple(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in sources)),
        level=level,
        findings=tuple(findings),
        images=tuple(results),
        uid_seed=uid_seed,
        frames_analysed=len(images),
    )
    return result, sources


def prepare_all(
    files: Sequence[Path],
    manifest: Manifest,
    is_patch: bool,
    budget: Budget = DEFAULT_BUDGET,
    preparer: Preparer | None = None,
    deadline: float | None = None,
) -> list[_Image]:
    """Decode every frame of every file, frame by frame, and prepare each to its model input,
    in spatial order (per-frame positions for multi-frame images): through ``preparer`` (a child
    process) when given, else in this process (:func:`node.inference.prepared.prepare_items`).

    A frame's full-resolution pixels are dropped once prepared. For a series-level model (top-k
    frames shown) the shown frames are decoded again at the end (``_displays``); otherwise every
    frame is shown and its uint8 display is kept now. Frames of multi-frame images take part like
    slices, each with its own header (``ImageHeader.for_frame``).
    """
    if not files:
        raise DecodeError("the job has no images")
    recompute = manifest.aggregation.level == "series"
    spec = PrepareSpec(manifest, check_size=not is_patch, keep_display=not recompute)
    if preparer is None:
        frames = prepare_items(files, spec, budget)
    else:
        try:
            frames = preparer.submit(files, spec, budget, deadline)
        except PreparationDeadline as exc:
            raise JobTimeout(str(exc)) from exc
    images = []
    for f in frames:
        path = files[f.item]
        source = Path(path) if recompute and isinstance(path, (str, Path)) else None
        assert f.model_input is not None  # a PrepareSpec prepares every frame
        images.append(_Image(f.dataset, f.header, f.model_input, source, f.index, f.display))
    order = slice_order([im.header for im in images])
    return [images[i] for i in order]


def _displays(
    images: list[_Image],
    shown: Sequence[int],
    budget: Budget = DEFAULT_BUDGET,
    preparer: Preparer | None = None,
    deadline: float | None = None,
) -> dict[int, np.ndarray]:
    """The uint8 display of each shown image: kept, or decoded again (each file read once;
    through ``preparer``, in a child process, when given)."""
    out: dict[int, np.ndarray] = {}
    by_source: dict[Path, list[int]] = {}
    for i in shown:
        display, source = images[i].display, images[i].source
        if display is not None:
            out[i] = display
        elif source is not None:
            by_source.setdefault(source, []).append(i)
    if preparer is not None and by_source:
        sources = list(by_source)
        spec = DisplaySpec(tuple(tuple(images[i].index for i in by_source[s]) for s in sources))
        try:
            frames = preparer.submit(sources, spec, budget, deadline)
        except PreparationDeadline as exc:
            raise JobTimeout(str(exc)) from exc
        for f in frames:
            i = next(i for i in by_source[sources[f.item]] if images[i].index == f.index)
            assert f.display is not None
            out[i] = f.display
        return out
    for source, indices in by_source.items():
        ds = read_dataset(source)
        for i in indices:
            out[i] = display_image(decode_frame(ds, images[i].index, budget))
    return out


def make_predictor(
    manifest: Manifest, session: ModelSession, batches: list[int]
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a model-input batch to the manifest's label probabilities through
    ``session``; each batch's size is appended to ``batches``."""

    def predict(batch: np.ndarray) -> np.ndarray:
        batches.append(int(batch.shape[0]))
        raw = session.run(batch, [manifest.outputs.probabilities])[manifest.outputs.probabilities]
        return probabilities(manifest, raw)

    return predict


def infer_images(
    manifest: Manifest,
    session: ModelSession,
    images: list[_Image],
    predict: Callable[[np.ndarray], np.ndarray],
    is_patch: bool,
    batches: list[int],
) -> tuple[dict[str, np.ndarray], np.ndarray, list]:
    """Run the model over prepared ``images``: (raw outputs by name, per-image probabilities,
    patch results). A patch-heatmap model scores sliding patches through ``predict`` (the
    probabilities are each image's highest patch scores); any other runs one batch of every
    image (its size appended to ``batches``)."""
    if is_patch:
        spec = manifest.heatmap
        assert isinstance(spec, PatchHeatmap)
        patch_results = [
            patch_scores(
                im.model_input.tensor,
                predict,
                spec.patch_size,
                spec.stride,
                batch_size=spec.batch_size,
                layout=im.model_input.layout,
            )
            for im in images
        ]
        probs = np.stack([scores.max(axis=0) for scores, _ in patch_results])
        return {}, probs, patch_results
    batch = np.concatenate([im.model_input.tensor for im in images], axis=0)
    batches.append(int(batch.shape[0]))
    outputs = session.run(batch)
    probs = probabilities(manifest, outputs[manifest.outputs.probabilities])
    return outputs, probs, []


def _images_to_show(manifest: Manifest, probs: np.ndarray, count: int) -> list[int]:
    keep = manifest.aggregation.keep_top_slices
    if manifest.aggregation.level == "series" and count > keep:
        suspicion = probs[:, [i for i, lb in enumerate(manifest.labels) if not lb.normal]].max(axis=1)
        return sorted(top_slices(suspicion, keep))
    return list(range(count))
