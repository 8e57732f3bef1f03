"""Every kind (and the header variants) validates with dicom3tools' dciodvfy without errors."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from node.synth import generate_study
from tests.helpers import need

VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "cr-mono1": ("cxr", "tuberculosis", {"modality": "CR", "photometric": "MONOCHROME1", "scale": 0.15}),
    "dx-mono2-16bit": (
        "cxr",
        "pneumonia",
        {"modality": "DX", "bits_stored": 16, "photometric": "MONOCHROME2", "scale": 0.15},
    ),
    "dx-mono1-ap": (
        "cxr",
        "none",
        {"modality": "DX", "photometric": "MONOCHROME1", "view": "AP", "scale": 0.15},
    ),
    "mammo": ("mammo", "malignant", {"scale": 0.1}),
    "ct": ("ct", "benign", {"slices": 3, "size": 64}),
    "mr-t2": ("mr", "tumour", {"slices": 3, "size": 64, "sequence": "T2"}),
    "mr-flair": ("mr", "tumour", {"slices": 3, "size": 64, "sequence": "FLAIR"}),
    "mr-t1c": ("mr", "normal", {"slices": 3, "size": 64, "sequence": "T1C"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dciodvfy_reports_no_errors(variant, tmp_path):
    kind, label, options = VARIANTS[variant]
    dciodvfy = need("dciodvfy")  # skips outside CI when missing, fails in CI
    truth = generate_study(kind, tmp_path, 17, label, **options)
    for path in truth.files:
        proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, f"{path.name}: " + "\n".join(errors)
