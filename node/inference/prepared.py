"""Decode and prepare instances for a model: every frame of every file to its model input (and,
where asked, its uint8 display), with what the outputs need of the source (the data set, pixel
data dropped; each frame's header).

This is the work that touches the pixels of untrusted files, so it is kept apart from the rest of
the analysis: :func:`prepare_items` runs it in this process (the reference, and the debugging
path), :class:`node.inference.isolate.PreparePool` runs the same :meth:`PrepareSpec.prepare` in a
child process under a memory and a time limit. The module imports only what decoding needs
(pydicom, numpy, OpenCV), so that children start small.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from pydicom.dataset import Dataset

from node.budget import DEFAULT_BUDGET, Budget
from node.inference import preprocess as pp
from node.inference.decode import decode_frame, forget_stored_range, load_deferred, read_dataset, stored_range
from node.inference.manifest import Manifest
from node.inference.reduce import prepare_frames
from node.types import DecodedImage, ImageHeader, ModelInput

log = logging.getLogger(__name__)

#: What a job hands in: a file of the spool (or an upload), or a data set already read.
Item = Path | Dataset


def display_image(image: DecodedImage, frame: int = 0) -> np.ndarray:
    """One frame for display as uint8: a greyscale frame (rows, cols) windowed with the
    transforms the ``modality_lut`` and ``window`` steps use (pydicom's: Modality LUT or rescale,
    then VOI LUT or the window with its VOILUTFunction), else the 0.5-99.5 percentiles; a colour
    frame (decoded to RGB) as it is, (rows, cols, 3) RGB (16-bit colour scaled to 8 bits).
    ``image.header`` is that frame's header."""
    header = image.header
    pixels = image.frame(frame)
    if pixels.ndim == 3:  # colour (YBR and palette already RGB): the photograph itself
        if pixels.dtype.itemsize > 1 or not np.issubdtype(pixels.dtype, np.integer):
            top = float(2**header.bits_stored - 1) if np.issubdtype(pixels.dtype, np.integer) else 255.0
            pixels = np.floor(pixels.astype(np.float64) * (255.0 / max(top, 1.0)) + 0.5)
        return np.ascontiguousarray(np.clip(pixels, 0, 255).astype(np.uint8))
    usable = header.voi_lut is not None or (header.window_width is not None and header.window_width > 1)
    if usable and np.issubdtype(pixels.dtype, np.integer) and pixels.dtype.itemsize <= 2:
        # every stored value the dtype holds through the very same transforms, then one look-up
        # per pixel: bit for bit the per-pixel result, without float64 work on 5 million pixels
        table = _display_table(pixels.dtype, header)
        if table is not None:
            fast = _display_by_opencv(pixels, header, table)
            if fast is not None:
                return fast
            return lookup(table, pixels.view(np.dtype(f"u{pixels.dtype.itemsize}")))
    values, _ = pp.header_modality(pixels, header)
    out = pp.header_voi(values, header) if usable else None
    if out is None:
        lo, hi = np.percentile(values, [0.5, 99.5])
        out = pp.scale_to_8bit(values, float(lo), float(hi or lo + 1))
    if header.photometric_interpretation == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(out, 0, 255).astype(np.uint8)


#: pixels looked up per ``np.take``: its index array (converted to intp, 8 bytes a pixel) stays
#: in cache instead of a 40 MB temporary for a 5-Mpixel radiograph (~2x faster, same values)
_LOOKUP_CHUNK = 1 << 18


