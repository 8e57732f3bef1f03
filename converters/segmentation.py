"""Segmentation conversions (``--kind segmentation``): what the user says about the per-pixel
output (labels per channel, codes and categories, background channel, activation, small-component
removal, the 3-D sliding window) and the manifest sections written from it.

The manifest follows :class:`node.inference.manifest.SegmentationSpec`: 2-D models (input C,H,W)
run slice by slice, ``NCHW``; 3-D models (input C,D,H,W) are ``NCDHW`` with ``dimensions: 3`` and
``roi_size`` the input's (D, H, W), run by the node's sliding-window inference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from converters.common import ConversionError

TODO = "TODO"
SCHEMES = ("SCT", "DCM", "RADLEX", "99PACSNODE")
BLENDS = ("gaussian", "constant")
ACTIVATIONS = ("sigmoid", "softmax", "none")


def parse_code(text: str, what: str) -> dict[str, str]:
    """``SCHEME:VALUE:MEANING`` (e.g. ``SCT:10200004:Liver``) -> a manifest code."""
    parts = text.split(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise ConversionError(f"{what} must be SCHEME:VALUE:MEANING (e.g. SCT:10200004:Liver), got {text!r}")
    scheme, value, meaning = (p.strip() for p in parts)
    if scheme.upper() not in SCHEMES:
        raise ConversionError(f"{what}: scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    return {"value": value, "scheme_designator": scheme.upper(), "meaning": meaning}


def parse_named_codes(items: Sequence[str], what: str) -> tuple[dict[str, dict[str, str]], dict | None]:
    """``NAME=SCHEME:VALUE:MEANING`` entries -> {name: code}; an entry without ``NAME=`` is the
    default for every label (returned second)."""
    named: dict[str, dict[str, str]] = {}
    default = None
    for item in items:
        name, sep, code = item.partition("=")
        if sep and re.fullmatch(r"[A-Za-z0-9_.-]+", name.strip()):
            named[name.strip()] = parse_code(code, f"{what} {name.strip()}")
        else:
            default = parse_code(item, what)
    return named, default


def parse_labels(text: str | None) -> list[str] | None:
    """``"background,liver,lesion"`` -> names per output channel, in channel order."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",")]
    if not names or not all(names):
        raise ConversionError(f"--labels must be comma-separated names, one per output channel, got {text!r}")
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_.-]+", n)]
    if bad:
        raise ConversionError(f"--labels: names may use letters, digits, '_', '.', '-' only: {bad}")
    if len(set(names)) != len(names):
        raise ConversionError(f"--labels has duplicate names: {names}")
    return names


@dataclass
class LabelOptions:
    """Per-channel label names and codes from the command line (classifiers and segmentation)."""

    names: list[str] | None = None
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    categories: dict[str, dict[str, str]] = field(default_factory=dict)
    default_category: dict[str, str] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(
        cls,
        labels: str | None = None,
        codes: Sequence[str] = (),
        categories: Sequence[str] = (),
        thresholds: Sequence[str] = (),
    ) -> LabelOptions:
        """From ``--labels``, ``--code``, ``--category`` and ``--threshold`` (``NAME=0.4``)."""
        named_codes, default_code = parse_named_codes(codes, "--code")
        if default_code is not None:
            raise ConversionError("--code needs NAME=SCHEME:VALUE:MEANING (one per label)")
        cats, default_cat = parse_named_codes(categories, "--category")
        limits: dict[str, float] = {}
        for item in thresholds:
            name, sep, value = item.partition("=")
            try:
                limits[name.strip()] = float(value)
            except ValueError:
                sep = ""
            if not sep or not 0.0 <= limits.get(name.strip(), -1.0) <= 1.0:
                raise ConversionError(f"--threshold needs NAME=VALUE with 0 <= VALUE <= 1, got {item!r}")
        out = cls(parse_labels(labels), named_codes, cats, default_cat, limits)
        known = set(out.names or [])
        for what, mapping in (("--code", out.codes), ("--category", out.categories), ("--threshold", limits)):
            unknown = sorted(set(mapping) - known)
            if unknown:
                raise ConversionError(
                    f"{what} names {unknown}, which "
                    + (f"are not in --labels {out.names}" if out.names else "need --labels (the channels)")
                )
        return out

    def entries(self, channels: int, skip: int | None = None, segmentation: bool = False) -> list[dict]:
        """Manifest labels for ``channels`` output channels (``skip``: the background channel);
        what is not given is TODO (the node refuses the manifest until it is filled in)."""
        if self.names is not None and len(self.names) != channels:
            raise ConversionError(
                f"--labels names {len(self.names)} channels ({', '.join(self.names)}); the model outputs "
                f"{channels}" + (" (the background channel included)" if segmentation else "")
            )
        todo_code = {"value": TODO, "scheme_designator": TODO, "meaning": TODO}
        out = []
        for i in range(channels):
            if i == skip:
                continue
            name = self.names[i] if self.names else f"{TODO}_label_{i}"
            entry: dict[str, Any] = {
                "name": name,
                "index": i,
                "code": self.codes.get(name, {**todo_code, "meaning": name if self.names else TODO}),
            }
            if segmentation:
                entry["category"] = self.categories.get(name) or self.default_category or dict(todo_code)
            entry["threshold"] = self.thresholds.get(name, 0.5)
            entry["triage"] = False
            out.append(entry)
        return out


