"""Helpers for the bring-your-own-model tests: one torch thread, filling in a manifest scaffold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

try:  # the converter tests need torch; keep it to one thread on shared CI machines
    import torch

    torch.set_num_threads(1)
except ModuleNotFoundError:  # pragma: no cover - the manifest helpers work without it
    pass


def fill_manifest(model_dir: Path, *, labels: list[str], modality: str = "DX", **updates: Any) -> None:
    """Replace the scaffold's TODOs as a user would (multi_label, sigmoid unless told otherwise)."""
    path = model_dir / "manifest.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["name"] = "Test classifier"
    data["description"] = "A small classifier converted in the tests."
    data["intended_use"] = "Tests only."
    data["provenance"]["training_script"] = "tests/byom"
    data["provenance"]["data"] = "random weights"
    for step in data["preprocessing"]:
        if step["op"] == "normalize":
            step["mean"], step["std"] = [0.5], [0.25]
    if data["outputs"]["activation"] == "TODO":
        data["outputs"]["activation"] = "sigmoid"
    if data["kind"] == "TODO":
        data["kind"] = "multi_label"
    data["labels"] = [
        {
            "name": name,
            "index": i,
            "code": {"value": f"T{i}", "scheme_designator": "99PACSNODE", "meaning": name},
            "threshold": 0.5,
            "triage": True,
        }
        for i, name in enumerate(labels)
    ]
    data["routing"] = {"modalities": [modality], "body_parts": ["CHEST"]}
    data.update(updates)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def fill_segmentation_manifest(model_dir: Path, **updates: Any) -> dict[str, Any]:
    """Replace a segmentation scaffold's remaining TODOs (labels named and coded on the command
    line) as a user would: names, provenance, the normalisation, CT routing."""
    path = model_dir / "manifest.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["name"] = "Test segmentation model"
    data["description"] = "A small segmentation network converted in the tests."
    data["intended_use"] = "Tests only."
    data["provenance"]["training_script"] = "tests/byom"
    data["provenance"]["data"] = "random weights"
    for step in data["preprocessing"]:
        if step["op"] == "normalize":
            step["mean"], step["std"] = [0.5], [0.25]
        if step["op"] == "window":  # an abdominal window for the CT phantom
            step.clear()
            step.update({"op": "window", "source": "explicit", "center": 40.0, "width": 400.0})
    data["preprocessing"] = [s for s in data["preprocessing"] if s["op"] != "invert_monochrome1"]
    data["routing"] = {"modalities": ["CT"], "body_parts": ["ABDOMEN"]}
    data.update(updates)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return data
