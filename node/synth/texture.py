"""Vectorised building blocks for phantoms: seeded streams, band-limited noise, soft shapes, resampling.

Everything here works in float32 with numpy and OpenCV and is deterministic for a given generator.
Geometry is expressed in millimetres on a grid with a given spacing; pixel ``(row, col)`` covers the
square whose centre is at ``((col + 0.5) * spacing, (row + 0.5) * spacing)`` from the grid origin.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

F32 = np.float32

#: A point in mm: an (x, y) pair or a 2-vector.
Point = tuple[float, float] | np.ndarray


def rng_stream(seed: int, name: str) -> np.random.Generator:
    """An independent random generator for ``(seed, name)``.

    Phantoms draw anatomy, lesions, noise and acquisition parameters from separate named streams,
    so that e.g. the same seed rendered with and without a lesion has identical anatomy and noise.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("ascii"))])


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a batch started from ``seed`` (independent of other batches)."""
    state = np.random.SeedSequence([int(seed), int(index), 0x5EED]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Band-limited 2-D noise with roughly unit standard deviation and features about ``cell`` pixels wide."""
    cell = max(float(cell), 1.0)
    rows, cols = int(shape[0]), int(shape[1])
    if cell <= 1.5:
        return rng.standard_normal((rows, cols), dtype=F32)
    gh, gw = int(np.ceil(rows / cell)) + 1, int(np.ceil(cols / cell)) + 1
    white = rng.standard_normal((gh, gw), dtype=F32)
    grid: np.ndarray = cv2.GaussianBlur(white, (0, 0), 0.75, borderType=cv2.BORDER_REFLECT)
    grid /= max(float(grid.std()), 1e-6)
    return cv2.resize(grid, (cols, rows), interpolation=cv2.INTER_CUBIC)


def fractal_noise(
    rng: np.random.Generator, shape: tuple[int, int], cells: tuple[float, ...], roughness: float = 0.5
) -> np.ndarray:
    """Sum of :func:`smooth_noise` octaves (coarse to fine), amplitude ``(cell/cells[0]) ** roughness``.

    ``roughness`` 0.5 gives an approximately 1/f^3 power spectrum, the classic model of
    fibroglandular and parenchymal texture. The result has roughly unit standard deviation.
    """
    out = np.zeros(shape, dtype=F32)
    total = 0.0
    for cell in cells:
        amp = (cell / cells[0]) ** roughness
        out += F32(amp) * smooth_noise(rng, shape, cell)
        total += amp * amp
    out *= F32(1.0 / np.sqrt(total))
    return out


def smooth_noise_3d(
    rng: np.random.Generator, shape: tuple[int, int, int], cell_xy: float, cell_z: float
) -> np.ndarray:
    """Band-limited 3-D noise (slices, rows, cols) with unit-ish std; smooth across slices as well."""
    nz, ny, nx = (int(s) for s in shape)
    gz = int(np.ceil(nz / max(cell_z, 1.0))) + 2
    coarse = rng.standard_normal(
        (gz, int(np.ceil(ny / cell_xy)) + 4, int(np.ceil(nx / cell_xy)) + 4), dtype=F32
    )
    planes = np.stack([smooth_from_grid(coarse[k], (ny, nx), cell_xy) for k in range(gz)])
    # linear interpolation along z between coarse planes
    pos = (np.arange(nz, dtype=F32) + 0.5) / max(cell_z, 1.0) + 0.5
    k0 = np.clip(np.floor(pos).astype(np.int64), 0, gz - 2)
    w = (pos - k0).astype(F32)[:, None, None]
    w = w * w * (3 - 2 * w)  # smoothstep keeps derivatives continuous at planes
    return planes[k0] * (1 - w) + planes[k0 + 1] * w


