"""The model manifest schema (``models/onnx/<id>/manifest.yaml``), strict: unknown fields are refused.

``load_manifest(path)`` parses and validates a file; every problem is reported as a ManifestError
whose message names the file and the field, e.g.
``models/onnx/cxr/manifest.yaml: labels.0.threshold: Input should be less than or equal to 1
(found 1.5)``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from node.errors import ManifestError
from node.files import read_yaml

_MISSING = object()

#: Standard CT window presets, name -> (center/level, width), in HU (Radiopaedia's "Windowing (CT)").
WINDOW_PRESETS: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {
        "brain": (40.0, 80.0),
        "subdural": (75.0, 215.0),
        "stroke": (40.0, 40.0),
        "liver": (30.0, 150.0),
        "abdomen": (50.0, 400.0),
        "mediastinum": (50.0, 350.0),
        "lung": (-600.0, 1500.0),
        "bone": (400.0, 1800.0),
    }
)

#: Ops that read greyscale stored values (the DICOM greyscale pipeline): refused on colour.
GREY_OPS = frozenset({"modality_lut", "window", "invert_monochrome1", "to_8bit", "replicate_channels"})
#: Ops that need an RGB image (H, W, 3) holding 0..255.
COLOUR_OPS = frozenset({"circular_crop", "clahe_luminance", "illumination_correction"})


class FieldProblem(ValueError):
    """A cross-field check failed; ``field`` is the dotted path relative to the model checked."""

    def __init__(self, field: str, message: str, found: Any = _MISSING) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.found = found


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Provenance and model file


class Provenance(_Strict):
    """How the model was made."""

    training_script: str = Field(min_length=1)
    data: str = Field(min_length=1, description="description of the training data")
    seed: int
    created: dt.date
    metrics: dict[str, float] = Field(default_factory=dict)
    framework: str | None = None


class ModelFile(_Strict):
    """The ONNX file beside the manifest and its sha256."""

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


Dim = int | str | None


class InputSpec(_Strict):
    """The graph input: name, shape (first dim is the dynamic batch), dtype, layout.

    ``NCHW`` / ``NHWC``: a 2-D input ``[N, C, H, W]`` / ``[N, H, W, C]``. ``NCDHW``: a 3-D input
    ``[N, C, D, H, W]`` (a volume of D slices: a 3-D segmentation model, ``segmentation.dimensions:
    3``, or a volume classifier at series level); its spatial dims may be null (a fully-convolutional
    net; a segmentation model's ``segmentation.roi_size`` then gives the window, a classifier takes
    the series' own slice count).
    """

    name: str = Field(min_length=1)
    shape: list[Dim] = Field(min_length=4, max_length=5)
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    layout: Literal["NCHW", "NHWC", "NCDHW"] = "NCHW"

    @model_validator(mode="after")
    def _check_shape(self) -> InputSpec:
        rank = 5 if self.layout == "NCDHW" else 4
        if len(self.shape) != rank:
            raise FieldProblem(
                "shape", f"layout {self.layout} needs {rank} dimensions (found {len(self.shape)})", self.shape
            )
        batch = self.shape[0]
        if isinstance(batch, int) and batch > 0:
            raise FieldProblem("shape.0", "the batch dimension must be dynamic (null or a name)", batch)
        for i, d in enumerate(self.shape[1:], start=1):
            if isinstance(d, int) and d <= 0:
                raise FieldProblem(f"shape.{i}", "dimensions must be positive", d)
        c_axis = 3 if self.layout == "NHWC" else 1
        if not isinstance(self.shape[c_axis], int):
            raise FieldProblem(f"shape.{c_axis}", "the channel dimension must be fixed", self.shape[c_axis])
        return self

    @property
    def channels(self) -> int:
        """Number of channels the model expects."""
        return int(self.shape[3] if self.layout == "NHWC" else self.shape[1])  # type: ignore[arg-type]

    @property
    def is_volume(self) -> bool:
        """True for a 3-D (``NCDHW``) input."""
        return self.layout == "NCDHW"

    @property
    def slice_layout(self) -> Literal["NCHW", "NHWC"]:
        """The layout one slice is prepared in (a 3-D input's slices are prepared as ``NCHW``)."""
        return "NCHW" if self.layout == "NCDHW" else self.layout

    @property
    def spatial(self) -> tuple[int | None, int | None]:
        """(height, width); None for dynamic dims (a 3-D input: one slice's)."""
        if self.layout == "NHWC":
            h, w = self.shape[1], self.shape[2]
        else:
            h, w = self.shape[-2], self.shape[-1]
        return (h if isinstance(h, int) else None, w if isinstance(w, int) else None)

    @property
    def spatial3d(self) -> tuple[int | None, int | None, int | None]:
        """(depth, height, width) of a 3-D input; None for dynamic dims."""
        if self.layout != "NCDHW":
            raise ValueError(f"layout {self.layout} is not 3-D")
        d, h, w = self.shape[2], self.shape[3], self.shape[4]
        return tuple(x if isinstance(x, int) else None for x in (d, h, w))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Preprocessing steps (a discriminated union on ``op``)


class StepOp(StrEnum):
    """The preprocessing step a manifest's ``op`` names (the values are the manifest's words)."""

    def __repr__(self) -> str:  # validation errors list the expected tags as the manifest spells them
        return repr(self.value)

    MODALITY_LUT = "modality_lut"
    WINDOW = "window"
    INVERT_MONOCHROME1 = "invert_monochrome1"
    TO_8BIT = "to_8bit"
    CLAHE = "clahe"
    MEDIAN = "median"
    GAUSSIAN = "gaussian"
    RESIZE = "resize"
    LETTERBOX = "letterbox"
    NORMALIZE = "normalize"
    REPLICATE_CHANNELS = "replicate_channels"
    CIRCULAR_CROP = "circular_crop"
    CLAHE_LUMINANCE = "clahe_luminance"
    ILLUMINATION_CORRECTION = "illumination_correction"


Interpolation = Literal["nearest", "linear", "cubic", "area"]
Size = tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]


class ModalityLutStep(_Strict):
    """Stored values to modality units: ``x * RescaleSlope + RescaleIntercept``."""

    op: Literal[StepOp.MODALITY_LUT]


class WindowStep(_Strict):
    """DICOM linear VOI window to 0..255, from the header, a named preset, or explicit values."""

    op: Literal[StepOp.WINDOW]
    source: Literal["header", "preset", "explicit"] = "header"
    preset: str | None = None
    center: float | None = None
    width: float | None = Field(default=None, ge=1)
    fallback: Literal["error", "minmax"] = "error"

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        if v is not None and v not in WINDOW_PRESETS:
            raise ValueError(f"unknown window preset; known: {', '.join(sorted(WINDOW_PRESETS))}")
        return v

    @model_validator(mode="after")
    def _source_fields(self) -> WindowStep:
        if self.source == "preset" and self.preset is None:
            raise FieldProblem("preset", "required when source is 'preset'")
        if self.source == "explicit":
            if self.center is None:
                raise FieldProblem("center", "required when source is 'explicit'")
            if self.width is None:
                raise FieldProblem("width", "required when source is 'explicit'")
        return self


class InvertMonochrome1Step(_Strict):
    """Invert MONOCHROME1 images (high values dark) so that every image reads MONOCHROME2."""

    op: Literal[StepOp.INVERT_MONOCHROME1]


class To8BitStep(_Strict):
    """16->8-bit conversion: naive bit-depth scaling, global or per-image percentile bounds, or the
    3-channel mix stacking the three."""

    op: Literal[StepOp.TO_8BIT]
    method: Literal["naive", "global_percentile", "image_percentile", "mix"]
    low: float | None = None
    high: float | None = None
    low_percentile: float = Field(default=0.01, ge=0, le=100)
    high_percentile: float = Field(default=99.99, ge=0, le=100)

    @model_validator(mode="after")
    def _bounds(self) -> To8BitStep:
        if self.method in ("global_percentile", "mix"):
            if self.low is None:
                raise FieldProblem("low", f"required for method '{self.method}'")
            if self.high is None:
                raise FieldProblem("high", f"required for method '{self.method}'")
            if self.high <= self.low:
                raise FieldProblem("high", "must be greater than low", self.high)
        if self.high_percentile <= self.low_percentile:
            raise FieldProblem("high_percentile", "must be greater than low_percentile", self.high_percentile)
        return self


class ClaheStep(_Strict):
    """Contrast-limited adaptive histogram equalisation (OpenCV) on an 8-bit image."""

    op: Literal[StepOp.CLAHE]
    clip_limit: float = Field(default=2.0, gt=0)
    tile_grid: Size = (8, 8)


class MedianStep(_Strict):
    """Median filter with an odd square kernel."""

    op: Literal[StepOp.MEDIAN]
    ksize: int = Field(default=3, ge=3)

    @field_validator("ksize")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("ksize must be odd")
        return v


class GaussianStep(_Strict):
    """Gaussian filter; ``ksize`` 0 derives the kernel size from sigma."""

    op: Literal[StepOp.GAUSSIAN]
    sigma: float = Field(gt=0)
    ksize: int = Field(default=0, ge=0)

    @field_validator("ksize")
    @classmethod
    def _odd_or_zero(cls, v: int) -> int:
        if v != 0 and v % 2 == 0:
            raise ValueError("ksize must be odd (or 0 to derive it from sigma)")
        return v


class ResizeStep(_Strict):
    """Resize to (height, width), ignoring the aspect ratio."""

    op: Literal[StepOp.RESIZE]
    size: Size
    interpolation: Interpolation = "area"


class LetterboxStep(_Strict):
    """Resize keeping the aspect ratio, then pad to (height, width)."""

    op: Literal[StepOp.LETTERBOX]
    size: Size
    pad_value: float = 0.0
    interpolation: Interpolation = "area"
    align: Literal["center", "top_left"] = "center"


class NormalizeStep(_Strict):
    """``(x / max_pixel_value - mean[c]) / std[c]`` per channel (one value broadcasts)."""

    op: Literal[StepOp.NORMALIZE]
    mean: list[float] = Field(min_length=1)
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)
    max_pixel_value: float = Field(default=255.0, gt=0)

    @model_validator(mode="after")
    def _same_length(self) -> NormalizeStep:
        if len(self.mean) != len(self.std):
            raise FieldProblem("std", f"needs as many values as mean ({len(self.mean)})", self.std)
        return self


