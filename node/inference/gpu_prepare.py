"""Preparation on the GPU (issue 16, item 3): decode, window and resize on the device, and hand
the model a device tensor, without a copy through the host.

The preparation math is written once against an array module ``xp`` (NumPy or CuPy: the same
code), so that it is tested here with NumPy against the node's CPU preparation
(:func:`node.inference.preprocess.run_steps`) and runs on the device with CuPy:

- the pointwise steps (modality LUT or rescale, the header / preset / explicit window with its
  VOI LUT Function, the VOI LUT, MONOCHROME1 inversion, naive and global 8-bit conversion) use
  the CPU code's own formulas in the same order of float64 operations, then float32;
- a resize or letterbox is two matrix products, ``R @ image @ C.T``, whose rows are OpenCV's
  weights for that size (INTER_AREA's area table when both axes shrink, its linear variant when
  one grows; INTER_LINEAR; INTER_NEAREST), float32 like OpenCV's. The CPU path's reduction
  (:mod:`node.inference.reduce`: area averages of the clipped stored values, then the affine map)
  computes the same averages in another order: the two agree within float32 rounding
  (:data:`GREY_TOLERANCE`);
- normalize, channel replication, the output dtype and layout are the CPU code's.

Steps with no device version here (CLAHE, median, Gaussian, the colour fundus steps, per-image
percentiles, cubic interpolation) keep their models on the CPU path: :func:`supported` names the
step. Every frame the device path cannot prepare (a data error, an unusable window) is prepared by
the CPU code in this process and uploaded, so errors and results are the CPU path's.

Decoding: JPEG baseline / extended, JPEG 2000 and HTJ2K frames are decoded by nvImageCodec on
the device where its output can be pydicom's (:func:`decode_on_device`: the codestream's
precision at most BitsStored, its sign the data set's; the samples masked and sign-extended
from that precision); any other frame, or any device decode that fails, is decoded on the CPU
(:mod:`node.inference.decode`) and uploaded.

Use: ``make_gpu_preparer(session.active_provider, cpu=pool)`` once per node (None where the GPU
path is not usable: :mod:`node.inference.gpu_probe` logs why), then its ``stream`` / ``submit``
as any Preparer. Its tensors are CuPy arrays: join them with
:func:`node.inference.device_arrays.concatenate`, bring them to the host with its
:func:`~node.inference.device_arrays.to_host` where host code needs them (heatmaps, patch tiling).

Nothing here imports CuPy or nvImageCodec at module import: the node imports it without them.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pydicom.uid
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import DecodeError, PreprocessError
from node.inference import decode as dec
from node.inference import prepared
from node.inference import preprocess as pp
from node.inference.codestream import CodestreamError, frame_claim
from node.inference.device_arrays import to_host
from node.inference.manifest import GREY_OPS, Manifest
from node.inference.reduce import area_weights
from node.redact import redact
from node.types import DecodedImage, Geometry, ImageHeader, ModelInput

log = logging.getLogger(__name__)

#: how far (in grey levels of the 0..255 window output, before normalize) the device
#: preparation may differ from the CPU path's: float32 summation order in the area averages and
#: the float32 rounding of the pointwise output before them (measured on full-size chest
#: radiographs and the bundled models' phantoms: see tests/inference/test_gpu_prepare.py)
GREY_TOLERANCE = 1e-3

#: the steps with a device version (further conditions in :func:`supported`)
_OPS = frozenset(
    {
        "modality_lut",
        "window",
        "invert_monochrome1",
        "to_8bit",
        "resize",
        "letterbox",
        "normalize",
        "replicate_channels",
    }
)
_INTERPOLATIONS = frozenset({"area", "linear", "nearest"})
_TO_8BIT = frozenset({"naive", "global_percentile"})

#: transfer syntaxes whose frames nvImageCodec decodes on the device
DEVICE_SYNTAXES = frozenset(
    {
        pydicom.uid.JPEGBaseline8Bit,
        pydicom.uid.JPEGExtended12Bit,
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEG2000,
        pydicom.uid.HTJ2KLossless,
        pydicom.uid.HTJ2KLosslessRPCL,
        pydicom.uid.HTJ2K,
    }
)
_J2K = frozenset(
    {
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEG2000,
        pydicom.uid.HTJ2KLossless,
        pydicom.uid.HTJ2KLosslessRPCL,
        pydicom.uid.HTJ2K,
    }
)


def supported(manifest: Manifest) -> str | None:
    """None when every preprocessing step of ``manifest`` has a device version here, else why
    not (naming the step)."""
    for i, step in enumerate(manifest.preprocessing):
        s: Any = step
        op = str(s.op)
        if op not in _OPS:
            return f"step {i} ({op}) has no GPU implementation"
        if op in ("resize", "letterbox") and s.interpolation not in _INTERPOLATIONS:
            return f"step {i} ({op}): {s.interpolation} interpolation has no GPU implementation"
        if op == "to_8bit" and s.method not in _TO_8BIT:
            return f"step {i} (to_8bit): method {s.method} has no GPU implementation"
    return None


# ------------------------------------------------------------------------------------------------
# Resize weights (OpenCV's, as matrices)


def _opencv_kinds(src: tuple[int, int], dst: tuple[int, int], interpolation: str) -> tuple[str, str]:
    """The per-axis weight rule cv2.resize applies for ``interpolation`` (rows, columns):
    INTER_AREA averages areas only when neither axis grows, else it is OpenCV's linear variant
    ("area_linear") on both axes."""
    if interpolation == "area":
        if src[0] >= dst[0] and src[1] >= dst[1]:
            return "area", "area"
        return "area_linear", "area_linear"
    return interpolation, interpolation


@functools.lru_cache(maxsize=128)
def resize_weights(ssize: int, dsize: int, kind: str) -> np.ndarray:
    """The (dsize, ssize) float32 matrix whose row ``d`` holds the weights cv2.resize gives the
    source pixels of output pixel ``d`` along one axis (``resize.cpp``): ``kind`` "area" (its
    area table, :func:`node.inference.reduce.area_weights`), "area_linear" (INTER_AREA where an
    axis grows), "linear" (INTER_LINEAR), "nearest" (INTER_NEAREST)."""
    m = _weights(ssize, dsize, kind)
    m.flags.writeable = False  # cached and shared
    return m


def _weights(ssize: int, dsize: int, kind: str) -> np.ndarray:
    m = np.zeros((dsize, ssize), dtype=np.float32)
    if kind == "area":
        for d, (a, b, w) in enumerate(area_weights(ssize, dsize)):
            m[d, a:b] = w
        return m
    inv = dsize / ssize  # OpenCV: inv_scale = dsize / ssize, scale = 1 / inv_scale
    scale = 1.0 / inv
    if kind == "nearest":
        for d in range(dsize):
            m[d, min(math.floor(d * scale), ssize - 1)] = 1.0
        return m
    if kind not in ("linear", "area_linear"):
        raise PreprocessError(f"no resize weights for {kind!r}")
    for d in range(dsize):  # the coefficients in double, as OpenCV 5 computes them
        if kind == "linear":
            fx = (d + 0.5) * scale - 0.5
            sx = math.floor(fx)
            fx -= sx
        else:
            sx = math.floor(d * scale)
            fx = (d + 1) - (sx + 1) * inv
            fx = 0.0 if fx <= 0 else fx - math.floor(fx)
        if sx < 0:
            sx, fx = 0, 0.0
        if sx >= ssize - 1:
            sx, fx = ssize - 1, 0.0
        m[d, sx] += np.float32(1.0 - fx)
        if fx != 0:
            m[d, sx + 1] += np.float32(fx)
    return m


class WeightCache:
    """Resize matrices on the device of ``xp``, made once per (source, target, kind)."""

    def __init__(self, xp: Any, size: int = 64) -> None:
        self.xp, self.size = xp, size
        self._held: dict[tuple[int, int, str], Any] = {}

    def get(self, ssize: int, dsize: int, kind: str) -> Any:
        """The weights of :func:`resize_weights` as an ``xp`` array."""
        key = (ssize, dsize, kind)
        found = self._held.get(key)
        if found is None:
            if len(self._held) >= self.size:
                self._held.clear()
            found = self._held[key] = self.xp.asarray(resize_weights(ssize, dsize, kind))
        return found


# ------------------------------------------------------------------------------------------------
# The steps, on xp arrays (the formulas of node.inference.preprocess, in its order of operations)


def resize(
    xp: Any, img: Any, size: tuple[int, int], interpolation: str, weights: WeightCache | None = None
) -> Any:
    """cv2.resize of ``img`` (H, W[, C]) to (height, width) as ``R @ img @ C.T`` with OpenCV's
    weights (:func:`resize_weights`), float32, channels kept."""
    h, w = int(size[0]), int(size[1])
    src = (int(img.shape[0]), int(img.shape[1]))
    if interpolation not in _INTERPOLATIONS:
        raise PreprocessError(f"{interpolation} interpolation has no GPU implementation")
    kind_y, kind_x = _opencv_kinds(src, (h, w), interpolation)
    cache = weights if weights is not None else WeightCache(xp)
    rows = cache.get(src[0], h, kind_y)
    cols_t = cache.get(src[1], w, kind_x).T
    f = img.astype(xp.float32, copy=False)
    if f.ndim == 2:
        return (rows @ f) @ cols_t
    return xp.stack([(rows @ f[..., c]) @ cols_t for c in range(f.shape[-1])], axis=-1)


def letterbox(
    xp: Any,
    img: Any,
    size: tuple[int, int],
    pad_value: float,
    interpolation: str,
    align: Literal["center", "top_left"],
    weights: WeightCache | None = None,
) -> tuple[Any, pp.Letterbox]:
    """pp.letterbox: resize keeping aspect (pp.letterbox_params' geometry), pad with ``pad_value``."""
    params = pp.letterbox_params((int(img.shape[0]), int(img.shape[1])), size, align)
    inner = resize(xp, img, params.inner_shape, interpolation, weights)
    canvas = xp.full((size[0], size[1], *img.shape[2:]), pad_value, dtype=xp.float32)
    nh, nw = params.inner_shape
    canvas[params.pad_top : params.pad_top + nh, params.pad_left : params.pad_left + nw] = inner
    return canvas, params


@dataclass(frozen=True, eq=False)
class _State:
    image: Any
    value_range: tuple[float, float] | None
    geometry: Geometry


def _is_colour(image: Any) -> bool:
    return bool(image.ndim == 3 and image.shape[-1] != 1)


def _range(state: _State, op: str) -> tuple[float, float]:
    if state.value_range is None:
        raise PreprocessError(f"{op} cannot follow normalize (the value range is no longer known)")
    return state.value_range


def _resized(state: _State, img: Any, sy: float, sx: float, oy: float, ox: float) -> _State:
    geom = state.geometry.then(sy, sx, oy, ox, (int(img.shape[0]), int(img.shape[1])))
    return replace(state, image=img, geometry=geom)


def _apply(xp: Any, state: _State, step: Any, header: ImageHeader, weights: WeightCache) -> _State:
    """One step as pp._apply_step applies it. Raises PreprocessError wherever the CPU code
    may raise (the caller then lets the CPU code say why)."""
    op = str(step.op)
    img = state.image
    if op in GREY_OPS and _is_colour(img):
        raise PreprocessError(f"{op} works on greyscale images")
    if op == "modality_lut":
        lo, hi = _range(state, op)
        if header.modality_lut is not None:
            lut = header.modality_lut
            out = pp.lut_lookup(img, lut, xp=xp).astype(xp.float32)
            return replace(state, image=out, value_range=(0.0, float(2**lut.bits - 1)))
        a = lo * header.rescale_slope + header.rescale_intercept
        b = hi * header.rescale_slope + header.rescale_intercept
        out = pp.modality_lut(img, header.rescale_slope, header.rescale_intercept, xp=xp)
        return replace(state, image=out, value_range=(min(a, b), max(a, b)))
    if op == "window":
        if _is_colour(img):
            raise PreprocessError("window needs a single-channel image")
        if step.source == "preset":
            center, width = pp.window_preset(step.preset)
        elif step.source == "explicit":
            center, width = step.center, step.width
        else:
            voi = pp.header_voi(img, header, xp=xp)
            if voi is not None:
                return replace(state, image=voi, value_range=(0.0, 255.0))
            if step.fallback != "minmax":
                raise PreprocessError("no usable window")
            lo, hi = float(img.min()), float(img.max())
            center, width = (lo + hi + 1) / 2, max(1.0, hi - lo + 1)
        return replace(state, image=pp.window(img, center, width, xp=xp), value_range=(0.0, 255.0))
    if op == "invert_monochrome1":
        if header.photometric_interpretation != "MONOCHROME1":
            return state
        lo, hi = _range(state, op)
        return replace(state, image=pp.invert(img, lo, hi, xp=xp))
    if op == "to_8bit":
        if _is_colour(img):
            raise PreprocessError("to_8bit needs a single-channel image")
        vr = _range(state, op)
        if step.method == "naive":
            out = pp.scale_to_8bit(img, *vr, xp=xp)
        elif step.method == "global_percentile":
            out = pp.scale_to_8bit(img, step.low, step.high, xp=xp)
        else:
            raise PreprocessError(f"to_8bit method {step.method} has no GPU implementation")
        return replace(state, image=out, value_range=(0.0, 255.0))
    if op == "resize":
        h, w = step.size
        out = resize(xp, img, (h, w), step.interpolation, weights)
        return _resized(state, out, h / img.shape[0], w / img.shape[1], 0.0, 0.0)
    if op == "letterbox":
        out, lb = letterbox(
            xp, img, tuple(step.size), step.pad_value, step.interpolation, step.align, weights
        )
        return _resized(state, out, lb.scale_y, lb.scale_x, lb.pad_top, lb.pad_left)
    if op == "normalize":
        out = pp.normalize(img, step.mean, step.std, step.max_pixel_value, xp=xp)
        return replace(state, image=out, value_range=None)
    if op == "replicate_channels":
        return replace(state, image=pp.replicate_channels(img, step.channels, xp=xp))
    raise PreprocessError(f"{op} has no GPU implementation")


def _initial_range(xp: Any, image: Any, header: ImageHeader) -> tuple[float, float]:
    if np.issubdtype(image.dtype, np.integer):
        return header.stored_value_range
    return float(xp.min(image)), float(xp.max(image))


def run_steps(
    xp: Any,
    image: Any,
    header: ImageHeader,
    steps: Sequence[Any],
    *,
    layout: Literal["NCHW", "NHWC"] = "NCHW",
    dtype: str = "float32",
    expected_hw: tuple[int | None, int | None] | None = None,
    expected_channels: int | None = None,
    weights: WeightCache | None = None,
) -> ModelInput:
    """:func:`node.inference.preprocess.run_steps` on ``xp`` arrays (one frame of stored
    values, (H, W[, C]), on ``xp``'s device): the tensor (``xp``) and its geometry. Raises
    PreprocessError where a step cannot be applied (or has no device version)."""
    if image.ndim not in (2, 3):
        raise PreprocessError(f"expected one frame (H, W) or (H, W, C), found shape {image.shape}")
    cache = weights if weights is not None else WeightCache(xp)
    state = _State(
        image=image,
        value_range=_initial_range(xp, image, header),
        geometry=Geometry.identity((int(image.shape[0]), int(image.shape[1]))),
    )
    for step in steps:
        state = _apply(xp, state, step, header, cache)
    return pp.model_input(
        state.image.astype(xp.float32, copy=False),
        state.geometry,
        layout=layout,
        dtype=dtype,
        expected_hw=expected_hw,
        expected_channels=expected_channels,
        xp=xp,
    )


def prepare_frame(
    xp: Any,
    pixels: Any,
    header: ImageHeader,
    manifest: Manifest,
    *,
    check_size: bool = True,
    weights: WeightCache | None = None,
) -> ModelInput:
    """One frame (``xp`` array of stored values; ``header`` that frame's) to the model input of
    ``manifest``, as :func:`node.inference.preprocess.prepare` makes it."""
    spec = manifest.input
    return run_steps(
        xp,
        pixels,
        header,
        manifest.preprocessing,
        layout=spec.slice_layout,
        dtype=spec.dtype,
        expected_hw=spec.spatial if check_size else None,
        expected_channels=spec.channels,
        weights=weights,
    )


def display(xp: Any, pixels: Any, header: ImageHeader) -> np.ndarray:
    """The host uint8 display :func:`node.inference.prepared.display_image` gives for this frame
    (``pixels`` on ``xp``'s device): for greyscale integers of at most 16 bits with a usable
    header VOI, its display table (every stored value through the CPU transforms) looked up on
    the device, then copied; otherwise the CPU code on a host copy of the frame."""
    usable = header.voi_lut is not None or (header.window_width is not None and header.window_width > 1)
    dtype = np.dtype(pixels.dtype)
    if pixels.ndim == 2 and usable and dtype.kind in "iu" and dtype.itemsize <= 2:
        table = prepared._display_table(dtype, header)
        if table is not None:
            looked_up = xp.asarray(table)[pixels.view(np.dtype(f"u{dtype.itemsize}"))]
            return np.ascontiguousarray(to_host(looked_up))
    host = np.ascontiguousarray(to_host(pixels))
    return prepared.display_image(DecodedImage(header=header, pixels=host[np.newaxis]))


# ------------------------------------------------------------------------------------------------
# Decoding on the device


def _color_spec(codec: Any, ts: UID, header: ImageHeader) -> Any | None:
    """The nvImageCodec colour handling that gives pydicom's decoded colours, or None where the
    device decode is not used: greyscale unchanged; JPEG 2000's YBR_ICT / YBR_RCT and JPEG's
    YBR_FULL(_422) converted to RGB (pydicom's default); RGB unchanged."""
    pi = header.stored_photometric_interpretation
    if header.samples_per_pixel == 1 and pi in ("MONOCHROME1", "MONOCHROME2"):
        return codec.ColorSpec.UNCHANGED
    if header.samples_per_pixel != 3 or header.bits_allocated != 8:
        return None
    if ts in _J2K:
        if pi in ("YBR_ICT", "YBR_RCT"):
            return codec.ColorSpec.SRGB
        return codec.ColorSpec.UNCHANGED if pi == "RGB" else None
    return codec.ColorSpec.SRGB if pi in ("YBR_FULL", "YBR_FULL_422") else None


def decode_on_device(
    xp: Any, codec: Any, decoder: Any, codestream: bytes, ts: UID, header: ImageHeader
) -> Any | None:
    """One frame's codestream decoded by nvImageCodec (``codec`` the module, ``decoder`` its
    Decoder) to stored values on ``xp``'s device as pydicom gives them, or None where the device
    decode cannot stand for pydicom's.

    The values are the codestream's samples at its own precision ``p`` (SIZ / SOF), however the
    decoder returns them (sign-extended or not, bits above ``p`` set or not): masked to ``p``
    bits and, signed, sign-extended from bit ``p - 1``, in the dtype pydicom gives
    (BitsAllocated, PixelRepresentation). Where ``p`` is at most BitsStored and the
    codestream's sign is the data set's, those are pydicom's values; otherwise (pydicom corrects
    a precision above BitsStored, or a sign that differs), a transfer syntax it does not take, a
    colour model it does not convert the same way, a signed JPEG, or an unexpected output:
    None. Exceptions from nvImageCodec propagate (the caller decodes the frame on the CPU)."""
    if ts not in DEVICE_SYNTAXES or header.bits_allocated not in (8, 16):
        return None
    try:
        claim = frame_claim(ts, codestream)
    except CodestreamError:
        return None
    if claim is None or not 0 < claim.bits <= header.bits_stored:
        return None
    if (claim.signed != header.is_signed) if ts in _J2K else header.is_signed:
        return None  # a signed JPEG frame (pydicom's sign handling) goes to the CPU too
    spec = _color_spec(codec, ts, header)
    if spec is None:
        return None
    image = decoder.decode(codestream, params=codec.DecodeParams(allow_any_depth=True, color_spec=spec))
    if image is None:
        return None
    arr = xp.asarray(image)
    samples = header.samples_per_pixel
    if samples == 1 and arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    expected = (header.rows, header.cols) if samples == 1 else (header.rows, header.cols, samples)
    if tuple(arr.shape) != expected or np.dtype(arr.dtype).kind not in "iu":
        return None
    size = header.bits_allocated // 8
    unsigned = np.dtype(f"u{size}")
    got = np.dtype(arr.dtype)
    if got.itemsize > size:
        return None
    arr = arr.view(np.dtype(f"u{got.itemsize}")).astype(unsigned, copy=False)
    bits = claim.bits
    if bits < 8 * size:
        arr = arr & unsigned.type((1 << bits) - 1)
    if header.is_signed:
        signed = np.dtype(f"i{size}")
        if bits < 8 * size:  # sign-extend from the precision: (v ^ s) - s in a wider type
            sign = 1 << (bits - 1)
            arr = ((arr.astype(xp.int32) ^ sign) - sign).astype(signed)
        else:
            arr = arr.view(signed)
    return xp.ascontiguousarray(arr)


@dataclass(frozen=True, eq=False)
class DeviceFrame:
    """One decoded frame: its header, its stored values on the device, and the host frame when
    it was decoded on the CPU (then the display comes from it)."""

    header: ImageHeader
    pixels: Any
    host: DecodedImage | None


def _upload(xp: Any, decoded: DecodedImage) -> DeviceFrame:
    return DeviceFrame(decoded.header, xp.asarray(decoded.frame(0)), decoded)


def iter_device_frames(
    xp: Any, ds: Dataset, budget: Budget, codec: Any = None, decoder: Any = None
) -> Iterator[DeviceFrame]:
    """Every frame of ``ds`` on ``xp``'s device, in order, each with its header: decoded by
    nvImageCodec (``codec``, ``decoder``; None: never) where :func:`decode_on_device` can,
    else decoded on the CPU (node.inference.decode, the budget checked first as it checks it)
    and uploaded; a device decode that fails is logged (debug, the transfer syntax only) and
    that frame decoded on the CPU."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if codec is None or decoder is None or syntax is None or UID(str(syntax)) not in DEVICE_SYNTAXES:
        for decoded in dec.iter_frames(ds, budget):
            yield _upload(xp, decoded)
        return
    header = dec.check_budget(ds, budget)  # every frame's codestream header checked first
    ts = UID(header.transfer_syntax_uid)
    eot = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    extended = (eot[0], eot[1]) if eot[0] and eot[1] else None
    count = header.number_of_frames
    frames = generate_frames(ds.PixelData, number_of_frames=count, extended_offsets=extended)
    index = 0
    while index < count:
        try:
            codestream = next(frames)
        except StopIteration:
            break
        except Exception as exc:  # pydicom's encapsulation parsers raise several types
            raise DecodeError(
                f"instance {header.sop_instance_uid}: encapsulated pixel data cannot be split into "
                f"frames: {redact(str(exc))}"
            ) from exc
        try:
            pixels = decode_on_device(xp, codec, decoder, codestream, ts, header)
            if pixels is None:
                log.debug("device decode not used for a frame of %s; CPU decode", ts)
        except Exception as exc:  # nvImageCodec raises several types; the CPU decodes it then
            log.debug("device decode failed for %s (%s); CPU decode", ts, type(exc).__name__)
            pixels = None
        if pixels is None:
            yield _upload(xp, dec.decode_frame(ds, index, budget))
        else:
            yield DeviceFrame(header.for_frame(index), pixels, None)
        index += 1
    if index < count:
        raise DecodeError(
            f"instance {header.sop_instance_uid}: pixel data holds {index} frame(s), "
            f"NumberOfFrames says {count}"
        )


# ------------------------------------------------------------------------------------------------
# The preparer


def make_gpu_preparer(provider: str, cpu: prepared.Preparer | None = None) -> GpuPreparer | None:
    """A :class:`GpuPreparer` for models whose session's active provider is ``provider``, or
    None where the GPU preparation is not usable here (:func:`gpu_probe.gpu_preparation`, which
    logs why once). Made once per node (it holds nvImageCodec's decoder and the resize
    matrices on the device); ``cpu``: the node's PreparePool, for what the device path does not
    take."""
    from node.inference.gpu_probe import gpu_preparation

    found = gpu_preparation(provider)
    if not found.usable:
        return None
    return GpuPreparer(device_decode=found.device_decode, cpu=cpu)


class GpuPreparer:
    """Prepares items as :class:`~node.inference.isolate.PreparePool` does (the Preparer
    protocol: :meth:`submit`, :meth:`stream`), in this process, on the GPU: each file read,
    its frames decoded on the device (or on the CPU and uploaded), prepared with ``xp``; the
    frames' ``model_input.tensor`` are ``xp`` (CuPy: device) arrays, their displays host uint8
    arrays equal to :func:`~node.inference.prepared.display_image`'s.

    A model whose steps have no device version (:func:`supported`) is prepared by ``cpu`` (or
    the CPU code in this process), its tensors uploaded (logged once per model); so is a
    :class:`~node.inference.prepared.DisplaySpec` (displays only). Items are prepared one after
    the other on the calling thread. Unlike the pool, nothing isolates the decoders of the
    device path: the budget's header checks are the only guard, and no time limit interrupts
    a decode (the deadline is checked between frames).

    ``xp``: the array module (default CuPy, imported here; NumPy for tests); ``device_decode``:
    decode compressed frames with nvImageCodec (default: when it imports); ``cpu``: the
    preparer for display specs and unsupported models (the node's PreparePool, which isolates
    the decoders; None: the CPU code in this process)."""

    def __init__(
        self, xp: Any = None, device_decode: bool | None = None, cpu: prepared.Preparer | None = None
    ) -> None:
        if xp is None:
            xp = importlib.import_module("cupy")
        self.xp = xp
        self.cpu = cpu
        self._codec: Any = None
        self._decoder: Any = None
        if device_decode is not False:
            try:
                from nvidia import nvimgcodec  # type: ignore[import-not-found]

                self._codec, self._decoder = nvimgcodec, _Locked(nvimgcodec.Decoder())
            except Exception as exc:  # not installed, or no device for its decoder
                if device_decode:
                    raise
                log.debug("nvimgcodec unusable (%s): compressed frames decode on the CPU", type(exc).__name__)
        self.weights = WeightCache(xp)
        self._told: set[str] = set()

    @property
    def device_decode(self) -> bool:
        """True when compressed frames are decoded on the device."""
        return self._decoder is not None

    def submit(
        self,
        items: Sequence[prepared.Item],
        spec: prepared.PrepareSpec | prepared.DisplaySpec,
        budget: Budget = DEFAULT_BUDGET,
        deadline: float | None = None,
    ) -> list[prepared.PreparedFrame]:
        """Every frame of every item prepared (see :meth:`stream`), in the order handed in."""
        return list(self.stream(items, spec, budget, deadline))

    def stream(
        self,
        items: Sequence[prepared.Item],
        spec: prepared.PrepareSpec | prepared.DisplaySpec,
        budget: Budget = DEFAULT_BUDGET,
        deadline: float | None = None,
    ) -> Iterator[prepared.PreparedFrame]:
        """Every frame of every item, item by item in the order handed in, each yielded as soon
        as it is prepared (its device work finished). Raises what the CPU preparation raises
        (DecodeError, PreprocessError, BudgetExceeded) and
        :class:`~node.inference.isolate.PreparationDeadline` once ``deadline`` (monotonic)
        has passed."""
        from node.inference.isolate import PreparationDeadline

        items = list(items)

        def check() -> None:
            if deadline is not None and time.monotonic() > deadline:
                raise PreparationDeadline(
                    f"decoding and preparing {len(items)} images did not finish before the job's time limit"
                )

        if isinstance(spec, prepared.DisplaySpec):
            yield from self._on_cpu(items, spec, budget, deadline, check)
            return
        problem = supported(spec.manifest)
        if problem is not None:
            if spec.manifest.id not in self._told:
                self._told.add(spec.manifest.id)
                log.info("model %s: preparation on the CPU (%s)", spec.manifest.id, problem)
            for frame in self._on_cpu(items, spec, budget, deadline, check):
                yield self._uploaded(frame)
            return
        for position, item in enumerate(items):
            check()
            yield from self._prepare_item(item, position, spec, budget, check)

    def _on_cpu(
        self,
        items: list[prepared.Item],
        spec: prepared.PrepareSpec | prepared.DisplaySpec,
        budget: Budget,
        deadline: float | None,
        check: Any,
    ) -> Iterator[prepared.PreparedFrame]:
        """The CPU preparation: ``self.cpu``'s, else the CPU code here, item by item."""
        if self.cpu is not None:
            yield from self.cpu.stream(items, spec, budget, deadline)
            return
        for position, item in enumerate(items):
            check()
            yield from spec.prepare(item, position, budget)

    def _uploaded(self, frame: prepared.PreparedFrame) -> prepared.PreparedFrame:
        mi = frame.model_input
        if mi is None:
            return frame
        tensor = self.xp.asarray(mi.tensor)
        return replace(frame, model_input=ModelInput(tensor, mi.geometry, mi.layout))

    def _prepare_item(
        self,
        item: prepared.Item,
        position: int,
        spec: prepared.PrepareSpec,
        budget: Budget,
        check: Any,
    ) -> Iterator[prepared.PreparedFrame]:
        xp = self.xp
        ds = dec.read_dataset(item)
        keep = spec.keeps_display(item)
        frames: list[prepared.PreparedFrame] = []
        try:
            for index, frame in enumerate(iter_device_frames(xp, ds, budget, self._codec, self._decoder)):
                check()
                model_input = self._model_input(frame, spec)
                shown = None
                if keep:
                    shown = prepared.display_image(frame.host) if frame.host is not None else None
                    if shown is None:
                        shown = display(xp, frame.pixels, frame.header)
                _synchronize(xp)
                frames.append(prepared.PreparedFrame(position, index, ds, frame.header, model_input, shown))
        finally:
            dec.forget_stored_range()
        if "PixelData" in ds:
            del ds.PixelData  # the outputs need the header only
        yield from frames

    def _model_input(self, frame: DeviceFrame, spec: prepared.PrepareSpec) -> ModelInput:
        """The device preparation of one frame; where it raises, the CPU code's (on a host copy),
        uploaded, so that the result or the error is the CPU path's."""
        try:
            return prepare_frame(
                self.xp,
                frame.pixels,
                frame.header,
                spec.manifest,
                check_size=spec.check_size,
                weights=self.weights,
            )
        except PreprocessError as exc:
            log.debug("device preparation not possible (%s); CPU preparation", exc)
        host = frame.host
        if host is None:
            host = DecodedImage(frame.header, np.ascontiguousarray(to_host(frame.pixels))[np.newaxis])
        cpu = pp.prepare(host, spec.manifest, check_size=spec.check_size)
        return ModelInput(self.xp.asarray(cpu.tensor), cpu.geometry, cpu.layout)


class _Locked:
    """nvImageCodec's Decoder, one decode at a time (the runner's workers share a preparer)."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.lock = threading.Lock()

    def decode(self, codestream: bytes, params: Any) -> Any:
        """``decoder.decode(codestream, params=params)`` under the lock."""
        with self.lock:
            return self.decoder.decode(codestream, params=params)


def _synchronize(xp: Any) -> None:
    """Wait for the device work queued on the current stream (a CuPy ``xp``), so that a
    consumer on another stream (ONNX Runtime's) reads finished tensors."""
    cuda = getattr(xp, "cuda", None)
    if cuda is not None:
        cuda.get_current_stream().synchronize()
