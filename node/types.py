"""Values passed between the node's stages: frozen dataclasses, no behaviour beyond small helpers;
and what a job records in the database (its result and timings): pydantic models, read with
``JobResult.model_validate_json`` and written with ``model_dump_json``.

Coordinates: images are indexed (row, col) with pixel centres at integer positions, as numpy
indexes them. Boxes are (row_min, col_min, row_max, col_max), inclusive, in source-image pixels.
Polygons are lists of (row, col). (DICOM SR SCOORD wants (column, row): swap when writing.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, RootModel, SerializerFunctionWrapHandler, model_serializer
from pydantic import Field as PydanticField

#: VOI LUT Function values the node applies (PS3.3 C.11.2.1.3); absent means LINEAR.
VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class LookupTable:
    """The first item of a Modality LUT Sequence or VOI LUT Sequence (PS3.3 C.11.1, C.11.2).

    ``first_mapped`` and ``bits`` are the second and third values of LUT Descriptor; ``data`` holds
    exactly the number of entries the descriptor gives (0 there means 65536), as native-endian
    uint16 bytes (bytes keep the header hashable and light).
    """

    first_mapped: int
    bits: int
    data: bytes

    @property
    def entries(self) -> int:
        """Number of entries in the table."""
        return len(self.data) // 2

    def table(self) -> np.ndarray:
        """The entries as a read-only uint16 array."""
        return np.frombuffer(self.data, dtype=np.uint16)


@dataclass(frozen=True)
class FrameValues:
    """Values one frame of an enhanced multi-frame image has in its Per-Frame Functional Groups.

    None (or an empty tuple) means the frame's item does not give the value: the header's value
    (Shared Functional Groups, else top level) applies.
    """

    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    window_centers: tuple[float, ...] = ()
    window_widths: tuple[float, ...] = ()
    voi_lut_function: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    image_position_patient: tuple[float, float, float] | None = None
    image_orientation_patient: tuple[float, float, float, float, float, float] | None = None


def first_window(
    centers: tuple[float, ...], widths: tuple[float, ...], function: str
) -> tuple[float | None, float | None]:
    """The first (center, width) pair, width None when it is not valid for ``function``
    (LINEAR needs width >= 1, LINEAR_EXACT and SIGMOID width > 0)."""
    if not centers or not widths:
        return None, None
    center, width = centers[0], widths[0]
    valid = width >= 1 if function not in ("LINEAR_EXACT", "SIGMOID") else width > 0
    return center, width if valid else None


@dataclass(frozen=True)
class ImageHeader:
    """The header values of one image instance that decoding, preprocessing and outputs need."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    rows: int
    cols: int
    number_of_frames: int
    samples_per_pixel: int
    #: The photometric interpretation of the decoded pixels (YBR is converted to RGB when decoding,
    #: PALETTE COLOR is expanded to RGB).
    photometric_interpretation: str
    #: The photometric interpretation as stored in the dataset.
    stored_photometric_interpretation: str
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    #: First value when the header holds several; width None when not valid for the VOI LUT
    #: Function (see ``first_window``).
    window_center: float | None = None
    window_width: float | None = None
    #: (row spacing, column spacing) in mm; PixelSpacing, else ImagerPixelSpacing.
    pixel_spacing: tuple[float, float] | None = None
    image_position_patient: tuple[float, float, float] | None = None
    image_orientation_patient: tuple[float, float, float, float, float, float] | None = None
    instance_number: int | None = None
    slice_location: float | None = None
    body_part_examined: str | None = None
    #: Every WindowCenter / WindowWidth value, as found (widths not validated).
    window_centers: tuple[float, ...] = ()
    window_widths: tuple[float, ...] = ()
    #: VOILUTFunction as found (upper case); "LINEAR" when absent.
    voi_lut_function: str = "LINEAR"
    #: Modality LUT Sequence (replaces rescale when present) and VOI LUT Sequence (preferred over
    #: the window when both are present, as pydicom's apply_voi_lut does).
    modality_lut: LookupTable | None = None
    voi_lut: LookupTable | None = None
    #: Per-frame functional group values, one per frame; empty when the dataset has none.
    frame_values: tuple[FrameValues, ...] = ()
    #: 1-based frame number when this header describes one frame of a multi-frame image
    #: (``for_frame``), else None.
    frame_number: int | None = None

    @property
    def is_multiframe(self) -> bool:
        """True for an image with more than one frame."""
        return self.number_of_frames > 1

    def for_frame(self, index: int) -> ImageHeader:
        """The header of frame ``index`` (0-based): per-frame functional group values over the
        shared/top-level ones, ``frame_number`` set for a multi-frame image, ``frame_values`` dropped."""
        if not 0 <= index < self.number_of_frames:
            raise IndexError(f"frame index {index} outside 0..{self.number_of_frames - 1}")
        number = index + 1 if self.is_multiframe else None
        if not self.frame_values:
            return replace(self, frame_number=number)
        fv = self.frame_values[index] if index < len(self.frame_values) else FrameValues()
        function = fv.voi_lut_function or self.voi_lut_function
        centers, widths = self.window_centers, self.window_widths
        if fv.window_centers and fv.window_widths:
            centers, widths = fv.window_centers, fv.window_widths
        center, width = first_window(centers, widths, function)
        if fv.rescale_slope is not None:  # the item holds both (Type 1 in Pixel Value Transformation)
            slope, intercept = fv.rescale_slope, fv.rescale_intercept or 0.0
        else:
            slope, intercept = self.rescale_slope, self.rescale_intercept
        return replace(
            self,
            rescale_slope=slope,
            rescale_intercept=intercept,
            window_centers=centers,
            window_widths=widths,
            window_center=center,
            window_width=width,
            voi_lut_function=function,
            pixel_spacing=fv.pixel_spacing or self.pixel_spacing,
            image_position_patient=fv.image_position_patient or self.image_position_patient,
            image_orientation_patient=fv.image_orientation_patient or self.image_orientation_patient,
            frame_values=(),
            frame_number=number,
        )

    @property
    def is_signed(self) -> bool:
        """True when stored values are two's complement."""
        return self.pixel_representation == 1

    @property
    def stored_value_range(self) -> tuple[float, float]:
        """The range representable with BitsStored and PixelRepresentation."""
        if self.is_signed:
            return float(-(2 ** (self.bits_stored - 1))), float(2 ** (self.bits_stored - 1) - 1)
        return 0.0, float(2**self.bits_stored - 1)


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """Stored pixel values of one instance, native byte order.

    ``pixels`` always has a leading frame axis: (frames, rows, cols) for one sample per pixel,
    (frames, rows, cols, samples) for colour.
    """

    header: ImageHeader
    pixels: np.ndarray

    @property
    def frame_count(self) -> int:
        """Number of frames held in ``pixels``."""
        return int(self.pixels.shape[0])

    def frame(self, index: int = 0) -> np.ndarray:
        """One frame: (rows, cols) or (rows, cols, samples)."""
        frame: np.ndarray = self.pixels[index]
        return frame