class ReplicateChannelsStep(_Strict):
    """Replicate a single-channel image into ``channels`` channels."""

    op: Literal[StepOp.REPLICATE_CHANNELS]
    channels: int = Field(default=3, ge=2)


# Colour ops (issue 20): they work on (H, W, 3) RGB images holding 0..255 (decode.py converts
# YBR and PALETTE COLOR to RGB). Conventions agreed with the phantom/model work: fundus (OP),
# dermoscopy (XC/DMS) and blood-smear microscopy (SM/GM) manifests take input [null, 3, H, W]
# NCHW float32 and use these ops with resize and a per-channel normalize (3 means, 3 stds).


# Choices made beyond the agreed names and defaults: circular_crop's ``margin`` is a fraction of
# the disc's diameter added on each side; a disc cut off by one edge of the frame is placed flush
# with the field of view's other end; illumination_correction's sigma is ``sigma_fraction`` x the
# image's shorter side (after circular_crop: the disc's diameter).


class CircularCropStep(_Strict):
    """Crop to the fundus field-of-view disc: pixels whose luminance (ITU-R BT.601) exceeds
    ``threshold`` x the image's maximum luminance form the disc; the crop is the square around its
    bounding box (side = the larger extent, the diameter, x (1 + 2 ``margin``); centred, except
    that a disc cut off by one image edge sits flush with the box's other end), padded with 0
    where it leaves the image, and every pixel outside the inscribed circle is set to 0. The crop
    is an offset in the geometry, so heatmaps land where the model looked."""

    op: Literal[StepOp.CIRCULAR_CROP]
    threshold: float = Field(default=0.04, ge=0, lt=1)
    margin: float = Field(default=0.0, ge=0, le=1)


