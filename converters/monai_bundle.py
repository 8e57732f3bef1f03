"""MONAI bundles (the MONAI Model Zoo's packaging) to a node model folder.

A bundle is a folder with ``configs/metadata.json`` (``network_data_format``: the input image's
channels, spatial shape and modality; the output's channels and their meanings, ``channel_def``),
``configs/inference.json`` (``network_def``, the ``preprocessing`` transforms, the
``postprocessing`` activation) and ``models/model.pt`` (the weights). The network is instantiated
by MONAI's own ``ConfigParser``, exported by the torch converter (with its parity checks), and the
preprocessing transforms, instantiated the same way, are mapped one by one onto the node's
preprocessing ops:

========================================  =================================================
MONAI transform                           node steps
========================================  =================================================
LoadImage(d)                              ``modality_lut`` (MONAI's DICOM readers rescale);
                                          the readers index arrays (x, y): the exported graph
                                          swaps the node's (row, column) axes to match
EnsureChannelFirst(d), EnsureType(d),     nothing (the node feeds float32, channel first)
ToTensor(d), CastToType(d) float32,
Identity(d)
ScaleIntensityRange(d) clip=True          ``window`` (explicit: a_min..a_max -> 0..255), then
                                          ``normalize`` to b_min..b_max
ScaleIntensityRange(d) clip=False         ``normalize`` (the same linear map, unclipped)
NormalizeIntensity(d) with subtrahend     ``normalize`` (mean=subtrahend, std=divisor)
and divisor
Resize(d) (size_mode all, 2-D)            ``resize`` (area, bilinear, nearest, bicubic)
RepeatChannel(d)                          ``replicate_channels``
========================================  =================================================

Anything else (``Spacing``, ``Orientation``, per-image ``NormalizeIntensity`` or
``ScaleIntensity``, crops, ...) has no node op yet: the conversion is refused, naming each such
transform and the op it would need. 3-D bundles are refused (their volume preprocessing is not
mapped).

Segmentation bundles (a per-pixel output: ``network_data_format`` output type ``image`` /
``label``, or a network returning (batch, classes, H, W)) become 2-D ``kind: segmentation``
manifests: ``channel_def`` gives the labels and the background channel, the postprocessing's
``Activations(d)``, ``AsDiscrete(d)`` (argmax or threshold) and ``RemoveSmallObjects(d)`` the
activation, ``background_index``, thresholds and ``min_area_px``, and the inferer must be a
``SimpleInferer`` or a ``SlidingWindowInferer`` whose window is the whole resized image (see
:func:`segmentation_postprocessing`, :func:`check_inferer`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from converters.common import ConversionError

log = logging.getLogger(__name__)

#: MONAI Resize modes -> the node's resize interpolations (OpenCV, half-pixel centres like torch).
_RESIZE_MODES = {"area": "area", "bilinear": "linear", "nearest": "nearest", "bicubic": "cubic"}
#: Transforms that change nothing the node would see (type, device, channel-first bookkeeping).
_NO_OPS = {
    "EnsureChannelFirst",
    "AsChannelFirst",
    "AddChannel",
    "EnsureType",
    "ToTensor",
    "ToNumpy",
    "Identity",
    "ToDevice",
}
#: Why a known transform cannot be mapped: the node op it would need.
_NEEDS_OP = {
    "Spacing": "an op resampling to a pixel spacing in mm (from PixelSpacing)",
    "Orientation": "an op reorienting the image to axis codes (from ImageOrientationPatient)",
    "ScaleIntensity": "a per-image min-max scaling op (to_8bit image_percentile rounds to 8 bits)",
    "CropForeground": "a foreground-crop op",
    "CenterSpatialCrop": "a centre-crop op",
    "SpatialPad": "a padding op",
    "DivisiblePad": "a padding op",
    "Lambda": "an arbitrary function (no manifest op can express it)",
    "SqueezeDim": "an axis op",
    "Transpose": "an axis op",
    "Flip": "a flip op",
    "Rotate90": "a rotation op",
    "ScaleIntensityRangePercentiles": "a per-image percentile range op without 8-bit rounding",
    "HistogramNormalize": "a histogram-normalisation op",
}
_NORMAL_NAMES = {"normal", "no_finding", "nofinding", "background", "negative", "healthy", "none"}
_XR_MODALITIES = {"XR": ["CR", "DX"], "CXR": ["CR", "DX"], "X-RAY": ["CR", "DX"]}


@dataclass
class Mapped:
    """The bundle's preprocessing as node steps."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (height, width) in the node's row/column order
    channels: int = 1
    swap_xy: bool = True
    notes: list[str] = field(default_factory=list)


