"""In-memory results of rendering a phantom: pixels as stored in DICOM plus what is needed to read them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Box:
    """A lesion's bounding box on one image, in stored-pixel coordinates.

    ``x`` is the column and ``y`` the row; ``x0, y0`` are inclusive and ``x1, y1`` exclusive, so the
    pixels are ``pixels[y0:y1, x0:x1]``.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    lesion: int
    label: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "lesion": self.lesion,
            "label": self.label,
            "x0": self.x0,
            "y0": self.y0,
            "x1": self.x1,
            "y1": self.y1,
        }


@dataclass(frozen=True)
class Lesion:
    """One lesion of a study: its id (the value it takes in masks), label, type and shape description."""

    id: int
    label: str
    type: str
    shape: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"id": self.id, "label": self.label, "type": self.type, "shape": self.shape}


@dataclass(eq=False)
class RenderedImage:
    """One image (one DICOM instance): stored pixel values and how to interpret them.

    ``pixels`` holds exactly the values written to Pixel Data (uint16, or int16 for CT);
    modality values are ``pixels * rescale_slope + rescale_intercept``. ``mask`` has the same shape
    and holds the lesion id (see :class:`Lesion`) of each pixel, 0 for none. ``attributes`` carries
    per-image header values (view, laterality, image position, ...) used when writing DICOM.
    """

    pixels: np.ndarray
    mask: np.ndarray
    boxes: tuple[Box, ...]
    labels: tuple[str, ...]
    photometric: str
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float
    window_center: float
    window_width: float
    pixel_spacing: tuple[float, float]
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        """Whether the stored values are signed (Pixel Representation 1)."""
        return bool(np.issubdtype(self.pixels.dtype, np.signedinteger))

    def modality_values(self) -> np.ndarray:
        """Pixels after the modality LUT (e.g. Hounsfield units for CT), as float32."""
        out = self.pixels.astype(np.float32)
        if self.rescale_slope != 1.0:
            out *= np.float32(self.rescale_slope)
        if self.rescale_intercept != 0.0:
            out += np.float32(self.rescale_intercept)
        return out


@dataclass(eq=False)
class RenderedStudy:
    """A rendered study: one entry of ``images`` per DICOM instance, in instance order.

    For ct and mr the images are the slices of one series (``stack()`` returns the volume);
    for mammo they are the four views; for cxr there is one image. ``labels`` are the study-level
    labels; ``lesions`` describes every lesion referenced by masks and boxes; ``geometry`` holds
    series-level values such as slice thickness.
    """

    kind: str
    seed: int
    labels: tuple[str, ...]
    images: list[RenderedImage]
    lesions: tuple[Lesion, ...]
    geometry: dict[str, Any] = field(default_factory=dict)

    def stack(self) -> tuple[np.ndarray, np.ndarray]:
        """``(pixels, masks)`` of all images stacked along a new first axis."""
        return np.stack([im.pixels for im in self.images]), np.stack([im.mask for im in self.images])