class ClaheLuminanceStep(_Strict):
    """CLAHE (OpenCV) on the L channel of CIE Lab (OpenCV's 8-bit Lab), colour kept."""

    op: Literal[StepOp.CLAHE_LUMINANCE]
    clip_limit: float = Field(default=2.0, gt=0)
    tile_grid: int = Field(default=8, ge=1, le=64)


class IlluminationCorrectionStep(_Strict):
    """Graham's background subtraction per channel: ``4 * (I - G) + 128`` clipped to 0..255, G the
    image blurred by a Gaussian of sigma ``sigma_fraction`` x the image's shorter side."""

    op: Literal[StepOp.ILLUMINATION_CORRECTION]
    sigma_fraction: float = Field(default=0.1, gt=0, le=1)


Step = Annotated[
    ModalityLutStep
    | WindowStep
    | InvertMonochrome1Step
    | To8BitStep
    | ClaheStep
    | MedianStep
    | GaussianStep
    | ResizeStep
    | LetterboxStep
    | NormalizeStep
    | ReplicateChannelsStep
    | CircularCropStep
    | ClaheLuminanceStep
    | IlluminationCorrectionStep,
    Field(discriminator="op"),
]


# --------------------------------------------------------------------------------------------
# Outputs, labels, heatmap, aggregation, routing