def _monai_name(transform: Any) -> tuple[str, str]:
    """(class name, array-transform name): ``ScaleIntensityRanged`` -> ``ScaleIntensityRange``."""
    name = type(transform).__name__
    base = name
    for suffix in ("Dict", "D", "d"):
        if name.endswith(suffix) and len(name) > len(suffix):
            base = name[: -len(suffix)]
            break
    return name, base


def _inner(transform: Any, attr: str) -> Any:
    """The array transform inside a dictionary transform (``Resized.resizer``), or itself."""
    return getattr(transform, attr, transform)


def _first(value: Any) -> Any:
    """The first element of a per-key tuple (dictionary transforms repeat options per key)."""
    if isinstance(value, (tuple, list)) and value:
        return value[0]
    return value


def _float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        import numpy as np

        arr = np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):
        return None
    if arr.size != 1:
        return None
    return float(arr[0])


def _reader_swaps(loader: Any) -> tuple[bool, str]:
    """Whether MONAI's LoadImage hands the network (x, y)-indexed arrays, and the reader's name."""
    readers = list(getattr(loader, "readers", []) or [])
    if getattr(loader, "auto_select", True) or not readers:
        return True, "auto (PydicomReader / ITKReader for DICOM)"
    reader = readers[-1]  # the one named in the config is registered last and tried first
    name = type(reader).__name__
    if name == "NumpyReader":
        return False, name
    for attr in ("swap_ij", "reverse_indexing"):
        if hasattr(reader, attr):
            return bool(getattr(reader, attr)), name
    return True, name


