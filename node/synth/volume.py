"""3-D phantom building blocks shared by CT and MR: voxel grid, ellipsoids, a soft-edged painter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .texture import F32


@dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates in mm: ``x``/``y`` in the axial plane and ``d`` along the slice axis."""

    x: np.ndarray  # (cols,)
    y: np.ndarray  # (rows,)
    d: np.ndarray  # (slices,): depth for CT, height for MR

    def box(
        self, cx: float, cy: float, rx: float, ry: float, d0: float, d1: float
    ) -> tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """Index slices and broadcastable coordinates of the voxels within an axis-aligned box."""
        ix = np.flatnonzero(np.abs(self.x - cx) <= rx)
        iy = np.flatnonzero(np.abs(self.y - cy) <= ry)
        iz = np.flatnonzero((self.d >= d0) & (self.d <= d1))
        if ix.size == 0 or iy.size == 0 or iz.size == 0:
            return None
        sl = (slice(iz[0], iz[-1] + 1), slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1))
        return sl, self.x[sl[2]][None, None, :], self.y[sl[1]][None, :, None], self.d[sl[0]][:, None, None]


@dataclass(frozen=True)
class Blob:
    """An ellipsoid in (x, y, depth) mm, rotated by ``angle`` in the axial plane."""

    cx: float
    cy: float
    dc: float
    rx: float
    ry: float
    rz: float
    angle: float = 0.0

    def radius(self, x: np.ndarray, y: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Normalised ellipsoidal radius (1 on the surface)."""
        c, s = F32(math.cos(self.angle)), F32(math.sin(self.angle))
        dx, dy = x - F32(self.cx), y - F32(self.cy)
        u = (dx * c + dy * s) / F32(self.rx)
        v = (-dx * s + dy * c) / F32(self.ry)
        w = (d - F32(self.dc)) / F32(self.rz)
        return np.sqrt(u * u + v * v + w * w)

    @property
    def reach(self) -> float:
        """Largest in-plane half-extent (for bounding boxes)."""
        return max(self.rx, self.ry)


class Painter:
    """Paints soft-edged ellipsoids into a volume (HU, or MR signal), optionally with surface irregularity."""

    def __init__(self, vol: np.ndarray, grid: Grid, edge_mm: float, wobble: np.ndarray) -> None:
        self.vol = vol
        self.grid = grid
        self.edge = edge_mm
        self.wobble = wobble  # full-volume smooth noise, unit std

    def occupancy(
        self, blob: Blob, irregular: float = 0.0, edge: float | None = None
    ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Soft occupancy (0..1) of ``blob`` on its bounding box, or None if it misses the volume."""
        pad = 1.0 + irregular * 2.5
        hit = self.grid.box(
            blob.cx,
            blob.cy,
            blob.reach * pad + 2,
            blob.reach * pad + 2,
            blob.dc - blob.rz * pad,
            blob.dc + blob.rz * pad,
        )
        if hit is None:
            return None
        sl, x, y, d = hit
        r = blob.radius(x, y, d)
        if irregular:
            r = r * (F32(1.0) + F32(irregular) * self.wobble[sl])
        size = min(blob.rx, blob.ry, blob.rz)
        occ = np.clip((F32(1.0) - r) * F32(size / (edge or self.edge)) + F32(0.5), F32(0.0), F32(1.0))
        return sl, occ

    def paint(
        self,
        blob: Blob,
        value: float,
        irregular: float = 0.0,
        within: np.ndarray | None = None,
        only_below: float | None = None,
    ) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Blend ``value`` into the volume where ``blob`` is, restricted to ``within`` (soft mask) and
        to voxels currently below ``only_below`` when given (e.g. to keep bowel in the fat)."""
        got = self.occupancy(blob, irregular)
        if got is None:
            return None
        sl, occ = got
        region = self.vol[sl]
        if within is not None:
            occ = occ * within[sl]
        if only_below is not None:
            occ = occ * (region < F32(only_below))
        region += (F32(value) - region) * occ
        return sl, occ