class Outputs(_Strict):
    """Output names: probabilities (N, n_outputs) and an optional CAM (N, n_outputs, h, w)."""

    probabilities: str = Field(min_length=1)
    activation: Literal["none", "sigmoid", "softmax"] = Field(
        description="'none' when the graph already applies it"
    )
    cam: str | None = None


class LabelCode(_Strict):
    """The coded concept reported for a label."""

    value: str = Field(min_length=1)
    scheme_designator: Literal["SCT", "DCM", "RADLEX", "99PACSNODE"]
    meaning: str = Field(min_length=1)


class Label(_Strict):
    """One finding the model reports (a segmentation model: one class of pixels, one segment).

    For a segmentation model ``code`` is the segment's property type, ``category`` its property
    category (e.g. (49755003, SCT, "Morphologically abnormal structure")), ``index`` the channel
    of the per-pixel output and ``threshold`` the per-pixel probability a pixel needs."""

    name: str = Field(min_length=1)
    index: int = Field(ge=0, description="index in the probabilities output")
    code: LabelCode
    category: LabelCode | None = None
    threshold: float = Field(ge=0, le=1)
    triage: StrictBool = False
    normal: StrictBool = False


class CamHeatmap(_Strict):
    """The graph outputs class activation maps."""

    method: Literal["cam"]
    normalize: Literal["relu_max", "minmax"] = "relu_max"


class PatchHeatmap(_Strict):
    """Run the (patch) classifier over tiles of the full image and stitch the scores."""

    method: Literal["patch"]
    patch_size: Size
    stride: Size
    batch_size: int = Field(default=32, ge=1)


class OcclusionHeatmap(_Strict):
    """Slide a mean-valued window over the input; the map is the drop in score."""

    method: Literal["occlusion"]
    window: Size
    stride: Size
    batch_size: int = Field(default=32, ge=1)


class NoHeatmap(_Strict):
    """No heatmap."""

    method: Literal["none"]


HeatmapSpec = Annotated[
    CamHeatmap | PatchHeatmap | OcclusionHeatmap | NoHeatmap, Field(discriminator="method")
]


class Aggregation(_Strict):
    """How image scores become a series/study score, and how many top slices to display."""

    level: Literal["image", "series", "study"] = "image"
    method: Literal["max", "mean", "top_k_mean"] = "max"
    k: int | None = Field(default=None, ge=1)
    keep_top_slices: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _k_for_top_k(self) -> Aggregation:
        if self.method == "top_k_mean" and self.k is None:
            raise FieldProblem("k", "required when method is 'top_k_mean'")
        return self


Size3 = tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]

#: SegmentationSpec fields that only a 3-D (``dimensions: 3``) model has
_SEG_3D_ONLY = ("roi_size", "overlap", "blend", "min_volume_voxels")