def map_transforms(transforms: Sequence[Any], image_key: str) -> Mapped:
    """Map instantiated MONAI transforms (array or dictionary) onto node preprocessing steps.

    Raises ConversionError naming every transform that cannot be mapped and the op it would need.
    """
    out = Mapped()
    refused: list[str] = []
    loaded = False
    for i, t in enumerate(transforms):
        name, base = _monai_name(t)
        keys = getattr(t, "keys", None)
        if keys is not None and image_key not in tuple(keys):
            out.notes.append(f"{name} (keys {list(keys)}): not on {image_key!r}, skipped")
            continue
        where = f"{name} (preprocessing transform {i})"
        if base == "LoadImage":
            swap, reader = _reader_swaps(_inner(t, "_loader"))
            out.swap_xy = swap
            out.steps.append({"op": "modality_lut"})
            loaded = True
            out.notes.append(
                f"{name} -> modality_lut (reader {reader}"
                + ("; its arrays are (x, y): the graph swaps the node's (row, column) axes)" if swap else ")")
            )
        elif base in _NO_OPS:
            out.notes.append(f"{name} -> (nothing to do)")
        elif base == "CastToType":
            dtype = str(_first(getattr(_inner(t, "converter"), "dtype", None)))
            if "float32" in dtype or dtype == "None":
                out.notes.append(f"{name} -> (the node feeds float32)")
            else:
                refused.append(f"{where}: casts to {dtype}; the node feeds float32 (a cast op)")
        elif base == "ScaleIntensityRange":
            s = _inner(t, "scaler")
            a_min, a_max = _float(s.a_min), _float(s.a_max)
            b_min, b_max = _float(s.b_min), _float(s.b_max)
            if None in (a_min, a_max, b_min, b_max):
                refused.append(f"{where}: a_min/a_max/b_min/b_max must all be numbers")
                continue
            assert a_min is not None and a_max is not None and b_min is not None and b_max is not None
            if a_max <= a_min or b_max <= b_min:
                refused.append(f"{where}: needs a_max > a_min and b_max > b_min (an inverting scale op)")
                continue
            if bool(s.clip):
                # window explicit: c - 0.5 -/+ (w - 1) / 2 = a_min / a_max, a clipped ramp to 0..255
                out.steps.append(
                    {
                        "op": "window",
                        "source": "explicit",
                        "center": (a_min + a_max) / 2 + 0.5,
                        "width": a_max - a_min + 1.0,
                    }
                )
                span = b_max - b_min
                out.steps.append(
                    {
                        "op": "normalize",
                        "mean": [-b_min / span],
                        "std": [1.0 / span],
                        "max_pixel_value": 255.0,
                    }
                )
                out.notes.append(
                    f"{name} [{a_min:g}, {a_max:g}] -> [{b_min:g}, {b_max:g}] clipped -> window + normalize"
                )
            else:
                k = (b_max - b_min) / (a_max - a_min)
                out.steps.append(
                    {"op": "normalize", "mean": [a_min - b_min / k], "std": [1.0 / k], "max_pixel_value": 1.0}
                )
                out.notes.append(f"{name} [{a_min:g}, {a_max:g}] -> [{b_min:g}, {b_max:g}] -> normalize")
        elif base == "NormalizeIntensity":
            n = _inner(t, "normalizer")
            sub, div = _float(n.subtrahend), _float(n.divisor)
            if n.subtrahend is None or n.divisor is None or bool(n.nonzero):
                refused.append(
                    f"{where}: per-image statistics (subtrahend/divisor not given, or nonzero=True) "
                    "need a per-image mean/std (z-score) op"
                )
            elif sub is None or div is None or div <= 0:
                refused.append(f"{where}: one subtrahend and one positive divisor are needed")
            else:
                out.steps.append({"op": "normalize", "mean": [sub], "std": [div], "max_pixel_value": 1.0})
                out.notes.append(f"{name} (x - {sub:g}) / {div:g} -> normalize")
        elif base == "Resize":
            r = _inner(t, "resizer")
            size = [
                int(v) for v in (r.spatial_size if isinstance(r.spatial_size, Sequence) else [r.spatial_size])
            ]
            mode = str(_first(getattr(t, "mode", r.mode)))
            mode = getattr(_first(getattr(t, "mode", r.mode)), "value", mode)
            anti = bool(_first(getattr(t, "anti_aliasing", r.anti_aliasing)))
            align = _first(getattr(t, "align_corners", r.align_corners))
            if len(size) != 2:
                refused.append(f"{where}: spatial_size {size} is not 2-D (the node's input is one 2-D image)")
            elif r.size_mode != "all" or min(size) <= 0:
                refused.append(
                    f"{where}: size_mode {r.size_mode!r} / spatial_size {size} need a fixed 2-D size"
                )
            elif mode not in _RESIZE_MODES:
                refused.append(f"{where}: mode {mode!r} has no node interpolation")
            elif anti or align:
                refused.append(f"{where}: anti_aliasing / align_corners need a resize op that does them")
            else:
                out.size = (size[1], size[0]) if out.swap_xy else (size[0], size[1])
                out.steps.append(
                    {"op": "resize", "size": list(out.size), "interpolation": _RESIZE_MODES[mode]}
                )
                out.notes.append(f"{name} {size} ({mode}) -> resize {list(out.size)} (rows, columns)")
        elif base == "RepeatChannel":
            repeats = int(getattr(_inner(t, "repeater"), "repeats", 0))
            if repeats < 2:
                refused.append(f"{where}: repeats {repeats}")
            else:
                out.channels = repeats
                out.steps.append({"op": "replicate_channels", "channels": repeats})
                out.notes.append(f"{name} x{repeats} -> replicate_channels")
        else:
            need = _NEEDS_OP.get(base) or _NEEDS_OP.get(name)
            refused.append(f"{where}: " + (f"needs {need}" if need else "no node preprocessing op does this"))
    if not loaded and not refused:
        refused.append(
            "the preprocessing has no LoadImage(d) for the image key: the node cannot tell what it reads"
        )
    if refused:
        raise ConversionError(
            "cannot map the bundle's preprocessing onto the node's preprocessing ops: " + "; ".join(refused)
        )
    if out.size is None:
        raise ConversionError(
            "the bundle's preprocessing has no Resize(d): the node feeds the model a fixed input size; "
            "add a Resized transform to configs/inference.json"
        )
    return out


