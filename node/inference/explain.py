"""Heatmaps in source-image pixels and score aggregation.

- CAM: a (N, C, h, w) output of a global-average-pool + linear head (CAM equals Grad-CAM up to a
  scale there), upsampled, the letterbox undone, normalised 0..1.
- Patch map: the model run over tiles of the full (preprocessed) image, scores stitched.
- Occlusion: a mean-valued window slid over the input; the map is the drop in score.
- Hotspots: the peak (row, col) and the region around it (box and polygon).
- Aggregation of per-image scores into a series/study score, and which slices to keep.

Model calls are passed in as ``predict`` callables (batch in model layout -> (N, n_labels)
probabilities), so this module does not depend on the runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import cv2
import numpy as np

from node.errors import InferenceError
from node.inference.manifest import CamHeatmap, Manifest, OcclusionHeatmap, PatchHeatmap
from node.inference.preprocess import stitch, tile, tile_origins
from node.types import Geometry, Heatmap, Hotspot, ModelInput

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]
Normalization = Literal["relu_max", "minmax"]


# ------------------------------------------------------------------------------------------------
# Mapping and normalisation


def normalize_map(
    values: np.ndarray, method: Normalization = "relu_max", *, in_place: bool = False
) -> np.ndarray:
    """Scale a map to 0..1: ``relu_max`` clips negatives and divides by the max (Grad-CAM);
    ``minmax`` maps [min, max] to [0, 1]. A flat map becomes zeros. ``in_place``: a float32
    ``values`` is overwritten and returned (the same values; no source-sized temporary)."""
    m = np.asarray(values, dtype=np.float32)
    own = in_place and m is values
    if method == "relu_max":
        m = np.maximum(m, 0.0, out=m if own else None)
        top = float(m.max()) if m.size else 0.0
        if not top > 0:
            return _zeros(m, own)
        m /= top  # in place: the same float32 division as ``m / top``, one array fewer
        return m
    lo, hi = float(m.min()), float(m.max())
    if not hi > lo:
        return _zeros(m, own)
    out = m if own else m.copy()
    out -= lo
    out /= hi - lo
    return out


def _zeros(m: np.ndarray, own: bool) -> np.ndarray:
    if own:
        m.fill(0.0)
        return m
    return np.zeros_like(m)


def map_to_source(values: np.ndarray, geometry: Geometry, out: np.ndarray | None = None) -> np.ndarray:
    """Resample a (h, w) map over the model input onto the source image (H, W).

    The map may be coarser than the model input (a CAM of 7x7 for 224x224): map pixel i covers
    model pixels [i * model_h / h, (i + 1) * model_h / h). Letterbox padding and resizing are
    undone through ``geometry`` with one bilinear affine warp (edges replicated). ``out``: a
    C-contiguous float32 (H, W) array to warp into (returned), instead of a new one.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise InferenceError(f"map_to_source needs a 2-D map (found shape {values.shape})")
    h, w = values.shape
    mh, mw = geometry.model_shape
    sh, sw = geometry.source_shape
    fy, fx = h / mh, w / mw
    a_y, a_x = geometry.scale_y * fy, geometry.scale_x * fx
    b_y = (0.5 * geometry.scale_y + geometry.offset_y) * fy - 0.5
    b_x = (0.5 * geometry.scale_x + geometry.offset_x) * fx - 0.5
    matrix = np.array([[a_x, 0.0, b_x], [0.0, a_y, b_y]], dtype=np.float64)
    flags, border = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, cv2.BORDER_REPLICATE
    if out is None:
        return cv2.warpAffine(values, matrix, (sw, sh), flags=flags, borderMode=border)
    if out.shape != (sh, sw) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise InferenceError(f"map_to_source: out must be C-contiguous float32 {(sh, sw)}, found {out.shape}")
    cv2.warpAffine(values, matrix, (sw, sh), dst=out, flags=flags, borderMode=border)
    return out