class SegmentationSpec(_Strict):
    """How a segmentation model's per-pixel output becomes masks (``kind: segmentation``).

    ``dimensions: 2`` (default): the output named ``outputs.probabilities`` is (N, C, h, w)
    per-pixel class scores over the 2-D model input (one slice or frame at a time; the node runs
    the frames of a series in batches of ``batch_size``).

    ``dimensions: 3``: the input is ``NCDHW``; each slice of the series is prepared by
    ``preprocessing`` (2-D, as above), the slices are stacked in slice order into a (C, D, H, W)
    volume and the output (N, C, d, h, w) is computed by sliding-window inference with MONAI's
    ``sliding_window_inference`` semantics: windows of ``roi_size`` (d, h, w) (the volume padded to
    at least that), ``overlap`` between neighbours, ``batch_size`` windows per call (MONAI's
    ``sw_batch_size``), window outputs blended with a ``gaussian`` (sigma_scale 0.125) or
    ``constant`` importance map. ``roi_size`` is required when a spatial input dim is null,
    otherwise it defaults to (and must equal) the input's fixed dims.

    ``background_index`` given (softmax models): a pixel belongs to the label whose channel wins the
    argmax, when its probability also reaches the label's threshold. Not given (sigmoid models):
    a pixel belongs to every label whose probability reaches its threshold. Then small components
    are removed: 2-D, 8-connected components smaller than ``min_area_px`` model-input pixels, slice
    by slice; 3-D, 26-connected components smaller than ``min_volume_voxels`` model-input voxels
    (in-plane pixels of the model input times slices). Both are converted to source pixels through
    the preprocessing geometry, so the size limit is the same whatever the source resolution.

    ``output: binary`` (default) writes a BINARY DICOM SEG; ``fractional`` a FRACTIONAL one of type
    PROBABILITY carrying each kept pixel's probability (0 outside the kept mask).
    """

    dimensions: Literal[2, 3] = Field(
        default=2, description="2: per slice/frame; 3: sliding-window inference over the series' volume"
    )
    background_index: int | None = Field(default=None, ge=0)
    min_area_px: int = Field(
        default=0, ge=0, description="2-D: smallest kept 8-connected component, in model-input pixels"
    )
    min_volume_voxels: int = Field(
        default=0, ge=0, description="3-D: smallest kept 26-connected component, in model-input voxels"
    )
    batch_size: int = Field(
        default=16, ge=1, description="slices/frames (2-D) or windows (3-D, sw_batch_size) per inference call"
    )
    roi_size: Size3 | None = Field(default=None, description="3-D: the sliding window (d, h, w)")
    overlap: float = Field(default=0.25, ge=0, lt=1, description="3-D: overlap of neighbouring windows")
    blend: Literal["gaussian", "constant"] = Field(
        default="gaussian", description="3-D: importance map blending overlapping windows"
    )
    output: Literal["binary", "fractional"] = Field(
        default="binary", description="the DICOM SEG type (fractional: PROBABILITY)"
    )
    series_description: str = Field(default="AI segmentation", min_length=1, max_length=40)
    anatomic_region: LabelCode | None = Field(
        default=None, description="where the segments are, e.g. (10200004, SCT, Liver)"
    )

    @model_validator(mode="after")
    def _dimension_fields(self) -> SegmentationSpec:
        if self.dimensions == 2:
            for name in _SEG_3D_ONLY:
                if name in self.model_fields_set:
                    raise FieldProblem(
                        name, "only a 3-D model (dimensions: 3) has this field", getattr(self, name)
                    )
        elif self.min_area_px:
            raise FieldProblem(
                "min_area_px", "a 3-D model removes small components by min_volume_voxels", self.min_area_px
            )
        return self


class Routing(_Strict):
    """Hints for the router: which series the model is meant for."""

    modalities: list[str] = Field(default_factory=list)
    body_parts: list[str] = Field(default_factory=list)

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [s.strip().upper() for s in v]


class ScoreReference(_Strict):
    """One label's score distribution on the validation data (``pacs-node evaluate
    --write-reference``): 101 quantiles (0, 1, ..., 100 %) for the Kolmogorov-Smirnov test and
    a histogram for the population stability index (PSI), both against the live scores."""

    quantiles: list[float] = Field(min_length=2, description="ascending, 0 % to 100 %")
    edges: list[float] = Field(min_length=2, description="histogram bin edges, ascending")
    counts: list[int] = Field(min_length=1, description="validation cases per bin")
    positive_rate: float = Field(ge=0, le=1, description="share of validation cases above threshold")

    @model_validator(mode="after")
    def _shapes(self) -> ScoreReference:
        if len(self.counts) != len(self.edges) - 1:
            raise FieldProblem("counts", f"needs {len(self.edges) - 1} values, one per bin", len(self.counts))
        if any(b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)):
            raise FieldProblem("quantiles", "must be ascending")
        return self


