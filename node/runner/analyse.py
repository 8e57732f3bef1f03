"""One job's analysis: decode -> preprocess -> infer -> explain -> aggregate, over the files of a
series or study. The same path serves the pipeline, the rule tester and evaluation."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import DecodeError, NodeError
from node.inference.batcher import RunsBatches, SessionBatcher
from node.inference.decode import decode_frame, read_dataset, slice_order
from node.inference.device_arrays import concatenate, to_host
from node.inference.explain import aggregate, heatmaps, patch_scores, top_slices
from node.inference.gpu_prepare import GpuPreparer
from node.inference.isolate import PreparationDeadline
from node.inference.manifest import Manifest, NoHeatmap, PatchHeatmap
from node.inference.postprocess import label_scores, probabilities
from node.inference.prepared import (
    DisplaySpec,
    PreparedFrame,
    Preparer,
    PrepareSpec,
    display_image,
    iter_prepared,
)
from node.inference.registry import LoadedModel
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
    last: str | None = None  # the stage reported last

    def stage(self, name: str) -> _Stage:
        """Time a stage (and report its start, e.g. to record the job state; a stage entered
        again right after itself adds to its time and is not reported twice)."""
        if time.monotonic() > self.deadline:
            raise JobTimeout(f"job timed out before stage {name}")
        if self.on_stage is not None and name != self.last:
            self.on_stage(name)
        self.last = name
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
    session: RunsBatches,
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
        # these work on the host tensors: the GPU preparer's CPU side prepares them
        preparer = preparer.cpu if isinstance(preparer, GpuPreparer) else preparer
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
    batcher, own = _batcher(session, manifest)
    try:
        predict = make_predictor(manifest, batcher, watch.batches)
        images, outputs, probs, patch_results = prepare_and_infer(
            files, manifest, batcher, is_patch, budget, preparer, watch
        )
        with watch.stage("inferring"):  # what is left of it: heatmaps and the shown images
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
                    _on_host(images[i].model_input),
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
                        display=displays.get(i),
                        frame=images[i].header.frame_number,
                    )
                )
    finally:
        if own:
            batcher.close()
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


def shows_images(manifest: Manifest) -> bool:
    """Whether ``manifest``'s model shows its source images in its outputs (a heatmap's secondary
    capture and the upload page's overlay, a segmentation's masks over the image), so that a
    display of them is made; a classifier without a heatmap (``heatmap: none``, as a converted
    MONAI bundle's) and a volume classifier (which the manifest holds to ``heatmap: none``) show
    none."""
    return manifest.kind == "segmentation" or not isinstance(manifest.heatmap, NoHeatmap)


def _spec(manifest: Manifest, is_patch: bool) -> PrepareSpec:
    """How a classifier's files are prepared: a series-level model (top-k frames shown) decodes
    its shown frames again at the end (``_displays``); otherwise every frame is shown, and its
    uint8 display is kept now; a model that shows no image has none made."""
    return PrepareSpec(
        manifest,
        check_size=not is_patch,
        keep_display=manifest.aggregation.level != "series",
        shows=shows_images(manifest),
    )


def _frames(
    files: Sequence[Path],
    spec: PrepareSpec,
    budget: Budget,
    preparer: Preparer | None,
    deadline: float | None,
) -> Iterator[PreparedFrame]:
    """Every frame of every file as it is prepared: by ``preparer``'s processes (in no set order
    across files), else in this process in the order handed in."""
    if not files:
        raise DecodeError("the job has no images")
    try:
        if preparer is None:
            yield from iter_prepared(files, spec, budget)
        else:
            yield from preparer.stream(files, spec, budget, deadline)
    except PreparationDeadline as exc:
        raise JobTimeout(str(exc)) from exc


def _image(files: Sequence[Path], frame: PreparedFrame, recompute: bool) -> _Image:
    path = files[frame.item]
    source = Path(path) if recompute and isinstance(path, (str, Path)) else None
    assert frame.model_input is not None  # a PrepareSpec prepares every frame
    return _Image(frame.dataset, frame.header, frame.model_input, source, frame.index, frame.display)


def prepare_all(
    files: Sequence[Path],
    manifest: Manifest,
    is_patch: bool,
    budget: Budget = DEFAULT_BUDGET,
    preparer: Preparer | None = None,
    deadline: float | None = None,
) -> list[_Image]:
    """Decode every frame of every file, frame by frame, and prepare each to its model input,
    in spatial order (per-frame positions for multi-frame images): through ``preparer`` (child
    processes) when given, else in this process (:meth:`PrepareSpec.prepare`).

    A frame's full-resolution pixels are dropped once prepared. For a series-level model (top-k
    frames shown) the shown frames are decoded again at the end (``_displays``); otherwise every
    frame is shown and its uint8 display is kept now. Frames of multi-frame images take part like
    slices, each with its own header (``ImageHeader.for_frame``).
    """
    spec = _spec(manifest, is_patch)
    frames = list(_frames(files, spec, budget, preparer, deadline))
    images = [_image(files, f, spec.displays_later) for f in frames]
    return [images[i] for i in _spatial_order(frames, images)]


def _on_host(model_input: ModelInput) -> ModelInput:
    """``model_input`` with its tensor on the host (a GPU-prepared tensor copied back: the
    heatmap methods work on NumPy arrays); a host tensor as it is."""
    if isinstance(model_input.tensor, np.ndarray):
        return model_input
    return replace(model_input, tensor=to_host(model_input.tensor))


def _spatial_order(frames: Sequence[PreparedFrame], images: Sequence[_Image]) -> list[int]:
    """Indices of ``images`` (prepared from ``frames``, in the order they came) in spatial
    order; images that it does not tell apart stay in the order the files were handed in, not
    in the order the preparation processes happened to finish them."""
    handed = sorted(range(len(frames)), key=lambda i: (frames[i].item, frames[i].index))
    order = slice_order([images[i].header for i in handed])
    return [handed[i] for i in order]


def _batcher(session: RunsBatches, manifest: Manifest) -> tuple[SessionBatcher, bool]:
    """``session`` if it is a batcher (the runner's, shared by its jobs), else one of its own
    for this analysis (True: to be closed after it)."""
    if isinstance(session, SessionBatcher):
        return session, False
    return SessionBatcher(session, manifest.id), True


def prepare_and_infer(
    files: Sequence[Path],
    manifest: Manifest,
    session: RunsBatches,
    is_patch: bool,
    budget: Budget = DEFAULT_BUDGET,
    preparer: Preparer | None = None,
    watch: Stopwatch | None = None,
) -> tuple[list[_Image], dict[str, np.ndarray], np.ndarray, list]:
    """Prepare every frame (as :func:`prepare_all`) and run the model over them while the rest
    are prepared: (images in spatial order, raw outputs by name, per-image probabilities, patch
    results), all in that order.

    Frames go to the model as they come: a full batch (the session's ``max_batch``) as soon as
    it is prepared; on a GPU or a Triton server (``SessionBatcher.eager``) also, whenever the
    model has nothing of this job to run, every frame prepared meanwhile, so that the model
    starts on the first image and later batches grow while it works. ``session``
    goes through a :class:`SessionBatcher` (which merges these batches with other jobs' of the
    same model). A patch-heatmap model scores each image's sliding patches (on a thread of its
    own, its patch batches through the batcher too); the probabilities are each image's highest
    patch scores. ``watch``: its "preprocessing" stage is the time until the last frame is
    prepared, "inferring" the model's work left after it; batch sizes go to ``watch.batches``.
    """
    batcher, own = _batcher(session, manifest)
    batches: list[int] = watch.batches if watch is not None else []
    deadline = watch.deadline if watch is not None else None
    spec = _spec(manifest, is_patch)
    images: list[_Image] = []
    frames: list[PreparedFrame] = []
    waiting: list[int] = []  # images not yet handed to the model
    running: list[tuple[list[int], Future]] = []
    patcher = ThreadPoolExecutor(1, thread_name_prefix="pacs-node-patches") if is_patch else None
    predict = make_predictor(manifest, batcher, batches)

    def hand_in() -> None:
        for start in range(0, len(waiting), batcher.max_batch):
            chunk = waiting[start : start + batcher.max_batch]
            batch = concatenate([images[i].model_input.tensor for i in chunk])  # on their device
            batches.append(int(batch.shape[0]))
            running.append((chunk, batcher.submit(batch)))
        waiting.clear()

    def score_patches(i: int) -> tuple[np.ndarray, object]:
        assert isinstance(manifest.heatmap, PatchHeatmap)
        heatmap = manifest.heatmap
        tensor, layout = to_host(images[i].model_input.tensor), images[i].model_input.layout
        return patch_scores(
            tensor, predict, heatmap.patch_size, heatmap.stride, batch_size=heatmap.batch_size, layout=layout
        )

    try:
        with watch.stage("preprocessing") if watch is not None else contextlib.nullcontext():
            for frame in _frames(files, spec, budget, preparer, deadline):
                frames.append(frame)
                images.append(_image(files, frame, spec.displays_later))
                if patcher is not None:
                    running.append(([len(images) - 1], patcher.submit(score_patches, len(images) - 1)))
                    continue
                waiting.append(len(images) - 1)
                if len(waiting) >= batcher.max_batch or batcher.eager and all(f.done() for _, f in running):
                    hand_in()
        with watch.stage("inferring") if watch is not None else contextlib.nullcontext():
            hand_in()
            done = [(chunk, future.result()) for chunk, future in running]
    finally:
        for _, future in running:
            future.cancel()
        if patcher is not None:
            patcher.shutdown(wait=True, cancel_futures=True)
        if own:
            batcher.close()
    order = _spatial_order(frames, images)
    position = np.empty(len(images), dtype=np.intp)
    position[order] = np.arange(len(images))  # where each image goes in spatial order
    images = [images[i] for i in order]
    if patcher is not None:
        results: list = [None] * len(images)
        for chunk, value in done:
            results[position[chunk[0]]] = value
        probs = np.stack([scores.max(axis=0) for scores, _ in results])
        return images, {}, probs, results
    outputs: dict[str, np.ndarray] = {}
    for chunk, value in done:
        for name, rows in value.items():
            if name not in outputs:
                outputs[name] = np.empty((len(images), *rows.shape[1:]), dtype=rows.dtype)
            outputs[name][position[chunk]] = rows
    probs = probabilities(manifest, outputs[manifest.outputs.probabilities])
    return images, outputs, probs, []


def _displays(
    images: list[_Image],
    shown: Sequence[int],
    budget: Budget = DEFAULT_BUDGET,
    preparer: Preparer | None = None,
    deadline: float | None = None,
) -> dict[int, np.ndarray]:
    """The uint8 display of each shown image: kept, or decoded again (each file read once;
    through ``preparer``, in a child process, when given); none for images with neither (a model
    that shows no image: ``shows_images``)."""
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
    manifest: Manifest, session: RunsBatches, batches: list[int]
) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a model-input batch to the manifest's label probabilities through
    ``session``; each batch's size is appended to ``batches``."""

    def predict(batch: np.ndarray) -> np.ndarray:
        batches.append(int(batch.shape[0]))
        raw = session.run(batch, [manifest.outputs.probabilities])[manifest.outputs.probabilities]
        return probabilities(manifest, raw)

    return predict


def _images_to_show(manifest: Manifest, probs: np.ndarray, count: int) -> list[int]:
    keep = manifest.aggregation.keep_top_slices
    if manifest.aggregation.level == "series" and count > keep:
        suspicion = probs[:, [i for i, lb in enumerate(manifest.labels) if not lb.normal]].max(axis=1)
        return sorted(top_slices(suspicion, keep))
    return list(range(count))