# ------------------------------------------------------------------------------------------------
# Reading the bundle


@dataclass
class Bundle:
    """What the converter reads from a bundle folder."""

    root: Path
    metadata: dict[str, Any]
    parser: Any  # monai.bundle.ConfigParser

    @property
    def input_key(self) -> str:
        """The network input's key (``image`` in most bundles)."""
        inputs = self.metadata.get("network_data_format", {}).get("inputs", {}) or {"image": {}}
        return next(iter(inputs))

    @property
    def input_format(self) -> dict[str, Any]:
        """``network_data_format.inputs.<key>``."""
        return dict(self.metadata.get("network_data_format", {}).get("inputs", {}).get(self.input_key, {}))

    @property
    def output_format(self) -> dict[str, Any]:
        """``network_data_format.outputs.<first key>``."""
        outputs = self.metadata.get("network_data_format", {}).get("outputs", {}) or {"pred": {}}
        return dict(next(iter(outputs.values())))


def _monai() -> Any:
    try:
        import monai.bundle
    except ModuleNotFoundError as exc:
        raise ConversionError("MONAI is not installed: pip install -e '.[convert]'") from exc
    return monai


def read_bundle(root: Path) -> Bundle:
    """Parse ``configs/metadata.json`` and ``configs/inference.json`` with MONAI's ConfigParser."""
    monai = _monai()
    meta_path, conf_path = root / "configs" / "metadata.json", root / "configs" / "inference.json"
    for path in (meta_path, conf_path):
        if not path.is_file():
            raise ConversionError(f"{root} is not a MONAI bundle: {path.relative_to(root)} is missing")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{meta_path}: cannot read JSON: {exc}") from exc
    parser = monai.bundle.ConfigParser()
    try:
        parser.read_meta(str(meta_path))
        parser.read_config(str(conf_path))
    except Exception as exc:
        raise ConversionError(f"{conf_path}: MONAI cannot read it: {type(exc).__name__}: {exc}") from exc
    parser["bundle_root"] = str(root)
    return Bundle(root, metadata, parser)


