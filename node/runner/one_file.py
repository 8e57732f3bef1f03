"""One uploaded file through the pipeline's own routing rules, decoding, preprocessing, model and
heatmap rendering (the inference API's work; the runner is the place that chains stages)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from node.budget import DEFAULT_BUDGET, Budget
from node.dicom.inspect import InflateError, inflated_size
from node.errors import BudgetExceeded, DecodeError, NodeError, PreprocessError, RefusalReason, UploadRefused
from node.inference.decode import check_budget, supported_transfer_syntaxes
from node.inference.prepared import Preparer
from node.outputs.sc import heatmaps_to_show, render_overlay
from node.pipeline.region import region_from_pixels
from node.pipeline.route import RuleSet, route, route_header_from_dataset, with_pixel_region
from node.redact import redact
from node.runner.analyse import JobTimeout, Stopwatch, analyse
from node.types import AnalysisResult

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Photometric interpretations the decoders take, with their samples per pixel (the retired
#: HSV, ARGB and CMYK, and any other, are refused up front).
_PHOTOMETRICS = {
    "MONOCHROME1": 1,
    "MONOCHROME2": 1,
    "PALETTE COLOR": 1,
    "RGB": 3,
    "YBR_FULL": 3,
    "YBR_FULL_422": 3,
    "YBR_PARTIAL_420": 3,
    "YBR_ICT": 3,
    "YBR_RCT": 3,
}

#: One model's result and its rendered heatmap overlays as (label, RGB uint8 image).
Outcome = tuple[AnalysisResult, list[tuple[str, np.ndarray]]]
#: Told each step of an upload's analysis as (stage, one line for people): decoded, routed,
#: preprocessing, inference, heatmap (the "Analyse a file" page streams them).
Progress = Callable[[str, str], None]


def _check_inflated(data: bytes, budget: Budget) -> None:
    """Refuse a deflated upload that would inflate past the budget, before pydicom inflates it
    (it would, whole, in memory). Files that are not DICOM are left to dcmread to refuse."""
    stream = BytesIO(data)
    try:
        if read_preamble(stream, False) is None:
            return
        meta = _read_file_meta_info(stream)
    except Exception:  # pydicom raises several types on a broken meta group: dcmread says which
        return
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    body = memoryview(data)[stream.tell() :]
    try:
        inflated_size(body, budget.max_inflated_bytes)
    except BudgetExceeded as exc:
        raise UploadRefused(RefusalReason.OVER_BUDGET, f"the upload is refused: {redact(str(exc))}") from exc
    except InflateError as exc:
        raise UploadRefused(
            RefusalReason.NOT_DICOM, f"not a readable DICOM file: {redact(str(exc))}"
        ) from exc
    finally:
        body.release()


def parse_upload(data: bytes, budget: Budget = DEFAULT_BUDGET) -> Dataset:
    """The uploaded bytes as a DICOM data set with pixel data in a decodable transfer syntax,
    inflated (a deflated one) within ``budget``."""
    _check_inflated(data, budget)
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise UploadRefused(
            RefusalReason.NOT_DICOM, f"not a DICOM file (Part 10, with the DICM preamble): {redact(str(exc))}"
        ) from exc
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise UploadRefused(RefusalReason.NO_PIXELS, "the DICOM file has no pixel data (not an image)")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        raise UploadRefused(
            RefusalReason.NOT_DICOM, "the DICOM file has no Transfer Syntax UID in its file meta information"
        )
    if ts not in supported_transfer_syntaxes():
        raise UploadRefused(
            RefusalReason.UNSUPPORTED_SYNTAX,
            f"unsupported transfer syntax {ts} ({getattr(ts, 'name', ts)}): no decoder is installed",
        )
    _check_photometric(ds)
    return ds


def _check_photometric(ds: Dataset) -> None:
    """Refuse a photometric interpretation no decoder takes, or one its samples per pixel contradict."""
    if "PixelData" not in ds:  # float pixel data: greyscale by definition
        return
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    samples = ds.get("SamplesPerPixel", 1) or 1
    if photometric not in _PHOTOMETRICS:
        raise UploadRefused(
            RefusalReason.UNSUPPORTED_PHOTOMETRIC,
            f"unsupported photometric interpretation {photometric[:16] or '(none)'!r}: the node decodes "
            + ", ".join(_PHOTOMETRICS),
        )
    if samples != _PHOTOMETRICS[photometric]:
        raise UploadRefused(
            RefusalReason.UNSUPPORTED_PHOTOMETRIC,
            f"photometric interpretation {photometric} with {samples} samples per pixel "
            f"(it has {_PHOTOMETRICS[photometric]})",
        )


def analyse_upload(
    rules: RuleSet | None,
    models: object,
    data: bytes,
    deadline: float,
    budget: Budget = DEFAULT_BUDGET,
    preparer: Preparer | None = None,
    progress: Progress | None = None,
) -> tuple[str, list[Outcome]]:
    """Route and analyse one uploaded file with every model its rule names; render its heatmaps.
    ``models`` is the runner's :class:`~node.runner.Models`. Nothing is inflated or decoded past
    ``budget`` (refused as ``over_budget``); ``preparer`` decodes and prepares it in a child
    process under the node's memory and time limits (over them: ``undecodable``, with the reason).
    ``progress`` is told each step as it starts. Raises :class:`UploadRefused`."""
    tell = progress or (lambda stage, message: None)
    ds = parse_upload(data, budget)
    try:  # before routing, which may read the pixels of a CT or MR
        check_budget(ds, budget)
    except BudgetExceeded as exc:
        raise UploadRefused(RefusalReason.OVER_BUDGET, f"the image is refused: {redact(str(exc))}") from exc
    except DecodeError as exc:
        raise UploadRefused(
            RefusalReason.UNDECODABLE, f"the pixel data cannot be decoded: {redact(str(exc))}"
        ) from exc
    tell("decoded", _describe(ds))
    if rules is None:
        raise UploadRefused(RefusalReason.NO_RULES, "the node has no routing rules loaded")
    # the same evidence as the pipeline: a CT or MR naming no body region is routed on its pixels
    decision = route(rules, with_pixel_region(route_header_from_dataset(ds), lambda: region_from_pixels(ds)))
    if not decision.routed:
        modality = ds.get("Modality", "") or "(none)"
        raise UploadRefused(
            RefusalReason.NO_ROUTE, f"no route for this image (modality {modality}): {decision.reason}"
        )
    loaded = [m for m in decision.models if models.available(m)]  # type: ignore[attr-defined]
    if not loaded:
        raise UploadRefused(
            RefusalReason.NOT_LOADED,
            f"rule '{decision.rule}' routes to {', '.join(decision.models)}, which is not loaded",
        )
    tell("routed", f"rule '{decision.rule}' -> {', '.join(loaded)}: {decision.reason}")
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="pacs-node-infer-") as tmp:
        path = Path(tmp) / "upload.dcm"
        path.write_bytes(data)
        for model_id in loaded:
            try:
                result, _ = analyse(
                    models.registry.get(model_id),  # type: ignore[attr-defined]
                    models.sessions[model_id],  # type: ignore[attr-defined]
                    [path],
                    level="image",
                    uid_seed=f"infer|{model_id}|{ds.get('SOPInstanceUID', '')}",
                    watch=Stopwatch(deadline=deadline, on_stage=_stage_teller(tell, model_id)),
                    budget=budget,
                    preparer=preparer,
                )
            except JobTimeout as exc:
                raise UploadRefused(
                    RefusalReason.TIMEOUT, f"inference took too long: {redact(str(exc))}"
                ) from exc
            except DecodeError as exc:
                raise UploadRefused(
                    RefusalReason.UNDECODABLE, f"the pixel data cannot be decoded: {redact(str(exc))}"
                ) from exc
            except PreprocessError as exc:
                raise UploadRefused(
                    RefusalReason.UNPROCESSABLE,
                    f"the image cannot be preprocessed for {model_id}: {redact(str(exc))}",
                ) from exc
            except NodeError as exc:
                raise UploadRefused(
                    RefusalReason.FAILED, f"{type(exc).__name__}: {redact(str(exc))}"
                ) from exc
            tell("heatmap", f"{model_id}: rendering the heatmap overlays")
            outcomes.append((result, _overlays(result)))
    return decision.rule or "", outcomes


def _describe(ds: Dataset) -> str:
    """One line on what was decoded: modality, SOP class, size, colour, transfer syntax."""
    sop = ds.get("SOPClassUID", "")
    ts = ds.file_meta.get("TransferSyntaxUID", "")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return (
        f"{ds.get('Modality', '') or 'no modality'}, {getattr(sop, 'name', sop) or 'no SOP class'}, "
        f"{ds.get('Columns', '?')}x{ds.get('Rows', '?')}{f' x {frames} frames' if frames > 1 else ''}, "
        f"{ds.get('PhotometricInterpretation', '?')}, {getattr(ts, 'name', ts)}"
    )


def _stage_teller(tell: Progress, model_id: str) -> Callable[[str], None]:
    """The stopwatch's stage names as progress steps (``inferring`` is told as ``inference``)."""
    return lambda stage: tell("inference" if stage == "inferring" else stage, model_id)


def _overlays(result: AnalysisResult) -> list[tuple[str, np.ndarray]]:
    out = []
    for image in result.images:
        if image.display is None:
            continue
        for heatmap in heatmaps_to_show(image, result):
            score = next((s for s in (*image.scores, *result.findings) if s.label == heatmap.label), None)
            picture, _ = render_overlay(image.display, heatmap, score, result.algorithm)
            out.append((heatmap.label, picture))
    return out