@dataclass
class SegmentationOptions:
    """``--kind segmentation`` settings for :func:`plan`."""

    labels: LabelOptions = field(default_factory=LabelOptions)
    background_index: int | None = None
    activation: str | None = None
    min_area_px: int = 0
    min_volume_voxels: int = 0
    overlap: float = 0.25
    blend: str = "gaussian"
    batch_size: int | None = None
    anatomic_region: dict[str, str] | None = None
    series_description: str | None = None


@dataclass
class SegmentationPlan:
    """What the scaffold writes for a segmentation model."""

    dimensions: int
    activation: str
    labels: list[dict]
    section: dict[str, Any]


def resolve_activation(options: SegmentationOptions, channels: int, detected: str | None) -> str:
    """The manifest's ``outputs.activation``: ``--activation``, else 'none' when the network ends in
    Sigmoid/Softmax, else softmax with ``--background-index``, sigmoid for one channel."""
    if options.activation is not None:
        if options.activation not in ACTIVATIONS:
            raise ConversionError(
                f"--activation must be one of {', '.join(ACTIVATIONS)}, got {options.activation!r}"
            )
        return options.activation
    if detected is not None:
        return detected
    if options.background_index is not None:
        return "softmax"
    if channels == 1:
        return "sigmoid"
    raise ConversionError(
        f"the network outputs {channels} channels of logits: say how they become classes, "
        "--activation softmax --background-index N (argmax, N the background channel) or "
        "--activation sigmoid (a threshold per channel)"
    )


def plan(
    options: SegmentationOptions, *, channels: int, input_shape: Sequence[int], detected: str | None
) -> SegmentationPlan:
    """Check the options against the converted graph and build the manifest pieces."""
    dims = len(input_shape) - 1
    activation = resolve_activation(options, channels, detected)
    bg = options.background_index
    if bg is not None and not 0 <= bg < channels:
        raise ConversionError(f"--background-index {bg} is not a channel of the output (0..{channels - 1})")
    if activation == "softmax" and bg is None:
        raise ConversionError(
            "a softmax segmentation model needs its background channel for the argmax: --background-index N"
        )
    if activation == "sigmoid" and bg is not None:
        raise ConversionError(
            "a sigmoid segmentation model thresholds each channel and has no background channel: "
            "drop --background-index (or use --activation softmax)"
        )
    if activation == "softmax" and channels < 2:
        raise ConversionError("a softmax segmentation model needs at least two channels (background and one)")
    if not 0.0 <= options.overlap < 1.0:
        raise ConversionError(f"--overlap must be in [0, 1), got {options.overlap}")
    if options.blend not in BLENDS:
        raise ConversionError(f"--blend must be one of {', '.join(BLENDS)}, got {options.blend!r}")
    if dims == 2 and options.min_volume_voxels:
        raise ConversionError("--min-volume is for 3-D models (input C,D,H,W); a 2-D model takes --min-area")
    if dims == 3 and options.min_area_px:
        raise ConversionError(
            "--min-area is for 2-D models; a 3-D model removes small components by --min-volume (voxels)"
        )
    labels = options.labels.entries(channels, skip=bg, segmentation=True)
    if not labels:
        raise ConversionError("the output has no channel besides the background: nothing to segment")
    section: dict[str, Any] = {"dimensions": dims}
    if bg is not None:
        section["background_index"] = bg
    if dims == 3:
        section["roi_size"] = [int(d) for d in input_shape[1:]]
        section["overlap"] = float(options.overlap)
        section["blend"] = options.blend
        section["min_volume_voxels"] = int(options.min_volume_voxels)
        section["batch_size"] = int(options.batch_size or 4)
    else:
        section["min_area_px"] = int(options.min_area_px)
        section["batch_size"] = int(options.batch_size or 16)
    section["series_description"] = options.series_description or "AI segmentation"
    if options.anatomic_region is not None:
        section["anatomic_region"] = options.anatomic_region
    return SegmentationPlan(dims, activation, labels, section)


def per_pixel_threshold(activation: str) -> float:
    """Where a one-channel output changes class: 0 for logits (sigmoid applied by the node), 0.5
    for probabilities."""
    return 0.0 if activation == "sigmoid" else 0.5