def lookup(table: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """``np.take(table, indices)`` (same values, same shape and dtype), chunk by chunk."""
    flat_in = np.ascontiguousarray(indices).reshape(-1)
    out = np.empty(indices.shape, dtype=table.dtype)
    flat_out = out.reshape(-1)
    for start in range(0, flat_in.size, _LOOKUP_CHUNK):
        stop = start + _LOOKUP_CHUNK
        np.take(table, flat_in[start:stop], out=flat_out[start:stop])
    return out


#: at most this many stored values may need the table after OpenCV's pass (one compare and one
#: masked copy each, ~1.5 ms on a 2140 x 1760 image against ~9 ms for the whole look-up)
_MAX_FIXUPS = 4
#: the largest lift of the rounding point (see ``_display_by_opencv``), in grey levels
_MAX_LIFT = 0.25


def _display_by_opencv(pixels: np.ndarray, header: ImageHeader, table: np.ndarray) -> np.ndarray | None:
    """The display of unsigned greyscale ``pixels`` with a LINEAR / LINEAR_EXACT header window
    (rescale, no LUT) in one OpenCV pass (``addWeighted`` to uint8: ``round(alpha * v + beta)``
    in float32, saturated to 0..255), or None where that would not be ``table`` (the display
    table, the reference) value for value.

    The window is affine in the stored value between its plateaus, so the table's ``trunc(y(v))``
    is ``round(y(v) - 0.5 + lift)``. The small ``lift`` puts the rounding point in the middle of
    the gap that the stored values' places above their whole numbers leave below 1: a value
    whose ``y`` is a whole number then no longer sits on the rounding tie (such values needed
    the table in 3 of 10 radiograph phantoms with ``lift`` 0, 1 in 9 with it). OpenCV computes it ~5x
    faster than the look-up, a MONOCHROME1 inversion included (a negative ``alpha``: one pass
    instead of three). It is used only after a proof over every stored value from the image's
    minimum to its maximum (:func:`_unsafe_values`, for the lifted point and for ``lift`` 0,
    whichever leaves fewer): OpenCV's own result on those values equals the table, and each
    ``alpha * v + beta`` lies further from a rounding boundary than four times float32's error
    on it, so any float32 evaluation rounds the same way wherever the value sits in the image.
    Up to ``_MAX_FIXUPS`` values that fail the proof are looked up in the table afterwards;
    more, and None."""
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        return None
    if header.modality_lut is not None or header.voi_lut is not None or pp.header_window_problem(header):
        return None
    center, width, function = header.window_center, header.window_width, header.voi_lut_function
    if center is None or width is None:
        return None
    if function == "LINEAR":
        c, w = center - 0.5, width - 1.0
    elif function == "LINEAR_EXACT":
        c, w = center, width
    else:
        return None
    if not w > 0:
        return None
    # y = ((x - c) / w + 0.5) * 255 with x = slope * v + intercept (window() on header_modality)
    alpha = header.rescale_slope * 255.0 / w
    beta = ((header.rescale_intercept - c) / w + 0.5) * 255.0
    if header.photometric_interpretation == "MONOCHROME1":
        alpha, beta = -alpha, 255.0 - beta
    if not (np.isfinite(alpha) and np.isfinite(beta)) or alpha == 0:
        return None
    pixels = np.ascontiguousarray(pixels)
    vmin, vmax = stored_range(pixels)  # the pass decoding or the reduction made, where one did
    values = np.arange(vmin, vmax + 1, dtype=pixels.dtype).reshape(1, -1)
    want = table[values.reshape(-1)]
    stored = values.reshape(-1).astype(np.float64)
    ramp = stored * alpha + beta
    between = (ramp >= 0.0) & (ramp <= 255.0)
    # each value's place above the table's whole number: ~[0, 1); the rounding point goes in
    # the middle of the gap between the highest place and the next whole number above the lowest
    place = ramp[between] - want[between]
    lift = min(_MAX_LIFT, (1.0 - float(place.max()) - float(place.min())) / 2) if place.size else 0.0
    # the unlifted point as well, in case it leaves fewer values to the table (a narrow gap)
    shift, unsafe = min(
        ((s, _unsafe_values(values, want, alpha, s)) for s in (beta - 0.5 + lift, beta - 0.5)),
        key=lambda found: found[1].size,
    )
    if unsafe.size > _MAX_FIXUPS:
        log.debug("display: %d stored values round ambiguously in float32; table look-up", unsafe.size)
        return None
    out = _ramp_u8(pixels, alpha, shift)
    for i in unsafe:
        scalar = (float(vmin + i), 0.0, 0.0, 0.0)
        mask = np.asarray(cv2.compare(pixels, scalar, cv2.CMP_EQ))  # type: ignore[call-overload]
        out = np.asarray(cv2.copyTo(np.full_like(out, want[i]), mask, out))
    return out


def _ramp_u8(x: np.ndarray, alpha: float, shift: float) -> np.ndarray:
    """``saturate_u8(round(alpha * x + shift))``, OpenCV in float32 (one pass)."""
    return np.asarray(cv2.addWeighted(x, alpha, x, 0.0, shift, dtype=cv2.CV_8U))


def _unsafe_values(values: np.ndarray, want: np.ndarray, alpha: float, shift: float) -> np.ndarray:
    """Indices into ``values`` (1 x n stored values) where :func:`_ramp_u8` is not ``want``, or
    might not be wherever the value sits in an image: ``alpha * v + shift`` (float32
    coefficients, exact arithmetic) within four times float32's error of a rounding boundary
    between the plateaus (float32 evaluation, fused or not, is within half an ulp of the
    product plus half an ulp of the sum)."""
    got = _ramp_u8(values, alpha, shift).reshape(-1)
    products = values.reshape(-1).astype(np.float64) * float(np.float32(alpha))
    z = products + float(np.float32(shift))
    margin = np.spacing(np.abs(products).astype(np.float32)) + np.spacing(np.abs(z).astype(np.float32))
    near = (np.abs(z - np.floor(z) - 0.5) <= margin) & (z > 0.0) & (z < 255.0)
    return np.flatnonzero((got != want) | near)


def _display_table(dtype: np.dtype, header: ImageHeader) -> np.ndarray | None:
    """uint8 display of every value of ``dtype``, indexed by its bits read as unsigned (so a
    signed image is looked up through its unsigned view); None when the header's VOI is unusable."""
    info = np.iinfo(dtype)
    unsigned = np.arange(2 ** (8 * dtype.itemsize), dtype=np.dtype(f"u{dtype.itemsize}"))
    values = unsigned.view(dtype).reshape(1, -1)  # two's complement order for a signed dtype
    assert values.min() == info.min and values.max() == info.max
    mapped, _ = pp.header_modality(values, header)
    out = pp.header_voi(mapped, header)
    if out is None:
        return None
    if header.photometric_interpretation == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(out, 0, 255).astype(np.uint8).reshape(-1)


@dataclass(frozen=True, eq=False)
class PreparedFrame:
    """One frame prepared for the model. ``item``: its position in the list handed in; ``index``:
    0-based frame index in that instance; ``dataset``: the instance's data set, pixel data dropped
    (one object shared by the frames of an instance); ``model_input``: None for a
    :class:`DisplaySpec`; ``display``: the uint8 display when asked."""

    item: int
    index: int
    dataset: Dataset
    header: ImageHeader
    model_input: ModelInput | None
    display: np.ndarray | None = None


@dataclass(frozen=True)
class PrepareSpec:
    """How to prepare instances for one model (picklable: it travels to the child processes).
    ``check_size``: check the model's spatial input size (False for patch models, which tile the
    full image); ``keep_display``: keep each frame's uint8 display of a file (a data set handed
    in keeps it always: it cannot be decoded again later); ``shows``: False for a model whose
    outputs show no image (no heatmap): then no display is made at all, a data set's neither."""

    manifest: Manifest
    check_size: bool = True
    keep_display: bool = True
    shows: bool = True

    @property
    def displays_later(self) -> bool:
        """Whether a file's displays are decoded again after inference (shown, but not kept)."""
        return self.shows and not self.keep_display

    def keeps_display(self, item: Item) -> bool:
        """Whether ``item``'s displays are made now (see the class doc)."""
        return self.shows and (self.keep_display or not isinstance(item, (str, Path)))

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        """Decode ``item`` frame by frame within ``budget`` and prepare each frame; a frame's
        full-resolution pixels are dropped once prepared. Raises DecodeError / PreprocessError."""
        ds = read_dataset(item, map_pixels=True)  # native pixel data mapped, not copied
        keep = self.keeps_display(item)
        frames = []
        # manifest.decode_reduced may decode a JPEG 2000 frame at the size the model needs; a kept
        # display is the full-resolution image, so then the frame is decoded whole, as always
        manifest = self.manifest.model_copy(update={"decode_reduced": False}) if keep else self.manifest
        pairs = prepare_frames(ds, manifest, budget, check_size=self.check_size)
        for index, (decoded, model_input) in enumerate(pairs):
            display = display_image(decoded) if keep else None
            frames.append(PreparedFrame(position, index, ds, decoded.header, model_input, display))
        forget_stored_range()
        if "PixelData" in ds:
            del ds.PixelData  # the outputs need the header only
        load_deferred(ds)
        if frames and frames[-1].header.is_multiframe:
            log.debug("prepared %d frames of one multi-frame image", frames[-1].header.number_of_frames)
        return frames


@dataclass(frozen=True)
class DisplaySpec:
    """The uint8 displays of chosen frames, decoded again (the frames a series-level model shows,
    after inference): ``frames[position]`` lists the 0-based frame indices of that item."""

    frames: tuple[tuple[int, ...], ...]

    def prepare(self, item: Item, position: int, budget: Budget = DEFAULT_BUDGET) -> list[PreparedFrame]:
        """Decode each chosen frame of ``item`` alone within ``budget``; its display, no model input."""
        ds = read_dataset(item, map_pixels=True)
        out = []
        for index in self.frames[position]:
            decoded = decode_frame(ds, index, budget)
            out.append(PreparedFrame(position, index, ds, decoded.header, None, display_image(decoded)))
        forget_stored_range()
        if "PixelData" in ds:
            del ds.PixelData
        load_deferred(ds)
        return out


def iter_prepared(
    items: Sequence[Item], spec: PrepareSpec | DisplaySpec, budget: Budget = DEFAULT_BUDGET
) -> Iterator[PreparedFrame]:
    """Every frame of every item prepared in this process, item by item in the order handed in,
    each yielded as soon as it is prepared."""
    for position, item in enumerate(items):
        yield from spec.prepare(item, position, budget)


def prepare_items(
    items: Sequence[Item], spec: PrepareSpec | DisplaySpec, budget: Budget = DEFAULT_BUDGET
) -> list[PreparedFrame]:
    """Every frame of every item prepared in this process, in the order handed in."""
    return list(iter_prepared(items, spec, budget))


class Preparer(Protocol):
    """Something that prepares items as :func:`prepare_items` does, elsewhere (a process pool)."""

    def submit(
        self,
        items: Sequence[Item],
        spec: PrepareSpec | DisplaySpec,
        budget: Budget = DEFAULT_BUDGET,
        deadline: float | None = None,
    ) -> list[PreparedFrame]:
        """Every frame of every item prepared, in the order handed in, before ``deadline``
        (``time.monotonic``)."""
        ...

    def stream(
        self,
        items: Sequence[Item],
        spec: PrepareSpec | DisplaySpec,
        budget: Budget = DEFAULT_BUDGET,
        deadline: float | None = None,
    ) -> Iterator[PreparedFrame]:
        """The frames of :meth:`submit`, each as soon as it is ready (items in no set order;
        ``PreparedFrame.item`` says which)."""
        ...
