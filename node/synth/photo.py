"""What the colour photograph phantoms (fundus, dermoscopy, blood smear) share: the RGB rendered image,
the colour Image Pixel module, the VL/OP image attributes and an optional JPEG baseline encoding.

Pixels are 8-bit RGB, (rows, columns, 3) uint8, written uncompressed with planar configuration 0
(colour-by-pixel), or as JPEG baseline (process 1) with YBR_FULL_422 when ``jpeg`` is set.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from .rendered import Box, RenderedImage
from .texture import F32, gaussian_noise


def rgb_image(
    rgb: np.ndarray,
    mask: np.ndarray,
    boxes: list[Box],
    labels: tuple[str, ...],
    pixel_spacing: float,
    attributes: dict[str, Any],
) -> RenderedImage:
    """A :class:`RenderedImage` of 8-bit RGB pixels (H, W, 3) with its lesion mask and boxes."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise TypeError(f"colour pixels must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    return RenderedImage(
        pixels=np.ascontiguousarray(rgb),
        mask=mask,
        boxes=tuple(boxes),
        labels=labels,
        photometric="RGB",
        bits_stored=8,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        window_center=127.5,
        window_width=256.0,
        pixel_spacing=(pixel_spacing, pixel_spacing),
        attributes=attributes,
    )


def to_rgb8(field: np.ndarray, rng: np.random.Generator, noise: float = 1.5) -> np.ndarray:
    """A float (H, W, 3) image in 0..255 plus a little sensor noise, rounded to uint8."""
    out = field.astype(F32, copy=True)
    if noise > 0:
        out += F32(noise) * gaussian_noise(rng, out.shape)
    out += F32(0.5)
    np.clip(out, F32(0), F32(255.49), out=out)
    return out.astype(np.uint8)


def jpeg_baseline_frame(rgb: np.ndarray, quality: int = 92) -> bytes:
    """One JPEG baseline (process 1) frame of an RGB image, 4:2:2 chroma subsampling (YBR_FULL_422)."""
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        int(quality),
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
        cv2.IMWRITE_JPEG_OPTIMIZE,
        0,
        cv2.IMWRITE_JPEG_PROGRESSIVE,
        0,
    ]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise ValueError("OpenCV could not encode the JPEG frame")
    return buf.tobytes()


def add_colour_pixel(ds: Dataset, image: RenderedImage, jpeg: bool = False) -> None:
    """Image Pixel module of an 8-bit RGB image: uncompressed RGB (planar configuration 0), or a JPEG
    baseline frame (photometric YBR_FULL_422) when ``jpeg`` (the file meta must then name
    JPEG Baseline: see :func:`transfer_syntax`)."""
    px = image.pixels
    if px.dtype != np.uint8 or px.ndim != 3 or px.shape[2] != 3:
        raise TypeError(f"colour pixels must be uint8 (H, W, 3), got {px.dtype} {px.shape}")
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(px.shape[0]), int(px.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if jpeg:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        frame = jpeg_baseline_frame(px)
        ds.LossyImageCompressionRatio = f"{px.nbytes / len(frame):.2f}"[:16]
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
    else:
        ds.PhotometricInterpretation = "RGB"
        ds.LossyImageCompression = "00"
        ds.PixelData = px.tobytes()


def transfer_syntax(ds: Dataset) -> str | None:
    """The transfer syntax a colour dataset needs (JPEG Baseline for a YBR_FULL_422 frame), else None."""
    return JPEGBaseline8Bit if ds.get("PhotometricInterpretation") == "YBR_FULL_422" else None


def add_vl_image(ds: Dataset, image_type: list[str]) -> None:
    """The image attributes the VL and OP image modules share (besides the pixel module)."""
    ds.ImageType = image_type
    ds.PatientOrientation = ""
    ds.AcquisitionDateTime = f"{ds.AcquisitionDate}{ds.AcquisitionTime}"
    ds.AcquisitionContextSequence = []


def soft_disc(shape: tuple[int, int], cx: float, cy: float, radius: float, edge: float) -> np.ndarray:
    """Soft indicator (float32, 0..1) of a disc in pixel coordinates with a linear edge ``edge`` wide."""
    y, x = np.ogrid[: shape[0], : shape[1]]
    r = np.sqrt((x - F32(cx)) ** 2 + (y - F32(cy)) ** 2, dtype=F32)
    return np.clip((F32(radius) - r) / F32(max(edge, 1e-3)) + F32(0.5), F32(0), F32(1))


def paint(img: np.ndarray, alpha: np.ndarray, colour: tuple[float, float, float]) -> None:
    """Blend ``colour`` into the float RGB image ``img`` in place with the per-pixel weight ``alpha``."""
    a = alpha[..., None]
    img *= F32(1) - a
    img += a * np.asarray(colour, dtype=F32)


def blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a sigma in pixels (no-op below a tenth of a pixel)."""
    if sigma < 0.1:
        return field
    return cv2.GaussianBlur(field, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