def _parsed(bundle: Bundle, key: str) -> Any:
    try:
        return bundle.parser.get_parsed_content(key)
    except Exception as exc:
        raise ConversionError(
            f"configs/inference.json: MONAI cannot build {key!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def bundle_network(bundle: Bundle) -> Any:
    """The network (``network_def``, else ``network``), instantiated by MONAI's ConfigParser."""
    for key in ("network_def", "network"):
        if key in bundle.parser:
            return _parsed(bundle, key)
    raise ConversionError("configs/inference.json defines neither network_def nor network")


def bundle_transforms(bundle: Bundle) -> list[Any]:
    """The instantiated ``preprocessing`` transforms (a Compose's list, flattened)."""
    if "preprocessing" not in bundle.parser:
        raise ConversionError("configs/inference.json has no 'preprocessing' (the inference transforms)")
    pre = _parsed(bundle, "preprocessing")
    flat: list[Any] = []

    def walk(t: Any) -> None:
        inner = getattr(t, "transforms", None)
        if isinstance(inner, (list, tuple)):
            for x in inner:
                walk(x)
        else:
            flat.append(t)

    walk(pre)
    return flat


def bundle_activation(bundle: Bundle) -> str | None:
    """'sigmoid' or 'softmax' from the postprocessing ``Activations(d)``; None when there is none."""
    if "postprocessing" not in bundle.parser:
        return None
    post = _parsed(bundle, "postprocessing")
    for t in getattr(post, "transforms", [post]):
        _, base = _monai_name(t)
        if base != "Activations":
            continue
        act = _inner(t, "converter")
        if bool(_first(getattr(t, "sigmoid", getattr(act, "sigmoid", False)))):
            return "sigmoid"
        if bool(_first(getattr(t, "softmax", getattr(act, "softmax", False)))):
            return "softmax"
    return None


def _slug(text: str, i: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return slug or f"class_{i}"


def label_names(output_format: dict[str, Any], n_outputs: int) -> list[tuple[str, str]]:
    """(name, meaning) per output channel from ``channel_def`` (``class_<i>`` where missing)."""
    channel_def = {str(k): str(v) for k, v in (output_format.get("channel_def") or {}).items()}
    labels: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i in range(n_outputs):
        meaning = channel_def.get(str(i), f"class {i}")
        name = _slug(meaning, i)
        while name in seen:
            name = f"{name}_{i}"
        seen.add(name)
        labels.append((name, meaning))
    return labels


def routing_modalities(input_format: dict[str, Any]) -> list[str]:
    """DICOM modalities from ``network_data_format.inputs.<key>.modality``."""
    modality = str(input_format.get("modality") or "").strip().upper()
    if not modality:
        return []
    return _XR_MODALITIES.get(modality, [modality])


def manifest_from_bundle(
    scaffold: dict[str, Any],
    *,
    bundle: Bundle,
    mapped: Mapped,
    activation: str,
    kind: str,
    labels: list[tuple[str, str]],
    normal: str | None,
) -> dict[str, Any]:
    """Fill the converter's scaffold with what the bundle says."""
    meta = bundle.metadata
    data = dict(scaffold)
    name = str(meta.get("name") or bundle.root.name)
    version = str(meta.get("version") or "0.0.0")
    data["name"] = name
    data["version"] = version
    data["description"] = str(meta.get("description") or meta.get("task") or f"MONAI bundle {name}")
    data["intended_use"] = str(
        meta.get("intended_use")
        or f"{meta.get('task') or name} (MONAI bundle; validate it on this site's data)"
    )
    data["research_use_only"] = True
    prov = dict(data["provenance"])
    prov["training_script"] = f"MONAI bundle {bundle.root.name} {version} (configs/inference.json)"
    prov["data"] = str(meta.get("data_source") or meta.get("data_type") or "see the bundle's documentation")
    data["provenance"] = prov
    data["preprocessing"] = mapped.steps
    data["outputs"] = {**data["outputs"], "activation": activation}
    data["kind"] = kind
    data["labels"] = [
        {
            "name": label,
            "index": i,
            "code": {
                "value": f"{_slug(name, 0)}.{label}"[:64],
                "scheme_designator": "99PACSNODE",
                "meaning": meaning,
            },
            "threshold": 0.5,
            "triage": kind == "multi_label" or label != normal,
            **({"normal": True} if label == normal else {}),
        }
        for i, (label, meaning) in enumerate(labels)
    ]
    for entry in data["labels"]:
        if entry.get("normal"):
            entry["triage"] = False
    modalities = routing_modalities(bundle.input_format)
    data["routing"] = {"modalities": modalities, "body_parts": []}
    if set(modalities) & {"CT", "MR"}:
        data["aggregation"] = {"level": "series", "method": "max", "keep_top_slices": 3}
    return data


MANIFEST_HEADER = (
    "# Manifest written by `pacs-node convert monai-bundle` from {root}.\n"
    "# Preprocessing: the bundle's inference transforms mapped onto node ops:\n{notes}"
    "# Label codes are private (99PACSNODE) from the bundle's channel_def: replace them with SNOMED CT /\n"
    "# RadLex codes, and set the operating thresholds and triage flags from your validation.\n"
)


def write_bundle_manifest(path: Path, data: dict[str, Any], bundle: Bundle, mapped: Mapped) -> None:
    """Write the manifest (and the mapping as comments), validated by the node's schema."""
    from node.errors import ManifestError
    from node.inference.manifest import parse_manifest

    try:
        parse_manifest(data, str(path))
    except ManifestError as exc:
        raise ConversionError(f"the manifest built from the bundle is invalid: {exc}") from exc
    notes = "".join(f"#   {n}\n" for n in mapped.notes)
    header = MANIFEST_HEADER.format(root=bundle.root, notes=notes)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100), encoding="utf-8")