@dataclass(frozen=True)
class Geometry:
    """Maps source-image pixels to model-input pixels and back (per-axis affine).

    In continuous edge coordinates (a pixel ``i`` spans ``[i, i + 1)``):
    ``model = source * scale + offset`` on each axis. ``offset`` is the letterbox padding (or a
    negative crop). ``to_source``/``to_model`` work on pixel-centre indices.
    """

    source_shape: tuple[int, int]
    model_shape: tuple[int, int]
    scale_y: float = 1.0
    scale_x: float = 1.0
    offset_y: float = 0.0
    offset_x: float = 0.0

    @staticmethod
    def identity(shape: tuple[int, int]) -> Geometry:
        """The geometry of an image that was not resized."""
        return Geometry(source_shape=shape, model_shape=shape)

    def then(
        self, scale_y: float, scale_x: float, offset_y: float, offset_x: float, model_shape: tuple[int, int]
    ) -> Geometry:
        """Compose with a further resize/pad step (``new = old * scale + offset``)."""
        return Geometry(
            source_shape=self.source_shape,
            model_shape=model_shape,
            scale_y=self.scale_y * scale_y,
            scale_x=self.scale_x * scale_x,
            offset_y=self.offset_y * scale_y + offset_y,
            offset_x=self.offset_x * scale_x + offset_x,
        )

    def to_source(self, row: float, col: float) -> tuple[float, float]:
        """Model-input pixel (row, col) to source pixel (row, col), pixel centres."""
        return (
            (row + 0.5 - self.offset_y) / self.scale_y - 0.5,
            (col + 0.5 - self.offset_x) / self.scale_x - 0.5,
        )

    def to_model(self, row: float, col: float) -> tuple[float, float]:
        """Source pixel (row, col) to model-input pixel (row, col), pixel centres."""
        return (
            (row + 0.5) * self.scale_y + self.offset_y - 0.5,
            (col + 0.5) * self.scale_x + self.offset_x - 0.5,
        )


@dataclass(frozen=True, eq=False)
class ModelInput:
    """A model-ready tensor (float32/float16/uint8, layout as the manifest says) and its geometry."""

    tensor: np.ndarray
    geometry: Geometry
    layout: str = "NCHW"