def cam_to_source(
    cam: np.ndarray,
    geometry: Geometry,
    indices: Sequence[int],
    normalize: Normalization = "relu_max",
) -> np.ndarray:
    """CAM output (1, C, h, w) or (C, h, w) -> (len(indices), H, W) maps in source pixels, 0..1."""
    cam = np.asarray(cam, dtype=np.float32)
    if cam.ndim == 4:
        if cam.shape[0] != 1:
            raise InferenceError(f"cam_to_source takes one image's CAM (found batch {cam.shape[0]})")
        cam = cam[0]
    if cam.ndim != 3:
        raise InferenceError(f"CAM must be (C, h, w) (found shape {cam.shape})")
    return _source_maps(
        [cam[i] for i in indices], geometry, lambda m: normalize_map(m, normalize, in_place=True)
    )


def _source_maps(
    maps: Sequence[np.ndarray], geometry: Geometry, finish: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """(len(maps), H, W): each map warped onto the source straight into its plane of one array
    and ``finish``-ed there (in place), rather than a source-sized array per map stacked after."""
    sh, sw = geometry.source_shape
    out = np.empty((len(maps), sh, sw), dtype=np.float32)
    for plane, values in zip(out, maps, strict=True):
        done = finish(map_to_source(values, geometry, out=plane))
        if done is not plane:
            plane[...] = done
    return out


# ------------------------------------------------------------------------------------------------
# Model-driven maps


def _to_hwc(tensor: np.ndarray, layout: str) -> np.ndarray:
    t = np.asarray(tensor)
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise InferenceError(f"expected a single image (found batch {t.shape[0]})")
        t = t[0]
    return t.transpose(1, 2, 0) if layout == "NCHW" else t


def _from_hwc(batch: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2) if layout == "NCHW" else batch)


def _predict_batched(predict: Predict, batch: np.ndarray, batch_size: int) -> np.ndarray:
    outs = [np.asarray(predict(batch[i : i + batch_size])) for i in range(0, batch.shape[0], batch_size)]
    return np.concatenate(outs).astype(np.float32)