def pick_normal(labels: list[tuple[str, str]], normal: str | None) -> str:
    """The normal class of a softmax (multi_class) model: ``normal`` or a label named like one."""
    names = [n for n, _ in labels]
    if normal is not None:
        if normal not in names:
            raise ConversionError(f"--normal {normal!r} is not one of the labels {names}")
        return normal
    found = [n for n in names if n in _NORMAL_NAMES]
    if len(found) != 1:
        raise ConversionError(
            f"a softmax (multi_class) model needs its normal class: none of the labels {names} is named "
            "like one (normal, no_finding, background, negative); give --normal LABEL"
        )
    return found[0]


def describe(mapped: Mapped, echo: Callable[[str], None]) -> None:
    """Echo the transform mapping."""
    echo("preprocessing (MONAI transform -> node steps):")
    for note in mapped.notes:
        echo(f"  {note}")


# ------------------------------------------------------------------------------------------------
# Segmentation bundles: the per-pixel output's postprocessing and the inferer

#: ``network_data_format.outputs.<key>.type`` / ``format`` values of a per-pixel output.
_SEG_TYPES = {"image", "label", "segmentation", "labels", "mask"}
_SEG_FORMATS = {"segmentation", "labels", "label", "mask", "one-hot", "onehot"}
#: postprocessing transforms without node equivalents on the per-pixel output: what they would need
_POST_NEEDS = {
    "KeepLargestConnectedComponent": "a keep-the-largest-component op",
    "FillHoles": "a hole-filling op",
    "LabelFilter": "a label-filter op",
    "LabelToContour": "a contour op",
    "MeanEnsemble": "an ensemble op",
    "VoteEnsemble": "an ensemble op",
    "ProbNMS": "a non-maximum-suppression op",
    "Lambda": "an arbitrary function (no manifest field can express it)",
    "Flip": "a flip op",
    "Rotate90": "a rotation op",
}
#: postprocessing transforms the node replaces by its own path (mapping back, writing the SEG)
_POST_NODE_DOES = {
    "Invert": "the node maps the output back onto the source pixels through its preprocessing geometry",
    "SaveImage": "the node writes a DICOM Segmentation instead",
    "CopyItems": "(bookkeeping)",
    "DeleteItems": "(bookkeeping)",
    "SplitDim": "(bookkeeping)",
}


def is_segmentation_output(output_format: dict[str, Any]) -> bool:
    """Whether ``network_data_format.outputs`` describes a per-pixel output (type image/label)."""
    kind = str(output_format.get("type") or "").strip().lower()
    fmt = str(output_format.get("format") or "").strip().lower()
    return kind in _SEG_TYPES or fmt in _SEG_FORMATS


@dataclass
class SegPost:
    """The bundle's postprocessing (and inferer) of a per-pixel output, as manifest fields."""

    activation: str | None = None
    argmax: bool = False
    threshold: float | None = None
    min_area_px: int = 0
    notes: list[str] = field(default_factory=list)


def output_key(bundle: Bundle) -> str:
    """The network output's key (``pred`` in most bundles)."""
    outputs = bundle.metadata.get("network_data_format", {}).get("outputs", {}) or {"pred": {}}
    return next(iter(outputs))