class Reference(_Strict):
    """What the model's validation data looked like, for live drift monitoring (issue 18):
    scores per label and the input statistics' quantiles (rows, columns, pixel_spacing_mm, p1,
    p50, p99 of the stored values) and manufacturer mix. Written by ``pacs-node evaluate
    --write-reference``; a manifest without it loads (drift is then not computed)."""

    data: str = Field(min_length=1, description="the evaluation data it was measured on")
    created: dt.date
    cases: int = Field(ge=1)
    scores: dict[str, ScoreReference] = Field(default_factory=dict)
    inputs: dict[str, list[float]] = Field(default_factory=dict, description="statistic -> 101 quantiles")
    manufacturers: dict[str, int] = Field(default_factory=dict, description="cases per manufacturer")


class RuntimeSpec(_Strict):
    """How the node may run the model on a GPU (issue 16). Absent, or every field false, is the
    default path: the ONNX graph as shipped, FP32, no CUDA graph. Each option applies only when
    CUDA is the active execution provider; on the CPU provider it is ignored (logged once)."""

    cuda_graph: StrictBool = Field(
        default=False,
        description="capture the model in a CUDA graph and replay it (less launch overhead); used only"
        " when the graph's input shape is fully static (a fixed batch size and fixed image dims) and"
        " ONNX Runtime places every node on CUDA, otherwise the node runs without one and logs why",
    )
    fp16: StrictBool = Field(
        default=False,
        description="convert the FP32 model to FP16 (inputs and outputs stay float32) when the session"
        " is created; kept only if its probabilities match the FP32 model's within fp16_tolerance on a"
        " fixed-seed check batch, else the node keeps FP32 and warns with the difference",
    )
    fp16_tolerance: float = Field(
        default=1e-2,
        gt=0,
        le=1,
        description="largest absolute difference of the probabilities (after the manifest's"
        " activation) between FP16 and FP32 on the check batch that still allows FP16",
    )


