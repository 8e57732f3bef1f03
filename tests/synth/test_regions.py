"""Region phantoms (head/chest/pelvis CT, abdomen/pelvis MR) and files without BodyPartExamined:
new options that leave the existing kinds' output as it was (the bundled models were trained on
it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from node.synth import generate_study, render_study

#: render_study(kind, seed, None, slices=6, size=96) per slice: the means of its 8x8 blocks of
#: 12x12 pixels and the voxels of each mask label. Recorded on an AVX2 machine from the code
#: whose output matched, bit for bit, the sha256 digests taken before the region options existed
#: for ct-7, mr-0 and mr-7; ct-0 differs from its digest there in a rounding or two, as numpy's
#: float64 exp/sin take other code with AVX-512 (the last ulp), so a digest cannot be the check
#: on every machine. A changed anatomy, noise or seed moves block means by far more than this.
REFERENCE = json.loads((Path(__file__).parent / "regions_reference.json").read_text())
#: a block mean may move by this much (about 7 of its 144 pixels changed by one unit) and a
#: label's count by 2 voxels per slice
BLOCK_TOLERANCE, LABEL_TOLERANCE = 0.05, 2


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_existing_kinds_are_unchanged(case):
    kind, seed = case.split("-")
    study = render_study(kind, int(seed), None, slices=6, size=96)
    want = REFERENCE[case]
    assert len(study.images) == len(want["block_means"]) == 6
    for image, means, counts in zip(study.images, want["block_means"], want["label_counts"], strict=True):
        blocks = image.pixels.astype(np.float64).reshape(8, 12, 8, 12).mean(axis=(1, 3))
        np.testing.assert_allclose(blocks, np.asarray(means), rtol=0, atol=BLOCK_TOLERANCE)
        labels, found = np.unique(image.mask, return_counts=True)
        got = {str(int(label)): int(n) for label, n in zip(labels, found, strict=True)}
        assert set(got) == set(counts)
        assert all(abs(got[label] - counts[label]) <= LABEL_TOLERANCE for label in counts)
    assert "region" not in study.geometry and "region_header" not in study.geometry


@pytest.mark.parametrize(
    ("kind", "region", "body_part", "study_description"),
    [
        ("ct", "head", "HEAD", "CT HEAD WITHOUT CONTRAST"),
        ("ct", "chest", "CHEST", "CT CHEST WITH CONTRAST"),
        ("ct", "pelvis", "PELVIS", "CT PELVIS WITH CONTRAST"),
        ("mr", "abdomen", "ABDOMEN", "MR ABDOMEN"),
        ("mr", "pelvis", "PELVIS", "MR PELVIS"),
    ],
)
def test_region_phantoms_name_their_region_unless_asked_not_to(
    tmp_path, kind, region, body_part, study_description
):
    generate_study(kind, tmp_path / "named", 1, "normal", slices=2, size=64, region=region)
    ds = pydicom.dcmread(sorted((tmp_path / "named").glob("*.dcm"))[0])
    assert ds.BodyPartExamined == body_part and ds.StudyDescription == study_description
    generate_study(kind, tmp_path / "bare", 1, "normal", slices=2, size=64, region=region, body_part=False)
    bare = pydicom.dcmread(sorted((tmp_path / "bare").glob("*.dcm"))[0])
    assert "BodyPartExamined" not in bare
    assert bare.StudyDescription == f"{kind.upper()} EXAMINATION"
    assert bare.pixel_array.shape == (64, 64)


def test_region_phantoms_refuse_lesion_labels():
    with pytest.raises(ValueError, match="carry no lesions"):
        render_study("ct", 1, "malignant", slices=2, size=64, region="head")
    with pytest.raises(ValueError, match="region must be one of"):
        render_study("mr", 1, "normal", slices=2, size=64, region="knee")


def test_cli_writes_region_phantoms_without_body_part(tmp_path):
    from node.cli import app

    result = CliRunner().invoke(
        app,
        [
            "synth",
            "ct",
            "--region",
            "chest",
            "--no-body-part",
            "-n",
            "2",
            "--slices",
            "2",
            "--size",
            "64",
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "labels normal: 2" in result.output
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == 4 and all("BodyPartExamined" not in pydicom.dcmread(f) for f in files)
    refused = CliRunner().invoke(app, ["synth", "cxr", "--region", "chest", "-o", str(tmp_path / "x")])
    assert refused.exit_code != 0