def segmentation_postprocessing(bundle: Bundle) -> SegPost:
    """Map the ``postprocessing`` transforms on the output key: ``Activations(d)`` sigmoid/softmax,
    ``AsDiscrete(d)`` argmax (background channel) or threshold, ``RemoveSmallObjects(d)``
    (``min_area_px``); invert/save/bookkeeping transforms are the node's own business. Anything
    else is refused, named with the op it would need."""
    out = SegPost()
    if "postprocessing" not in bundle.parser:
        return out
    post = _parsed(bundle, "postprocessing")
    flat: list[Any] = []

    def walk(t: Any) -> None:
        inner = getattr(t, "transforms", None)
        if isinstance(inner, (list, tuple)):
            for x in inner:
                walk(x)
        else:
            flat.append(t)

    walk(post)
    key = output_key(bundle)
    refused: list[str] = []
    for i, t in enumerate(flat):
        name, base = _monai_name(t)
        keys = getattr(t, "keys", None)
        if keys is not None and key not in tuple(keys):
            out.notes.append(f"{name} (keys {list(keys)}): not on {key!r}, skipped")
            continue
        where = f"{name} (postprocessing transform {i})"
        conv = getattr(t, "converter", t)

        def opt(attr: str, t: Any = t, conv: Any = conv) -> Any:
            return _first(getattr(t, attr, getattr(conv, attr, None)))

        if base == "Activations":
            if opt("other") is not None:
                refused.append(f"{where}: 'other' is an arbitrary function")
            elif bool(opt("sigmoid")):
                out.activation = "sigmoid"
                out.notes.append(f"{name} sigmoid -> outputs.activation sigmoid")
            elif bool(opt("softmax")):
                out.activation = "softmax"
                out.notes.append(f"{name} softmax -> outputs.activation softmax")
        elif base == "AsDiscrete":
            if opt("rounding") is not None:
                refused.append(f"{where}: rounding {opt('rounding')!r} needs a rounding op")
            elif bool(opt("argmax")):
                out.argmax = True
                out.notes.append(f"{name} argmax -> the node's argmax over the channels (background_index)")
            elif opt("threshold") is not None:
                th = _float(opt("threshold"))
                if th is None or not 0.0 <= th <= 1.0:
                    refused.append(f"{where}: threshold {opt('threshold')!r} is not a probability in [0, 1]")
                else:
                    out.threshold = th
                    out.notes.append(f"{name} threshold {th:g} -> labels' threshold {th:g}")
            if opt("to_onehot"):
                out.notes.append(f"{name} to_onehot -> (the node keeps one mask per label)")
        elif base == "RemoveSmallObjects":
            if bool(opt("by_measure")):
                refused.append(f"{where}: by_measure (a size in mm) needs a physical-size component filter")
                continue
            out.min_area_px = int(opt("min_size") or 0)
            conn = opt("connectivity")
            out.notes.append(
                f"{name} min_size {out.min_area_px} -> segmentation.min_area_px {out.min_area_px}"
                + (
                    f" (the node removes 8-connected components; connectivity {conn} differs at diagonals)"
                    if conn not in (None, 2)
                    else ""
                )
            )
        elif base in _NO_OPS or base == "CastToType":
            out.notes.append(f"{name} -> (nothing to do)")
        elif base in _POST_NODE_DOES:
            out.notes.append(f"{name} -> {_POST_NODE_DOES[base]}")
        else:
            need = _POST_NEEDS.get(base)
            refused.append(f"{where}: " + (f"needs {need}" if need else "no manifest field does this"))
    if refused:
        raise ConversionError(
            "cannot map the bundle's postprocessing onto the node's segmentation: " + "; ".join(refused)
        )
    return out


def check_inferer(bundle: Bundle, image_xy: Sequence[int], notes: list[str]) -> None:
    """A 2-D segmentation bundle's ``inferer``: ``SimpleInferer``, or a ``SlidingWindowInferer``
    whose window covers the whole (resized) image, which is the same computation (one window; its
    importance weights cancel). A smaller window would need 2-D sliding-window inference, which the
    node does not do: refused, naming it. ``image_xy``: the network input's size in MONAI's order."""
    if "inferer" not in bundle.parser:
        notes.append("no inferer: the network runs on the whole image")
        return
    inferer = _parsed(bundle, "inferer")
    name = type(inferer).__name__
    if name == "SimpleInferer":
        notes.append("SimpleInferer -> the node runs the network on the whole prepared image")
        return
    if name != "SlidingWindowInferer":
        raise ConversionError(
            f"the bundle's inferer {name} has no node equivalent (SimpleInferer, SlidingWindowInferer)"
        )
    roi = (
        list(inferer.roi_size)
        if isinstance(inferer.roi_size, Sequence)
        else [inferer.roi_size] * len(image_xy)
    )
    full = [int(s) if r in (None, -1) or int(r) <= 0 else int(r) for r, s in zip(roi, image_xy, strict=False)]
    if len(roi) != len(image_xy) or full != [int(s) for s in image_xy]:
        raise ConversionError(
            f"the bundle's SlidingWindowInferer has roi_size {roi} on a {list(image_xy)} image "
            "(after Resize): "
            "the node runs 2-D models on the whole prepared slice and would need 2-D sliding-window "
            "inference (segmentation.roi_size, overlap and blend are for 3-D models, dimensions: 3); "
            "make roi_size the Resize spatial_size, or convert a 3-D network with "
            "`convert torch --kind segmentation --input-shape C,D,H,W`"
        )
    mode = getattr(inferer.mode, "value", inferer.mode)
    notes.append(
        f"SlidingWindowInferer roi_size {roi} = the whole {list(image_xy)} image: one window "
        f"(overlap {inferer.overlap:g}, mode {mode} change nothing) -> the network on the whole image"
    )


