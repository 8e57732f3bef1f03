"""Body region for routing (issue 13): a CT or MR whose header names no region reaches a
body-region model only on evidence (anatomy codes or the pixels), never by modality alone; the
evidence is named in the reason.

Checked on the region phantoms ``pacs-node synth`` makes (head, chest, abdomen, pelvis CT; head,
abdomen, pelvis MR; written without BodyPartExamined or region-naming descriptions) and on real
vendor files."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.errors import ConfigError
from node.pipeline.region import (
    RegionEvidence,
    combine,
    header_region,
    middle_paths,
    region_from_files,
    region_from_pixels,
    regions_from_body_part,
)
from node.pipeline.route import (
    explain_files,
    load_rules,
    parse_rules,
    route,
    route_header_from_dataset,
    with_pixel_region,
)
from node.synth import generate_study

ROOT = Path(__file__).resolve().parents[2]
SEEDS = range(8)


@pytest.fixture(scope="module")
def rules():
    return load_rules(ROOT / "config" / "routes.yaml")


def real(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(path)


def phantom(tmp: Path, kind: str, region: str, seed: int, size: int = 160) -> list[Path]:
    """A phantom series without BodyPartExamined or a description naming its region."""
    generate_study(
        kind, tmp, seed, "normal", slices=5, size=size, region=region, body_part=False, write_masks=False
    )
    files = sorted(tmp.glob("*.dcm"))
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert "BodyPartExamined" not in header
    assert header_region(header).regions == ()  # nothing in the header names the region
    return files


# ------------------------------------------------------------------------------- the phantoms


@pytest.mark.parametrize(
    ("kind", "region", "expected"),
    [
        ("ct", "abdomen", "ABDOMEN"),
        ("ct", "head", "HEAD"),
        ("ct", "chest", "CHEST"),
        ("ct", "pelvis", "PELVIS"),
        ("mr", "head", "HEAD"),
        ("mr", "abdomen", "TRUNK"),
        ("mr", "pelvis", "TRUNK"),
    ],
)
def test_region_phantoms_are_classified_from_their_pixels(tmp_path, kind, region, expected):
    wrong = {}
    for seed in SEEDS:
        files = phantom(tmp_path / str(seed), kind, region, seed)
        evidence = region_from_files(middle_paths(files))
        assert evidence.source == "pixels"
        if evidence.regions != (expected,):
            wrong[seed] = evidence.text
    assert not wrong, wrong


def test_pixel_decision_is_deterministic_and_names_its_measure(tmp_path):
    files = phantom(tmp_path, "ct", "chest", 3)
    first = region_from_files(middle_paths(files))
    assert first == region_from_files(middle_paths(files))
    assert first.text.startswith("body region from pixels: chest (lung air ")
    assert "% of body area" in first.text and first.text.endswith("3 of 3 slices agree")


def test_middle_paths_pick_the_middle_of_the_series_first():
    paths = [Path(f"{i}.dcm") for i in range(10)]
    assert middle_paths(paths) == [Path("5.dcm"), Path("3.dcm"), Path("7.dcm")]
    assert middle_paths(paths[:2]) == [Path("1.dcm")]
    assert middle_paths([]) == []


def test_slices_that_disagree_leave_the_region_unknown():
    head = RegionEvidence(("HEAD",), "pixels", "body region from pixels: head (x)")
    chest = RegionEvidence(("CHEST",), "pixels", "body region from pixels: chest (y)")
    unknown = RegionEvidence((), "pixels", "body region from pixels: unknown (z)")
    assert combine([head, head, chest]).regions == ("HEAD",)
    mixed = combine([head, chest, unknown])
    assert mixed.regions == () and "the slices disagree" in mixed.text


# ---------------------------------------------------------------------------- real files


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("693_UNCI.dcm", ("HEAD",)),  # axial head CT: skull ring around the brain, head holder below
        ("693_J2KR.dcm", ("HEAD",)),
        ("CT_small.dcm", ("CHEST",)),  # a thoracic vertebra between the lungs, tight field of view
        ("explicit_VR-UN.dcm", ("ABDOMEN",)),  # kidneys and bowel, prone (its header says PANCREAS)
        ("MR2_UNCI.dcm", ()),  # coronal shoulder MR, outline cut by the field of view: unknown
        ("MR_small.dcm", ()),  # 20 mm field of view: no body outline to measure
    ],
)
def test_real_files_are_classified_as_what_they_show(name, expected):
    evidence = region_from_pixels(pydicom.dcmread(real(name)))
    assert evidence.regions == expected, evidence.text


def test_header_evidence_comes_first_and_says_where_it_came_from():
    ect = pydicom.dcmread(real("eCT_Supplemental.dcm"), stop_before_pixels=True)
    evidence = header_region(ect)
    assert evidence.regions == ("HEAD",) and evidence.source == "FrameAnatomySequence"
    assert evidence.text == "FrameAnatomySequence: Brain (SNM3 T-A0100)"
    mr = pydicom.dcmread(real("emri_small.dcm"), stop_before_pixels=True)
    assert header_region(mr) == RegionEvidence(("HEAD",), "BodyPartExamined", "BodyPartExamined HEAD")
    assert regions_from_body_part("CHESTABDPELVIS") == ("CHEST", "ABDOMEN", "PELVIS")
    assert regions_from_body_part("KNEE") == ("OTHER",)


def _coded(keyword: str, value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.Modality = "CT"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    ds.AnatomicRegionSequence = [item]
    return ds


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (codes.SCT.Abdomen, ("ABDOMEN",)),
        (codes.SCT.Liver, ("ABDOMEN",)),
        (codes.SCT.Brain, ("HEAD",)),
        (codes.SCT.Thorax, ("CHEST",)),
        (codes.SCT.Pelvis, ("PELVIS",)),
        (codes.SCT.AbdomenAndPelvis, ("ABDOMEN", "PELVIS")),
        (codes.SCT.Knee, ("OTHER",)),  # named, but no region a model reads: never a guess
    ],
)
def test_anatomic_region_codes_map_to_regions(code, expected):
    ds = _coded("AnatomicRegionSequence", code.value, code.scheme_designator, code.meaning)
    evidence = header_region(ds)
    assert evidence.regions == expected and evidence.source == "AnatomicRegionSequence"


def test_old_snomed_rt_codes_and_private_meanings_map_too():
    assert header_region(_coded("", "T-D4000", "SRT", "Abdomen")).regions == ("ABDOMEN",)
    # a code the tables do not know: its meaning in words decides
    assert header_region(_coded("", "X123", "99LOCAL", "Head routine")).regions == ("HEAD",)


# ------------------------------------------------------------------------------- routing


def _route_files(rules, files: list[Path]):
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    looked = []

    def look() -> RegionEvidence:
        looked.append(1)
        return region_from_files(middle_paths(files))

    return route(rules, with_pixel_region(route_header_from_dataset(header), look)), looked


def test_head_ct_without_body_part_is_not_routed_to_the_liver_model(rules, tmp_path):
    decision, looked = _route_files(rules, phantom(tmp_path, "ct", "head", 11))
    assert not decision.routed
    assert "ct-liver-by-region': body region HEAD (body region from pixels: head (closed bone ring" in (
        decision.reason
    )
    assert looked == [1]  # the pixels were looked at once


@pytest.mark.parametrize("region", ["chest", "pelvis"])
def test_chest_and_pelvis_ct_without_body_part_are_not_routed(rules, tmp_path, region):
    decision, _ = _route_files(rules, phantom(tmp_path, "ct", region, 5))
    assert not decision.routed
    assert f"body region {region.upper()} (body region from pixels: {region}" in decision.reason


def test_abdominal_ct_without_body_part_goes_to_ct_liver_by_its_pixels(rules, tmp_path):
    decision, _ = _route_files(rules, phantom(tmp_path, "ct", "abdomen", 2))
    assert (decision.rule, decision.models, decision.grouping) == (
        "ct-liver-by-region",
        ("ct-liver",),
        "series",
    )
    assert "body region ABDOMEN (body region from pixels: abdomen (soft-tissue trunk" in decision.reason


def test_mr_goes_to_mr_brain_only_on_head_evidence(rules, tmp_path):
    head, _ = _route_files(rules, phantom(tmp_path / "head", "mr", "head", 4))
    assert (
        head.rule == "mr-brain-by-region" and "body region from pixels: head (head-sized oval" in head.reason
    )
    body, _ = _route_files(rules, phantom(tmp_path / "body", "mr", "abdomen", 4))
    assert not body.routed and "body region TRUNK (body region from pixels: trunk" in body.reason


def test_ct_small_is_not_routed_to_ct_liver(rules):
    [(_, decision)] = explain_files(rules, [real("CT_small.dcm")])
    assert "ct-liver" not in decision.models
    assert "body region CHEST (body region from pixels: chest (lung air" in decision.reason


def test_real_head_ct_without_body_part_is_not_routed(rules):
    [(_, decision)] = explain_files(rules, [real("693_UNCI.dcm")])
    assert not decision.routed and "body region from pixels: head" in decision.reason


def _perfusion_ct(image_type: list[str]) -> Dataset:
    ds = pydicom.dcmread(real("eCT_Supplemental.dcm"))
    ds = copy.deepcopy(ds)
    ds.ImageType = image_type
    brain = Dataset()
    brain.CodeValue = codes.SCT.Brain.value
    brain.CodingSchemeDesignator = "SCT"
    brain.CodeMeaning = "Brain"
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [brain]
    anatomy.FrameLaterality = "U"
    ds.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    ds.pop("BodyPartExamined", None)
    return ds


def test_enhanced_brain_perfusion_ct_is_excluded_and_never_reaches_ct_liver(rules):
    looked = []
    perfusion = route_header_from_dataset(_perfusion_ct(["DERIVED", "PRIMARY", "PERFUSION", "RCBF"]))
    decision = route(
        rules, with_pixel_region(perfusion, lambda: looked.append(1) or RegionEvidence((), "", ""))
    )
    assert not decision.routed
    assert decision.reason.startswith("not routed: excluded by 'parametric-or-derived-map'")
    assert "contains PERFUSION" in decision.reason
    assert looked == []  # excluded on the header: no pixels read
    # the same object as an acquired image: FrameAnatomySequence says brain, so not the liver model
    acquired = route(rules, route_header_from_dataset(_perfusion_ct(["ORIGINAL", "PRIMARY", "AXIAL"])))
    assert not acquired.routed
    assert "body region HEAD (FrameAnatomySequence: Brain (SCT 12738006))" in acquired.reason


def test_pixels_are_not_read_when_the_header_decides(rules, tmp_path):
    files = phantom(tmp_path, "ct", "abdomen", 1)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    ds.BodyPartExamined = "ABDOMEN"
    looked = []
    decision = route(
        rules,
        with_pixel_region(
            route_header_from_dataset(ds), lambda: looked.append(1) or RegionEvidence((), "", "")
        ),
    )
    assert decision.rule == "ct-liver" and looked == []


# ------------------------------------------------------------------------------ rule schema


def test_body_region_and_image_type_any_conditions(tmp_path):
    rules = parse_rules(
        {
            "exclude": [{"name": "maps", "match": {"image_type_any": ["ADC", "FA"]}}],
            "rules": [
                {
                    "name": "belly",
                    "match": {"body_region": ["abdomen", "PELVIS"]},
                    "models": "m",
                    "grouping": "series",
                }
            ],
        }
    )
    ds = Dataset()
    ds.Modality = "CT"
    ds.ImageType = ["DERIVED", "PRIMARY", "FA"]
    assert route(rules, route_header_from_dataset(ds)).reason.startswith("not routed: excluded by 'maps'")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDescription = "CT PELVIS"
    decision = route(rules, route_header_from_dataset(ds))
    assert decision.rule == "belly" and "body region PELVIS (StudyDescription 'CT PELVIS')" in decision.reason
    ds.StudyDescription = "CT"
    unknown = route(rules, route_header_from_dataset(ds))
    assert unknown.reason.startswith("not routed: body region unknown (")
    with pytest.raises(ConfigError, match="body_region"):
        parse_rules(
            {"rules": [{"name": "x", "match": {"body_region": "LEG"}, "models": "m", "grouping": "series"}]}
        )