def patch_scores(
    tensor: np.ndarray,
    predict: Predict,
    patch: tuple[int, int],
    stride: tuple[int, int],
    *,
    batch_size: int = 32,
    layout: str = "NCHW",
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Run a patch classifier over tiles of a full preprocessed image (1, C, H, W) in batches.

    Returns the per-patch scores (n_patches, n_labels) and the patches' top-left origins; the
    image-level score of a patch model is usually ``scores.max(axis=0)``.
    """
    img = _to_hwc(tensor, layout)
    patches, origins = tile(img, patch, stride)
    log.debug("patch scores: %d patches of %s, stride %s", len(origins), patch, stride)
    return _predict_batched(predict, _from_hwc(patches, layout), batch_size), origins


def stitch_scores(
    scores: np.ndarray, origins: Sequence[tuple[int, int]], patch: tuple[int, int], shape: tuple[int, int]
) -> np.ndarray:
    """Per-patch scores (n_patches, n_labels) -> (n_labels, H, W) maps, overlaps averaged."""
    scores = np.asarray(scores, dtype=np.float32)
    return np.stack([stitch(scores[:, j], origins, patch, shape) for j in range(scores.shape[1])])


def patch_heatmap(
    tensor: np.ndarray,
    predict: Predict,
    patch: tuple[int, int],
    stride: tuple[int, int],
    *,
    batch_size: int = 32,
    layout: str = "NCHW",
) -> np.ndarray:
    """Patch-classifier map of a full preprocessed image (1, C, H, W): (n_labels, H, W) in
    model-input pixels (map it with ``map_to_source``); each pixel is the mean score of the
    patches covering it."""
    scores, origins = patch_scores(tensor, predict, patch, stride, batch_size=batch_size, layout=layout)
    img = _to_hwc(tensor, layout)
    return stitch_scores(scores, origins, patch, (img.shape[0], img.shape[1]))


def occlusion_heatmap(
    tensor: np.ndarray,
    predict: Predict,
    window: tuple[int, int],
    stride: tuple[int, int],
    *,
    batch_size: int = 32,
    layout: str = "NCHW",
) -> np.ndarray:
    """Occlusion sensitivity: slide a window filled with the image's per-channel mean; the map is
    ``score(original) - score(occluded)`` averaged over the windows covering each pixel.

    Returns (n_labels, H, W) in model-input pixels (raw drops; normalise with ``normalize_map``).
    """
    img = _to_hwc(tensor, layout)
    h, w = img.shape[:2]
    base = np.asarray(predict(_from_hwc(img[np.newaxis], layout)), dtype=np.float32)[0]
    fill = img.reshape(-1, img.shape[-1]).mean(axis=0).astype(img.dtype)
    origins = tile_origins((h, w), window, stride)
    wh, ww = min(window[0], h), min(window[1], w)
    drops = []
    for start in range(0, len(origins), batch_size):
        chunk = origins[start : start + batch_size]
        batch = np.repeat(img[np.newaxis], len(chunk), axis=0)
        for k, (y, x) in enumerate(chunk):
            batch[k, y : y + wh, x : x + ww] = fill
        drops.append(base[np.newaxis] - np.asarray(predict(_from_hwc(batch, layout)), dtype=np.float32))
    return stitch_scores(np.concatenate(drops), origins, (wh, ww), (h, w))


# ------------------------------------------------------------------------------------------------
# Hotspots


def find_hotspot(values: np.ndarray, rel_threshold: float = 0.5) -> Hotspot | None:
    """Peak of a (H, W) map and the 8-connected region around it where ``value >= rel_threshold * peak``.

    Returns None for a map with no positive value. The polygon is the region's outer contour
    through boundary pixel centres as (row, col), not closed.

    Work beyond the two full-resolution comparisons is done where the answer lies: the peak's
    flat top and then the region are flood-filled from the peak (which gives each one's box),
    and the region is traced within its box and a pixel around it. The result is that of
    labelling and tracing the whole map, which took ~5x as long on a source-sized
    (2140 x 1760) map.
    """
    m = np.asarray(values, dtype=np.float32)
    if m.ndim != 2 or m.size == 0:
        raise InferenceError(f"find_hotspot needs a 2-D map (found shape {m.shape})")
    flat = int(np.argmax(m))
    peak = float(m.flat[flat])
    if not np.isfinite(peak) or peak <= 0:
        return None
    r, c = divmod(flat, m.shape[1])
    r, c = _top_centre(m >= peak, r, c)
    mask = (m >= rel_threshold * peak).view(np.uint8)  # 0 / 1, a fresh array
    # the 8-connected component of ``mask`` holding the peak becomes 2; its box comes back
    _, _, _, (x, y, w, h) = cv2.floodFill(mask, None, (c, r), 2, 0, 0, 8)
    box = (int(y), int(x), int(y + h - 1), int(x + w - 1))
    y0, x0 = max(y - 1, 0), max(x - 1, 0)  # the box and a pixel around it, within the map
    y1, x1 = min(y + h + 1, m.shape[0]), min(x + w + 1, m.shape[1])
    region = (mask[y0:y1, x0:x1] == 2).view(np.uint8)
    traced = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(int(x0), int(y0)))
    contours = traced[0]
    polygon: tuple[tuple[float, float], ...] = ()
    if contours:
        largest = max(contours, key=cv2.contourArea)
        polygon = tuple((float(p[0][1]), float(p[0][0])) for p in largest)
    return Hotspot(peak_row=int(r), peak_col=int(c), peak_value=peak, box=box, polygon=polygon)


def _top_centre(top: np.ndarray, r: int, c: int) -> tuple[int, int]:
    """The pixel of the flat top holding (r, c) (``top``: a fresh bool array, where the map
    equals its peak; filled in here) nearest to that top's centroid. A flat top (patch maps are
    constant over stride-sized blocks) would otherwise put the peak on its first, top-left
    pixel."""
    top8 = top.view(np.uint8)
    _, _, _, (x, y, w, h) = cv2.floodFill(top8, None, (c, r), 2, 0, 0, 8)  # (r, c)'s top: 2
    if w * h == 1:
        return r, c
    ys, xs = np.nonzero(top8[y : y + h, x : x + w] == 2)
    ys, xs = ys + y, xs + x  # in the map's raster order, as over the whole map
    k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(ys[k]), int(xs[k])


# ------------------------------------------------------------------------------------------------
# Putting it together for one image


def heatmaps(
    manifest: Manifest,
    model_input: ModelInput,
    outputs: Mapping[str, np.ndarray],
    predict: Predict | None = None,
    *,
    labels: Sequence[str] | None = None,
    rel_threshold: float = 0.5,
    patch_result: tuple[np.ndarray, list[tuple[int, int]]] | None = None,
) -> list[Heatmap]:
    """Per-label heatmaps in source pixels for one image, as the manifest's ``heatmap`` says.

    ``outputs``: that image's model outputs (batch of one), needed for ``cam``. ``predict``
    (batch -> (N, n_labels) probabilities in label order) is needed for ``patch`` and ``occlusion``.
    ``labels``: names to map (default: every non-normal label). ``patch_result``: the
    ``patch_scores`` already computed for this image (the runner's classification pass), reused.
    For ``patch``, ``model_input`` is the full preprocessed image (``prepare(check_size=False)``).
    """
    spec = manifest.heatmap
    wanted = [
        lb for lb in manifest.labels if (labels is None and not lb.normal) or (labels and lb.name in labels)
    ]
    if not wanted or spec.method == "none":
        return []
    geometry = model_input.geometry
    pos = {lb.name: i for i, lb in enumerate(manifest.labels)}
    if isinstance(spec, CamHeatmap):
        cam = outputs.get(manifest.outputs.cam or "")
        if cam is None:
            raise InferenceError(
                f"model {manifest.id}: CAM output {manifest.outputs.cam!r} missing from outputs"
            )
        maps = cam_to_source(cam, geometry, [lb.index for lb in wanted], spec.normalize)
    elif isinstance(spec, PatchHeatmap):
        # patch scores are probabilities already: keep them absolute (not rescaled to the max)
        if patch_result is None:
            if predict is None:
                raise InferenceError(f"model {manifest.id}: heatmap method 'patch' needs a predict function")
            patch_result = patch_scores(
                model_input.tensor,
                predict,
                spec.patch_size,
                spec.stride,
                batch_size=spec.batch_size,
                layout=model_input.layout,
            )
        scores, origins = patch_result
        shape = model_input.geometry.model_shape
        model_maps = stitch_scores(scores, origins, spec.patch_size, shape)
        maps = _source_maps(
            [model_maps[pos[lb.name]] for lb in wanted], geometry, lambda m: np.clip(m, 0, 1, out=m)
        )
    elif isinstance(spec, OcclusionHeatmap):
        if predict is None:
            raise InferenceError(f"model {manifest.id}: heatmap method 'occlusion' needs a predict function")
        model_maps = occlusion_heatmap(
            model_input.tensor,
            predict,
            spec.window,
            spec.stride,
            batch_size=spec.batch_size,
            layout=model_input.layout,
        )
        maps = _source_maps(
            [model_maps[pos[lb.name]] for lb in wanted], geometry, lambda m: normalize_map(m, in_place=True)
        )
    else:  # pragma: no cover - the schema admits no other method
        raise InferenceError(f"model {manifest.id}: unknown heatmap method {spec.method!r}")
    return [
        Heatmap(
            label=lb.name, values=maps[i], method=spec.method, hotspot=find_hotspot(maps[i], rel_threshold)
        )
        for i, lb in enumerate(wanted)
    ]


# ------------------------------------------------------------------------------------------------
# Aggregation


def aggregate(
    scores: np.ndarray, method: Literal["max", "mean", "top_k_mean"] = "max", k: int | None = None
) -> np.ndarray:
    """Series/study score per label from per-image scores (n_images, n_labels) (or (n_images,))."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 0 or s.shape[0] == 0:
        raise InferenceError("aggregate needs at least one image score")
    if method == "max":
        out = s.max(axis=0)
    elif method == "mean":
        out = s.mean(axis=0)
    elif method == "top_k_mean":
        if k is None or k < 1:
            raise InferenceError(f"top_k_mean needs k >= 1 (found {k})")
        kk = min(k, s.shape[0])
        out = -np.sort(-s, axis=0)[:kk].mean(axis=0)
    else:
        raise InferenceError(f"unknown aggregation method {method!r}")
    return np.asarray(out, dtype=np.float32)


def top_slices(scores: Sequence[float] | np.ndarray, keep: int) -> list[int]:
    """Indices of the ``keep`` highest-scoring images, highest first (ties: earlier index first)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="stable")
    return [int(i) for i in order[: max(0, keep)]]