def segmentation_labels(
    output_format: dict[str, Any], channels: int, background: int | None, sigmoid: bool
) -> list[tuple[int, str, str]]:
    """(channel, name, meaning) per segment from ``channel_def``: every channel but the background
    (and, for a sigmoid model, any channel named like a background)."""
    out = []
    for i, (name, meaning) in enumerate(label_names(output_format, channels)):
        if i == background or (sigmoid and name in _NORMAL_NAMES):
            continue
        out.append((i, name, meaning))
    return out


def background_channel(output_format: dict[str, Any], channels: int) -> int:
    """The background channel of an argmax model: the one ``channel_def`` names like a background,
    else 0."""
    names = [n for n, _ in label_names(output_format, channels)]
    found = [i for i, n in enumerate(names) if n in _NORMAL_NAMES]
    return found[0] if len(found) == 1 else 0


#: the segment property category written when the user gives none (replace it)
PRIVATE_CATEGORY = {"value": "SEGMENT", "scheme_designator": "99PACSNODE", "meaning": "Segmented structure"}


def segmentation_manifest_from_bundle(
    scaffold: dict[str, Any],
    *,
    bundle: Bundle,
    mapped: Mapped,
    post: SegPost,
    activation: str,
    background: int | None,
    labels: list[tuple[int, str, str]],
    codes: dict[str, dict[str, str]] | None = None,
    categories: dict[str, dict[str, str]] | None = None,
    default_category: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A ``kind: segmentation`` manifest from the bundle (2-D; see :func:`manifest_from_bundle`)."""
    data = manifest_from_bundle(
        scaffold,
        bundle=bundle,
        mapped=mapped,
        activation=activation,
        kind="multi_label",
        labels=[(n, m) for _, n, m in labels],
        normal=None,
    )
    data["kind"] = "segmentation"
    bundle_name = _slug(str(bundle.metadata.get("name") or bundle.root.name), 0)
    codes, categories = codes or {}, categories or {}
    data["labels"] = [
        {
            "name": name,
            "index": index,
            "code": codes.get(name)
            or {"value": f"{bundle_name}.{name}"[:64], "scheme_designator": "99PACSNODE", "meaning": meaning},
            "category": categories.get(name) or default_category or dict(PRIVATE_CATEGORY),
            "threshold": post.threshold if post.threshold is not None else 0.5,
            "triage": False,
        }
        for index, name, meaning in labels
    ]
    data["heatmap"] = {"method": "none"}
    data["outputs"] = {"probabilities": data["outputs"]["probabilities"], "activation": activation}
    if data.get("aggregation", {}).get("level") != "series":
        data["aggregation"] = {"level": "image", "method": "max", "keep_top_slices": 1}
    section: dict[str, Any] = {"dimensions": 2}
    if background is not None:
        section["background_index"] = background
    section["min_area_px"] = int(post.min_area_px)
    section["batch_size"] = 16
    section["series_description"] = f"AI {bundle.metadata.get('name') or 'segmentation'}"[:40]
    data["segmentation"] = section
    routing = data.pop("routing")
    data["routing"] = routing  # after the segmentation section, as in the bundled manifests
    return data