class Manifest(_Strict):
    """Everything the node needs to know about one model."""

    manifest_version: Literal[1] = 1
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    description: str = Field(min_length=1)
    research_use_only: StrictBool = True
    intended_use: str = Field(min_length=1)
    provenance: Provenance
    model: ModelFile
    input: InputSpec
    preprocessing: list[Step] = Field(default_factory=list)
    #: decode JPEG 2000 / HTJ2K frames at a reduced resolution when the preprocessing area-reduces
    #: them by 2 or more before the model (node/inference/reduce.py ``decode_reduction``); the
    #: model input then differs from the full decode's within a small tolerance (docs/byom.md)
    decode_reduced: StrictBool = False
    outputs: Outputs
    kind: Literal["multi_label", "multi_class", "segmentation"]
    labels: list[Label] = Field(min_length=1)
    heatmap: HeatmapSpec = NoHeatmap(method="none")
    aggregation: Aggregation = Aggregation()
    routing: Routing = Routing()
    segmentation: SegmentationSpec | None = None
    #: shadow: routed and analysed on live traffic and recorded for monitoring, nothing sent
    mode: Literal["active", "shadow"] = "active"
    reference: Reference | None = None
    #: GPU options (CUDA graph, FP16); None: the default path (RuntimeSpec)
    runtime: RuntimeSpec | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        seen_names: dict[str, int] = {}
        seen_index: dict[int, int] = {}
        for i, label in enumerate(self.labels):
            if label.name in seen_names:
                raise FieldProblem(
                    f"labels.{i}.name", f"duplicate of labels.{seen_names[label.name]}", label.name
                )
            if label.index in seen_index:
                raise FieldProblem(
                    f"labels.{i}.index", f"duplicate of labels.{seen_index[label.index]}", label.index
                )
            seen_names[label.name] = i
            seen_index[label.index] = i
        normals = [i for i, label in enumerate(self.labels) if label.normal]
        self._channel_checks()
        if self.input.layout == "NCDHW":
            if self.kind == "segmentation":
                if self.segmentation is None or self.segmentation.dimensions != 3:
                    raise FieldProblem(
                        "input.layout",
                        "NCDHW is for 3-D segmentation models (segmentation.dimensions: 3)"
                        " or volume classifiers",
                        "NCDHW",
                    )
            else:
                self._volume_classifier_checks()
        if self.kind == "segmentation":
            self._segmentation_checks(normals)
        elif self.segmentation is not None:
            raise FieldProblem("segmentation", "only a segmentation model has this section", self.kind)
        elif self.kind == "multi_class":
            if self.outputs.activation == "sigmoid":
                raise FieldProblem(
                    "outputs.activation", "a multi_class model uses softmax (or none)", "sigmoid"
                )
            if len(normals) != 1:
                raise FieldProblem(
                    "labels", f"a multi_class model needs exactly one normal label (found {len(normals)})"
                )
            if len(self.labels) < 2:
                raise FieldProblem("labels", "a multi_class model needs at least two labels")
            if self.labels[normals[0]].triage:
                raise FieldProblem(
                    f"labels.{normals[0]}.triage", "the normal class cannot raise triage", True
                )
        else:
            if self.outputs.activation == "softmax":
                raise FieldProblem(
                    "outputs.activation", "a multi_label model uses sigmoid (or none)", "softmax"
                )
            if normals:
                raise FieldProblem(
                    f"labels.{normals[0]}.normal", "only a multi_class model has a normal label", True
                )
        if isinstance(self.heatmap, CamHeatmap) and self.outputs.cam is None:
            raise FieldProblem("outputs.cam", "required when heatmap.method is 'cam'")
        if isinstance(self.heatmap, PatchHeatmap):
            h, w = self.input.spatial
            ph, pw = self.heatmap.patch_size
            if (h is not None and h != ph) or (w is not None and w != pw):
                raise FieldProblem(
                    "heatmap.patch_size", f"must equal the input's spatial size ({h}, {w})", [ph, pw]
                )
        return self

    def _channel_checks(self) -> None:
        """Greyscale and colour steps do not mix: the steps are followed from the first, the image
        being greyscale after a greyscale op (RGB after ``replicate_channels`` or ``to_8bit``
        ``mix``) and RGB after a colour op; a colour op needs a 3-channel input, and a
        ``normalize`` gives 1 value or one per input channel."""
        channels = self.input.channels
        state: str | None = None  # None: either (not known yet), "grey", "colour"
        where = ""
        for i, step in enumerate(self.preprocessing):
            op = step.op
            if op in COLOUR_OPS:
                if channels != 3:
                    raise FieldProblem(
                        f"preprocessing.{i}.op",
                        f"{op} works on RGB images; the model input has {channels} channel(s)"
                        " (input.shape needs 3 channels)",
                        op,
                    )
                if state == "grey":
                    raise FieldProblem(
                        f"preprocessing.{i}.op",
                        f"{op} works on RGB images; {where} reads greyscale values",
                        op,
                    )
                state, where = "colour", f"preprocessing.{i} ({op})"
            elif op in GREY_OPS:
                if state == "colour":
                    raise FieldProblem(
                        f"preprocessing.{i}.op",
                        f"{op} works on greyscale images; {where} works on RGB",
                        op,
                    )
                state, where = "grey", f"preprocessing.{i} ({op})"
                if isinstance(step, ReplicateChannelsStep) or (
                    isinstance(step, To8BitStep) and step.method == "mix"
                ):
                    state = "replicated"  # RGB from grey: neither a grey nor a colour op follows
            elif isinstance(step, NormalizeStep) and len(step.mean) not in (1, channels):
                raise FieldProblem(
                    f"preprocessing.{i}.mean",
                    f"needs 1 value or one per input channel ({channels})",
                    step.mean,
                )

    def _segmentation_checks(self, normals: list[int]) -> None:
        """The cross-field rules of ``kind: segmentation`` (see :class:`SegmentationSpec`)."""
        spec = self.segmentation
        if spec is None:
            raise FieldProblem("segmentation", "required when kind is 'segmentation'")
        if normals:
            raise FieldProblem(
                f"labels.{normals[0]}.normal",
                "a segmentation model has no normal label (background is segmentation.background_index)",
                True,
            )
        for i, label in enumerate(self.labels):
            if label.category is None:
                raise FieldProblem(
                    f"labels.{i}.category", "required for a segmentation model (segment property category)"
                )
            if spec.background_index is not None and label.index == spec.background_index:
                raise FieldProblem(f"labels.{i}.index", "is segmentation.background_index", label.index)
        if self.outputs.activation == "softmax" and spec.background_index is None:
            raise FieldProblem(
                "segmentation.background_index", "required when outputs.activation is 'softmax' (argmax)"
            )
        if self.outputs.activation == "sigmoid" and spec.background_index is not None:
            raise FieldProblem(
                "segmentation.background_index",
                "a sigmoid model thresholds each channel; it has no background channel",
                spec.background_index,
            )
        if self.outputs.cam is not None:
            raise FieldProblem("outputs.cam", "a segmentation model has no CAM output", self.outputs.cam)
        if not isinstance(self.heatmap, NoHeatmap):
            raise FieldProblem(
                "heatmap.method", "a segmentation model shows its masks; use 'none'", self.heatmap.method
            )
        if self.aggregation.level == "study":
            raise FieldProblem("aggregation.level", "a segmentation model works per image or series", "study")
        if spec.dimensions == 3:
            if self.input.layout != "NCDHW":
                raise FieldProblem(
                    "input.layout", "a 3-D segmentation model (dimensions: 3) takes NCDHW", self.input.layout
                )
            fixed = self.input.spatial3d
            if spec.roi_size is None:
                if any(d is None for d in fixed):
                    raise FieldProblem(
                        "segmentation.roi_size",
                        "required when a spatial input dimension is null",
                        self.input.shape,
                    )
            else:
                for axis, (roi, dim) in enumerate(zip(spec.roi_size, fixed, strict=True)):
                    if dim is not None and roi != dim:
                        raise FieldProblem(
                            f"segmentation.roi_size.{axis}",
                            f"must equal the input's fixed dimension input.shape.{axis + 2} ({dim})",
                            roi,
                        )

    def _volume_classifier_checks(self) -> None:
        """A classifier with an ``NCDHW`` input sees the whole series as one volume: its slices
        prepared by the 2-D steps, stacked in spatial order, resampled along the slice axis to the
        input's depth (when fixed), and classified once."""
        if self.aggregation.level != "series":
            raise FieldProblem(
                "aggregation.level",
                "a volume classifier (NCDHW input) classifies a series",
                self.aggregation.level,
            )
        if not isinstance(self.heatmap, NoHeatmap):
            raise FieldProblem(
                "heatmap.method", "a volume classifier has no heatmap yet; use 'none'", self.heatmap.method
            )
        if self.outputs.cam is not None:
            raise FieldProblem("outputs.cam", "a volume classifier has no CAM output yet", self.outputs.cam)

    @property
    def roi_size(self) -> tuple[int, int, int] | None:
        """A 3-D segmentation model's sliding window (d, h, w): ``segmentation.roi_size`` or the
        input's fixed dims; None for any other model."""
        spec = self.segmentation
        if spec is None or spec.dimensions != 3:
            return None
        if spec.roi_size is not None:
            return tuple(spec.roi_size)  # type: ignore[return-value]
        return tuple(int(d) for d in self.input.spatial3d)  # type: ignore[arg-type, return-value]

    @property
    def n_outputs(self) -> int:
        """Width of the probabilities output the labels need (highest index + 1; a segmentation
        model's background channel counts)."""
        top = max(label.index for label in self.labels)
        if self.segmentation is not None and self.segmentation.background_index is not None:
            top = max(top, self.segmentation.background_index)
        return top + 1


# --------------------------------------------------------------------------------------------
# Loading and error formatting


def _loc_text(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _found_text(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message (found value)``."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        msg = str(err.get("msg", ""))
        found: Any = err.get("input", _MISSING)
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, FieldProblem):
            loc = loc + tuple(ctx_error.field.split("."))
            msg = ctx_error.message
            found = ctx_error.found
        elif err.get("type") == "missing":
            found = _MISSING
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        field = _loc_text(loc) or "(top level)"
        suffix = "" if found is _MISSING else f" (found {_found_text(found)})"
        lines.append(f"{source}: {field}: {msg}{suffix}")
    return "\n".join(lines)


def parse_manifest(data: Mapping[str, Any] | Any, source: str = "manifest") -> Manifest:
    """Validate already-parsed manifest data; raise ManifestError naming ``source`` and the field."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"{source}: (top level): expected a mapping (found {type(data).__name__})")
    try:
        return Manifest.model_validate(dict(data))
    except ValidationError as exc:
        raise ManifestError(format_validation_error(exc, source)) from exc


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a ``manifest.yaml``; raise ManifestError naming the file and the field."""
    path = Path(path)
    return parse_manifest(read_yaml(path, "manifest", ManifestError), str(path))