def smooth_from_grid(grid: np.ndarray, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Upsample a coarse white-noise grid (as drawn by :func:`smooth_noise_3d`) to ``shape``."""
    g: np.ndarray = cv2.GaussianBlur(grid, (0, 0), 0.75, borderType=cv2.BORDER_REFLECT)
    g /= max(float(g.std()), 1e-6)
    gh, gw = g.shape
    big = cv2.resize(g, (int(round(gw * cell)), int(round(gh * cell))), interpolation=cv2.INTER_CUBIC)
    off = int(round(1.5 * cell))
    return np.ascontiguousarray(big[off : off + shape[0], off : off + shape[1]])


def grid_mm(
    shape: tuple[int, int], spacing: float, x0: float = 0.0, y0: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable pixel-centre coordinates in mm: ``x`` of shape (1, cols), ``y`` of shape (rows, 1)."""
    x = (x0 + (np.arange(shape[1], dtype=F32) + F32(0.5)) * F32(spacing))[None, :]
    y = (y0 + (np.arange(shape[0], dtype=F32) + F32(0.5)) * F32(spacing))[:, None]
    return x, y


def ellipse_radius(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
) -> np.ndarray:
    """Normalised elliptical radius (1 on the outline) of points ``(x, y)``; ``angle`` in radians."""
    c, s = F32(np.cos(angle)), F32(np.sin(angle))
    dx, dy = x - F32(cx), y - F32(cy)
    u = (dx * c + dy * s) / F32(ax)
    v = (-dx * s + dy * c) / F32(ay)
    return np.sqrt(u * u + v * v)


def soft_inside(r: np.ndarray, size_mm: float, edge_mm: float) -> np.ndarray:
    """Soft indicator of ``r < 1`` for a normalised radius, with a linear edge ``edge_mm`` wide."""
    edge = max(edge_mm, 1e-3)
    return np.clip((F32(1.0) - r) * F32(size_mm / edge) + F32(0.5), F32(0.0), F32(1.0))


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (either order)."""
    t = np.clip((x - F32(edge0)) / F32(edge1 - edge0), F32(0.0), F32(1.0))
    return t * t * (F32(3.0) - F32(2.0) * t)


def resample(
    field: np.ndarray,
    field_spacing: float,
    out_shape: tuple[int, int],
    out_spacing: float,
    x0_mm: float = 0.0,
    y0_mm: float = 0.0,
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """Sample ``field`` (grid origin at 0 mm) on a grid of ``out_shape`` starting at ``(x0_mm, y0_mm)``."""
    k = out_spacing / field_spacing
    m = np.array(
        [
            [k, 0.0, (x0_mm + 0.5 * out_spacing) / field_spacing - 0.5],
            [0.0, k, (y0_mm + 0.5 * out_spacing) / field_spacing - 0.5],
        ],
        dtype=np.float64,
    )
    return cv2.warpAffine(
        field,
        m,
        (int(out_shape[1]), int(out_shape[0])),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def polar_streaks(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    facing: float,
    n_theta: int = 720,
    radial_cell: float = 24.0,
) -> np.ndarray:
    """Noise made of streaks radiating from ``(cx, cy)`` (mm); ``facing`` is the angle (rad) of the
    direction the streaks should spread into, which keeps the angular seam away from it."""
    r_max = 512
    noise = np.ascontiguousarray(smooth_noise(rng, (r_max, n_theta), 1.0).T)  # rows: theta, cols: radius
    src: np.ndarray = cv2.GaussianBlur(noise, (0, 0), sigmaX=radial_cell / 2.0, sigmaY=1.5)
    src /= max(float(src.std()), 1e-6)
    dx, dy = x - F32(cx), y - F32(cy)
    theta = np.arctan2(dy, dx) - F32(facing)
    theta = (theta + F32(np.pi)) % F32(2 * np.pi)  # seam at facing + pi
    map_t = (theta * F32(n_theta / (2 * np.pi))).astype(F32)
    rad = np.sqrt(dx * dx + dy * dy)
    map_r = np.clip(rad / max(float(rad.max()), 1e-3) * F32(r_max - 1), F32(0), r_max - 1).astype(F32)
    map_t, map_r = np.broadcast_arrays(map_t, map_r)
    return cv2.remap(
        src,
        np.ascontiguousarray(map_r),
        np.ascontiguousarray(map_t),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT,
    )


def mask_box(mask: np.ndarray, x_off: int = 0, y_off: int = 0) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` of non-zero pixels (x1, y1 exclusive), offset by the patch origin."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]) + x_off, int(rows[0]) + y_off, int(cols[-1]) + 1 + x_off, int(rows[-1]) + 1 + y_off)


def clip_patch(
    cx_px: float, cy_px: float, half_px: float, shape: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Integer patch ``(x0, y0, x1, y1)`` around a centre, clipped to an image of ``shape``."""
    x0 = max(int(np.floor(cx_px - half_px)), 0)
    y0 = max(int(np.floor(cy_px - half_px)), 0)
    x1 = min(int(np.ceil(cx_px + half_px)) + 1, int(shape[1]))
    y1 = min(int(np.ceil(cy_px + half_px)) + 1, int(shape[0]))
    return x0, y0, max(x1, x0), max(y1, y0)


def to_px(points_mm: np.ndarray, spacing: float) -> np.ndarray:
    """Convert (N, 2) ``(x, y)`` mm points to OpenCV pixel coordinates (pixel centres at integers)."""
    return np.asarray(points_mm, dtype=np.float64) / spacing - 0.5


def _fixed(points_px: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points_px) * 16.0).astype(np.int32).reshape(-1, 1, 2)


