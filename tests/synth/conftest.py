"""Small phantom sizes so the synth tests stay fast."""

from __future__ import annotations

from typing import Any

SMALL: dict[str, dict[str, Any]] = {
    "cxr": {"scale": 0.2},
    "mammo": {"scale": 0.12},
    "ct": {"slices": 8, "size": 128},
    "mr": {"slices": 8, "size": 96},
}

POSITIVE: dict[str, str] = {
    "cxr": "tuberculosis+pneumonia",
    "mammo": "malignant",
    "ct": "malignant",
    "mr": "tumour",
}

NEGATIVE: dict[str, str] = {"cxr": "none", "mammo": "normal", "ct": "normal", "mr": "normal"}

KINDS = ("cxr", "mammo", "ct", "mr")