@dataclass(frozen=True)
class Code:
    """A coded concept: value, coding scheme designator (SCT, DCM, RADLEX, 99PACSNODE), meaning."""

    value: str
    scheme_designator: str
    meaning: str


@dataclass(frozen=True)
class Hotspot:
    """The peak of a heatmap and the region around it, in source-image pixels."""

    peak_row: int
    peak_col: int
    peak_value: float
    box: tuple[int, int, int, int]
    polygon: tuple[tuple[float, float], ...] = field(default_factory=tuple)


@dataclass(frozen=True, eq=False)
class Heatmap:
    """A per-label map in source-image pixels, values 0..1, and its hotspot."""

    label: str
    values: np.ndarray
    method: str
    hotspot: Hotspot | None = None


@dataclass(frozen=True)
class LabelScore:
    """One label's probability for an image (or aggregated over a series/study)."""

    label: str
    code: Code
    probability: float
    threshold: float
    positive: bool
    triage: bool
    #: The "no finding" class of a multi-class model: reported Present/Absent like the others, but
    #: never listed as a finding (nor triage).
    normal: bool = False


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The model behind a result, as the outputs describe it (SR TID 4019, Contributing Equipment)."""

    model_id: str
    name: str
    version: str
    sha256: str  # of the ONNX file: the algorithm's device UID is derived from it
    manufacturer: str = "pacs-node"
    research_use_only: bool = True
    parameters: str = ""  # short text, e.g. "thresholds tuberculosis=0.5 pneumonia=0.5"


@dataclass(frozen=True)
class OutputIdentity:
    """Who writes the outputs: the node as device observer, and how its UIDs are made."""

    uid_root: str  # organisation root ending with ".", e.g. "1.2.826.0.1.3680043.8.498."
    device_name: str  # the node's AE title
    device_uid: str  # stable UID of this node (derived from uid_root and the AE title)
    manufacturer: str = "pacs-node"
    software_version: str = "0"
    institution_name: str = ""


@dataclass(frozen=True, eq=False)
class ImageResult:
    """One analysed source image: its scores, heatmaps and the windowed image to draw them on."""

    sop_instance_uid: str
    sop_class_uid: str
    scores: tuple[LabelScore, ...]
    heatmaps: tuple[Heatmap, ...]  # values (rows, cols) in source-image pixels, 0..1
    display: np.ndarray | None = None  # uint8 (rows, cols): the source image windowed for display
    frame: int | None = None  # 1-based frame number in a multi-frame source, None for single-frame


@dataclass(frozen=True, eq=False)
class AnalysisResult:
    """What one model concluded about one series or study: the input of every output writer.

    ``findings`` are aggregated at ``level``; ``images`` are the images to show and to place image
    regions on (every analysed image for CR/DX/MG, the top-k slices for CT/MR). ``uid_seed`` makes
    every output UID deterministic, so a retried job re-sends the same SOP Instance UIDs.
    """

    algorithm: AlgorithmIdentity
    study_uid: str
    series_uids: tuple[str, ...]
    level: str  # "image" | "series" | "study"
    findings: tuple[LabelScore, ...]
    images: tuple[ImageResult, ...]
    uid_seed: str
    #: Frames the model scored: one per single-frame instance, every frame of a multi-frame one.
    frames_analysed: int = 0
    #: A segmentation model's masks (``kind: segmentation``); None for classifiers.
    segmentation: SegmentationResult | None = None


@dataclass(frozen=True, eq=False)
class SegmentFrame:
    """One analysed frame of a segmentation result: the source frame and its masks.

    ``masks`` is (segments, rows, cols) bool in source pixels, segment order as in
    :attr:`SegmentationResult.segments`; None when no segment has a pixel on this frame (most
    frames of a CT series: empty frames cost nothing). ``probabilities`` (same shape, float32,
    0 outside the mask) is the per-pixel probability of the kept pixels, for a FRACTIONAL SEG."""

    sop_instance_uid: str
    sop_class_uid: str
    frame: int | None  # 1-based frame number in a multi-frame source, None for single-frame
    rows: int
    cols: int
    masks: np.ndarray | None = None
    probabilities: np.ndarray | None = None


@dataclass(frozen=True)
class SegmentSummary:
    """One segment (one class of pixels) of a segmentation result and its measurements.

    ``area_mm2`` is the largest cross-section (one frame), from Pixel Spacing; ``volume_mm3`` the
    sum over frames of area times the spacing between slices. Either is None when the geometry
    does not allow it (no valid Pixel Spacing, a single frame, irregular slice positions)."""

    number: int  # 1-based segment number, manifest label order
    label: str
    code: Code  # segmented property type
    category: Code  # segmented property category
    pixels: int
    frames_with_pixels: int
    area_mm2: float | None = None
    volume_mm3: float | None = None

    @property
    def present(self) -> bool:
        """True when any pixel of the segment remains after post-processing."""
        return self.pixels > 0


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """The masks of a segmentation model over every analysed frame (spatial order)."""

    segments: tuple[SegmentSummary, ...]
    frames: tuple[SegmentFrame, ...]
    series_description: str = "AI segmentation"
    anatomic_region: Code | None = None
    #: The SEG type: False BINARY, True FRACTIONAL (PROBABILITY, from the frames' probabilities).
    fractional: bool = False
    #: Why a measurement is missing (e.g. no valid Pixel Spacing); no patient data.
    notes: tuple[str, ...] = ()

    @property
    def present(self) -> tuple[SegmentSummary, ...]:
        """The segments that have pixels."""
        return tuple(s for s in self.segments if s.present)


# --------------------------------------------------------------------------- job results (stored)
class OutputKind(StrEnum):
    """The kind of an output a job writes (``OutboxItem.kind``, file name prefix in the outbox)."""

    SR = "sr"
    SC = "sc"
    PM = "pm"
    GSPS = "gsps"
    KOS = "kos"
    SEG = "seg"
    HL7 = "hl7"  # an HL7 v2 ORU message
    FHIR = "fhir"  # a FHIR Bundle


class _Stored(BaseModel):
    """A part of a stored job result. Unknown keys are kept; a field left unset whose value is
    None is not written (nor, in ``_omit_none``, one set to None), so a field added later with a
    None default leaves the JSON of the results that lack it as it was."""

    model_config = ConfigDict(extra="allow")
    _omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in type(self).model_fields:
            if data.get(name, 0) is None and (name not in self.model_fields_set or name in self._omit_none):
                del data[name]
        return data


class Finding(_Stored):
    """One label's aggregated result as a job records it (rounded to 4 decimals)."""

    label: str
    probability: float
    positive: bool
    #: Results written before the "no finding" class and triage flags were recorded lack them.
    normal: bool = False
    triage: bool = False
    #: The label's threshold in force when the job ran (the manifest's); None: a result written
    #: before it was recorded.
    threshold: float | None = None


