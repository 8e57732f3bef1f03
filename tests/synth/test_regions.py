"""Region phantoms (head/chest/pelvis CT, abdomen/pelvis MR) and files without BodyPartExamined:
new options that leave the existing kinds' output bit-identical (the bundled models were trained
on it)."""

from __future__ import annotations

import hashlib

import pydicom
import pytest
from typer.testing import CliRunner

from node.synth import generate_study, render_study

#: sha256 of the pixels and masks of render_study(kind, seed, None, slices=6, size=96), recorded
#: before the region options existed.
BEFORE = {
    ("ct", 0): "dea86d2a98290394d917aab7a7337bcfc75ca9ece1bc63b050da20fc30adcffd",
    ("ct", 7): "180f26fdf938221c71b3ff252968e3be2ee04da6455df1da6e0b1b589a505a78",
    ("mr", 0): "455e95a6c846b6a42921dfe12980a3d1c7533d7dc61ab31906eb085170e9c42e",
    ("mr", 7): "9f4b9bb4c9df54f32a807a8c270012b242d9648c8ea8eba7c8cbb1053166beba",
}


@pytest.mark.parametrize(("kind", "seed"), sorted(BEFORE))
def test_existing_kinds_are_unchanged(kind, seed):
    study = render_study(kind, seed, None, slices=6, size=96)
    digest = hashlib.sha256(b"".join(i.pixels.tobytes() + i.mask.tobytes() for i in study.images))
    assert digest.hexdigest() == BEFORE[(kind, seed)]
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