def draw_polyline(canvas: np.ndarray, points_px: np.ndarray, thickness_px: float, value: int = 255) -> None:
    """Draw an anti-aliased open polyline (sub-pixel precise) into a uint8 canvas in place."""
    cv2.polylines(
        canvas, [_fixed(points_px)], False, int(value), max(int(round(thickness_px)), 1), cv2.LINE_AA, shift=4
    )


def fill_polygon(canvas: np.ndarray, points_px: np.ndarray, value: int = 255) -> None:
    """Fill an anti-aliased polygon (sub-pixel precise) into a uint8 canvas in place."""
    cv2.fillPoly(canvas, [_fixed(points_px)], int(value), cv2.LINE_AA, shift=4)


def blur_mm(field: np.ndarray, sigma_mm: float, spacing: float) -> np.ndarray:
    """Gaussian blur with a sigma given in mm (no-op below a tenth of a pixel)."""
    sigma = sigma_mm / spacing
    if sigma < 0.1:
        return field
    return cv2.GaussianBlur(field, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)


def curve(p0: Point, p1: Point, p2: Point, n: int = 24) -> np.ndarray:
    """Points of the quadratic Bezier curve through control points p0, p1, p2 (as an (n, 2) array)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    a, b, c = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t**2 * c


def to_stored(field: np.ndarray, gain: float, offset: float, maxv: float) -> np.ndarray:
    """``round(clip(field * gain + offset, 0, maxv))`` as uint16, computed in place on ``field``."""
    field *= F32(gain)
    field += F32(offset + 0.5)  # + 0.5 and truncation = rounding for non-negative values
    np.clip(field, F32(0), F32(maxv + 0.49), out=field)
    return field.astype(np.uint16)


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance, approximately Gaussian float32 noise, several times faster than
    ``standard_normal``: the sum of four uniform bytes (Irwin-Hall), which is ample for image noise."""
    n = int(np.prod(shape))
    raw = np.frombuffer(rng.bytes(4 * n), dtype=np.uint8).reshape(4, n)
    acc = np.add(raw[0], raw[1], dtype=np.uint16)
    acc += raw[2]
    acc += raw[3]
    out = acc.astype(F32)
    out -= F32(510.0)
    out *= F32(1.0 / 147.80)  # std of the sum of four uniform bytes: sqrt(4 * (256**2 - 1) / 12)
    return out.reshape(shape)


def soft_ellipse(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    angle: float,
    size_mm: float,
    edge_mm: float,
) -> np.ndarray:
    """:func:`soft_inside` of an ellipse on the grid ``x`` (1, W), ``y`` (H, 1), evaluated only on the
    window that can be non-zero (zeros elsewhere)."""
    out = np.zeros((y.shape[0], x.shape[1]), dtype=F32)
    reach = max(ax, ay) * (1.0 + 0.5 * edge_mm / max(size_mm, 1e-3)) + edge_mm
    xs, ys = x[0], y[:, 0]
    sx = slice(*np.searchsorted(xs, [cx - reach, cx + reach]))
    sy = slice(*np.searchsorted(ys, [cy - reach, cy + reach]))
    if sx.start < sx.stop and sy.start < sy.stop:
        out[sy, sx] = soft_inside(ellipse_radius(x[:, sx], y[sy], cx, cy, ax, ay, angle), size_mm, edge_mm)
    return out