class JobOutput(_Stored):
    """One output object a job wrote (an SOP instance; messages are not listed)."""

    kind: OutputKind
    sop_instance_uid: str


class Segment(_Stored):
    """One segment of a segmentation model's result, with its measurements (mm, 2 decimals)."""

    label: str
    pixels: int
    frames: int  # frames with pixels
    area_mm2: float | None = None
    volume_mm3: float | None = None


class JobResult(_Stored):
    """What a finished analysis records on its job row (``Job.result``, JSON): read it with
    ``JobResult.model_validate_json``, write it with :meth:`to_json`. Keys it does not know (a
    newer node's) are kept; ``segments`` is present only for a segmentation model."""

    _omit_none: ClassVar[tuple[str, ...]] = ("segments",)

    model: str = ""
    version: str = ""
    images: int | None = None  # instances analysed; None: not recorded
    frames: int | None = None  # frames scored (results from before frames were counted lack it)
    findings: list[Finding] = PydanticField(default_factory=list)
    outputs: list[JobOutput] = PydanticField(default_factory=list)
    segments: list[Segment] | None = None
    #: True: the job ran a shadow model (manifest ``mode: shadow``: recorded, nothing sent);
    #: None: a result written before it was recorded.
    shadow: bool | None = None

    def to_json(self) -> str:
        """The stored form (``model_dump_json``)."""
        return self.model_dump_json()

    def output_uids(self, kind: OutputKind) -> list[str]:
        """SOP Instance UIDs of the outputs of one kind."""
        return [o.sop_instance_uid for o in self.outputs if o.kind == kind]


class JobTimings(RootModel[dict[str, float]]):
    """Seconds a job spent in each stage (``Job.timings``, JSON object: stage name -> seconds,
    rounded to 4 decimals): "queued", "verifying", "decoding", "preprocessing", "inferring",
    "writing", ... (the runner's stopwatch names the stages)."""

    root: dict[str, float] = PydanticField(default_factory=dict)

    @classmethod
    def of(cls, timings: dict[str, float]) -> JobTimings:
        """The stored form of a stopwatch's timings (rounded to 4 decimals)."""
        return cls({k: round(v, 4) for k, v in timings.items()})
