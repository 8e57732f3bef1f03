"""Routing rules: the shipped defaults on hand-made and real headers, the condition language, the
explanations, the refusals of bad rules files, and the rule tester's output."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from node.errors import ConfigError
from node.pipeline.region import RegionEvidence
from node.pipeline.route import (
    ROUTE_KEYWORDS,
    RouteDecision,
    RouteHeader,
    RuleSet,
    check_models,
    explain_files,
    explain_report,
    format_decision,
    load_rules,
    parse_rules,
    route,
    route_header_from_dataset,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "routes.yaml"
SOP_CLASS = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "MG": DigitalMammographyXRayImageStorageForPresentation,
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "OT": SecondaryCaptureImageStorage,
}


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules(SHIPPED)


def make_ds(modality: str, **attrs: Any) -> Dataset:
    """A header-only dataset as a modality would send it (patient attributes included, to show
    that routing does not need them)."""
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P-0001"
    ds.PatientBirthDate = "19700101"
    ds.Modality = modality
    ds.SOPClassUID = SOP_CLASS.get(modality, SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def decide(rules: RuleSet, modality: str, **attrs: Any) -> RouteDecision:
    return route(rules, route_header_from_dataset(make_ds(modality, **attrs)))


def routed_to(decision: RouteDecision) -> tuple[str | None, tuple[str, ...], str | None]:
    return decision.rule, decision.models, decision.grouping


# ------------------------------------------------------------------------------ shipped defaults


COLOUR_MODELS = [
    "fundus-dr",
    "derm-lesion",
    "smear-malaria",
]  # issue 20 (tests/pipeline/test_route_colour.py)


def test_shipped_rules_load_and_name_the_seven_models(rules):
    assert rules.source == str(SHIPPED)
    assert {m for r in rules.rules for m in r.models} == {
        "mammo",
        "cxr",
        "ct-liver",
        "mr-brain",
        *COLOUR_MODELS,
    }
    assert all(r.enabled for r in rules.rules)
    check_models(rules, ["mammo", "cxr", "ct-liver", "mr-brain", *COLOUR_MODELS])  # no error


@pytest.mark.parametrize(("laterality", "view"), [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")])
def test_mammography_all_four_views_go_to_mammo_as_a_study(rules, laterality, view):
    d = decide(rules, "MG", BodyPartExamined="BREAST", ImageLaterality=laterality, ViewPosition=view)
    assert routed_to(d) == ("mammo", ("mammo",), "study")
    assert d.routed and d.reason.startswith("rule 'mammo': Modality MG in [MG]")


def test_mammography_tomosynthesis_is_not_routed_to_the_2d_model(rules):
    d = decide(rules, "MG", SOPClassUID="1.2.840.10008.5.1.4.1.1.13.1.3")
    assert not d.routed
    assert "Breast Tomosynthesis Image Storage" in d.reason and d.reason.startswith(
        "not routed: rule 'mammo'"
    )


@pytest.mark.parametrize("modality", ["CR", "DX"])
@pytest.mark.parametrize(
    ("attrs", "rule"),
    [
        ({"BodyPartExamined": "CHEST", "ViewPosition": "PA"}, "cxr"),
        ({"BodyPartExamined": "CHEST ", "ViewPosition": "AP"}, "cxr"),  # stripped
        ({"SeriesDescription": "Thorax pa"}, "cxr-by-description"),
        ({"StudyDescription": "XR CHEST 1 VIEW"}, "cxr-by-description"),
        ({"ProtocolName": "AP_BEDSIDE"}, "cxr-by-description"),  # "AP" between underscores counts
        ({}, "cxr-by-modality"),  # nothing says otherwise
        ({"SeriesDescription": "Portable"}, "cxr-by-modality"),
    ],
)
def test_chest_radiographs_go_to_cxr_image_by_image(rules, modality, attrs, rule):
    d = decide(rules, modality, **attrs)
    assert routed_to(d) == (rule, ("cxr",), "image"), d.reason


@pytest.mark.parametrize(
    "attrs",
    [
        {"SeriesDescription": "KNEE"},
        {"SeriesDescription": "KNEE_AP"},
        {"StudyDescription": "XR HAND 3 VIEWS", "SeriesDescription": "PA"},
        {"ProtocolName": "L-SPINE LAT"},
        {"BodyPartExamined": "KNEE"},
    ],
)
def test_radiograph_of_another_region_is_not_routed(rules, attrs):
    d = decide(rules, "DX", **attrs)
    assert routed_to(d) == (None, (), None)
    assert d.reason.startswith("not routed: rule 'cxr': BodyPartExamined")


def test_contradicting_description_is_named_in_the_reason(rules):
    d = decide(rules, "DX", SeriesDescription="KNEE")
    assert d.reason == (
        "not routed: rule 'cxr': BodyPartExamined missing, expected one of [CHEST, THORAX, LUNG]; "
        "rule 'cxr-by-description': no description matches /chest|thorax|t[oó]rax|lung|pulmo|cxr|(?<.../ "
        "(SeriesDescription 'KNEE'); "
        "rule 'cxr-by-modality': SeriesDescription 'KNEE' matches 'KNEE', which rules it out"
    )


def test_lateral_chest_view_is_excluded_with_a_reason(rules):
    d = decide(rules, "CR", BodyPartExamined="CHEST", ViewPosition="LL")
    assert not d.routed
    assert d.reason.startswith("not routed: excluded by 'lateral-radiograph' (a lateral radiograph;")


def test_for_processing_radiograph_is_excluded(rules):
    d = decide(rules, "DX", BodyPartExamined="CHEST", SOPClassUID=DigitalXRayImageStorageForProcessing)
    assert d.reason.startswith("not routed: excluded by 'for-processing'")


@pytest.mark.parametrize(
    ("attrs", "rule"),
    [
        ({"BodyPartExamined": "ABDOMEN"}, "ct-liver"),
        ({"BodyPartExamined": "LIVER"}, "ct-liver"),
        ({"BodyPartExamined": "CHESTABDPELVIS"}, "ct-liver"),
        ({"SeriesDescription": "Portal venous 1.0 B30f"}, "ct-liver-by-description"),
        ({"StudyDescription": "CT ABD/PELVIS W CONTRAST"}, "ct-liver-by-description"),
        ({"ProtocolName": "Liver 3 phase"}, "ct-liver-by-description"),
    ],
)
def test_ct_abdomen_and_liver_go_to_ct_liver_by_series(rules, attrs, rule):
    d = decide(rules, "CT", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], **attrs)
    assert routed_to(d) == (rule, ("ct-liver",), "series"), d.reason


@pytest.mark.parametrize(
    ("modality", "attrs"),
    [
        ("CT", {}),
        ("CT", {"SeriesDescription": "5mm STND"}),
        ("MR", {}),
        ("MR", {"SeriesDescription": "ax t1 se +c"}),
    ],
)
def test_ct_or_mr_naming_no_region_is_not_routed_by_modality_alone(rules, modality, attrs):
    """Changed with issue 13: these went to ct-liver / mr-brain by the modality fallbacks
    (ct-liver-by-modality, mr-brain-by-modality); a header naming no region, without pixels to
    look at, now leaves the body region unknown."""
    d = decide(rules, modality, ImageType=["ORIGINAL", "PRIMARY", "AXIAL"], **attrs)
    assert not d.routed
    assert d.reason.startswith(
        "not routed: body region unknown (no BodyPartExamined, anatomy code or description naming a region)"
    ), d.reason


@pytest.mark.parametrize(
    "attrs",
    [{"BodyPartExamined": "HEAD"}, {"BodyPartExamined": "KNEE"}, {"SeriesDescription": "CT HEAD W/O"}],
)
def test_ct_of_another_region_is_not_routed(rules, attrs):
    d = decide(rules, "CT", **attrs)
    assert not d.routed and d.rule is None


def test_ct_head_reason_names_the_body_part_and_the_rules(rules):
    d = decide(rules, "CT", BodyPartExamined="HEAD")
    assert d.reason == (
        "not routed: rule 'ct-liver': BodyPartExamined HEAD not in "
        "[ABDOMEN, LIVER, ABDOMENPELVIS, CHESTABDOMEN, CHESTABDPELVIS]; "
        "rules 'ct-liver-by-description', 'ct-liver-by-region': BodyPartExamined is HEAD "
        "(used only when it is missing)"
    )


@pytest.mark.parametrize(
    ("attrs", "rule"),
    [
        ({"BodyPartExamined": "BRAIN"}, "mr-brain"),
        ({"BodyPartExamined": "HEAD"}, "mr-brain"),
        (
            {"SeriesDescription": "AX T2 FLAIR", "StudyDescription": "MRI BRAIN W/WO"},
            "mr-brain-by-description",
        ),
        ({"ProtocolName": "NEURO_ROUTINE"}, "mr-brain-by-description"),
    ],
)
def test_mr_head_and_brain_go_to_mr_brain_by_series(rules, attrs, rule):
    d = decide(rules, "MR", **attrs)
    assert routed_to(d) == (rule, ("mr-brain",), "series"), d.reason


@pytest.mark.parametrize(
    "attrs",
    [
        {"BodyPartExamined": "SPINE"},
        {"BodyPartExamined": "KNEE"},
        {"SeriesDescription": "SAG T2 C-SPINE", "StudyDescription": "NEURO"},
        {"StudyDescription": "MR PROSTATE"},
    ],
)
def test_mr_of_another_region_is_not_routed(rules, attrs):
    d = decide(rules, "MR", **attrs)
    assert not d.routed, d.reason


@pytest.mark.parametrize(
    ("modality", "attrs", "exclusion"),
    [
        (
            "CT",
            {"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"], "BodyPartExamined": "ABDOMEN"},
            "derived-secondary",
        ),
        ("MR", {"ImageType": ["DERIVED ", "SECONDARY"], "BodyPartExamined": "HEAD"}, "derived-secondary"),
        ("CT", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
        ("CT", {"SeriesDescription": "Topogram 0.6 T20s"}, "localizer-by-description"),
        ("CT", {"SeriesDescription": "SCOUT"}, "localizer-by-description"),
        ("MR", {"SeriesDescription": "3-plane loc", "BodyPartExamined": "HEAD"}, "localizer-by-description"),
        ("OT", {"ImageType": None}, "not-an-acquired-image"),
        ("CT", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.30"}, "not-an-acquired-image"),  # parametric map
        ("SR", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34", "ImageType": None}, "not-an-image"),
        ("PR", {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.11.1", "ImageType": None}, "not-an-image"),
    ],
)
def test_exclusions_say_why(rules, modality, attrs, exclusion):
    d = decide(rules, modality, **attrs)
    assert routed_to(d) == (None, (), None)
    assert d.reason.startswith(f"not routed: excluded by '{exclusion}' ("), d.reason


def test_derived_secondary_reason_reads_well(rules):
    d = decide(rules, "CT", ImageType=["DERIVED", "SECONDARY", "OTHER"], BodyPartExamined="ABDOMEN")
    assert d.reason == (
        "not routed: excluded by 'derived-secondary' (a derived secondary image - screenshot, reformat, "
        "or an AI result such as this node's own heatmaps): ImageType DERIVED\\SECONDARY\\OTHER contains "
        "DERIVED\\SECONDARY"
    )
    assert d.trace == (
        "exclude 'derived-secondary': matches "
        "(ImageType DERIVED\\SECONDARY\\OTHER contains DERIVED\\SECONDARY)",
    )


def test_a_modality_without_rules_says_so(rules):
    assert decide(rules, "US", SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1").reason == (
        "not routed: no rule for modality US"
    )
    assert decide(rules, "NM", SOPClassUID="1.2.840.10008.5.1.4.1.1.20").reason == (
        "not routed: no rule for modality NM"
    )
    assert route(rules, RouteHeader()).reason == "not routed: no rule for objects without a Modality"


def test_synthetic_phantoms_route_to_their_models(rules, tmp_path):
    from node.synth import generate_study

    expected = {"cxr": "cxr", "mammo": "mammo", "ct": "ct-liver", "mr": "mr-brain"}
    options = {"cxr": {"scale": 0.1}, "mammo": {"scale": 0.06}, "ct": {"slices": 2}, "mr": {"slices": 2}}
    for kind, model in expected.items():
        generate_study(kind, tmp_path / kind, seed=1, write_masks=False, **options[kind])
        results = explain_files(rules, sorted((tmp_path / kind).glob("*.dcm")))
        assert results
        for path, decision in results:
            assert decision.models == (model,) and decision.rule == model, (path.name, decision.reason)


# ------------------------------------------------------------------- pydicom's real test files

# What each bundled file says (Modality / BodyPartExamined / ImageType / descriptions), and the
# decision a user would accept:
REAL = {
    # CT, ORIGINAL\PRIMARY\AXIAL, no BodyPartExamined, no Series/Protocol description, Study
    # "e+1": nothing in the header names a region. Its pixels show a thoracic vertebra between the
    # lungs: a chest slice, so not the liver model (it went there by the old CT fallback).
    "CT_small.dcm": (None, (), None),
    # MR Image Storage but ImageType DERIVED\SECONDARY\OTHER: a derived (post-processed) image,
    # which the derived-secondary exclusion keeps away from the models.
    "MR_small.dcm": (None, (), None),
    "MR_small_RLE.dcm": (None, (), None),
    # NM "Whole Body Bone" stored as Secondary Capture: not an acquisition we have a model for.
    "JPEG2000.dcm": (None, (), None),
    # OT Secondary Capture without ImageType: a screenshot-like object.
    "image_dfl.dcm": (None, (), None),
    # OT Secondary Capture, DERIVED\SECONDARY: same.
    "SC_rgb_jpeg_dcmtk.dcm": (None, (), None),
    # CT with BodyPartExamined HEAD: another region, not routed.
    "J2K_pixelrep_mismatch.dcm": (None, (), None),
    # MR ABDOMEN MPR reformat (DERIVED\SECONDARY\MPR): excluded as derived.
    "examples_overlay.dcm": (None, (), None),
    # SR document, SEG object, US image: not for these models.
    "reportsi.dcm": (None, (), None),
    "liver_1frame.dcm": (None, (), None),
    "examples_palette.dcm": (None, (), None),
}
REAL_REASONS = {
    "CT_small.dcm": "not routed: rule 'ct-liver': BodyPartExamined missing",
    "MR_small.dcm": "not routed: excluded by 'derived-secondary'",
    "MR_small_RLE.dcm": "not routed: excluded by 'derived-secondary'",
    "JPEG2000.dcm": "not routed: excluded by 'not-an-acquired-image'",
    "image_dfl.dcm": "not routed: excluded by 'not-an-acquired-image'",
    "SC_rgb_jpeg_dcmtk.dcm": "not routed: excluded by 'derived-secondary'",
    "J2K_pixelrep_mismatch.dcm": "not routed: rule 'ct-liver': BodyPartExamined HEAD not in",
    "examples_overlay.dcm": "not routed: excluded by 'derived-secondary'",
    "reportsi.dcm": "not routed: excluded by 'not-an-image'",
    "liver_1frame.dcm": "not routed: excluded by 'not-an-acquired-image'",
    "examples_palette.dcm": "not routed: no rule for modality US",
}


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return Path(path)


@pytest.mark.parametrize("name", sorted(REAL))
def test_pydicom_files_get_the_decision_a_user_accepts(rules, name):
    [(path, decision)] = explain_files(rules, [bundled(name)])
    assert routed_to(decision) == REAL[name], decision.reason
    if name in REAL_REASONS:
        assert decision.reason.startswith(REAL_REASONS[name]), decision.reason


def test_head_ct_without_body_part_or_description_is_not_routed(rules):
    """A head CT whose routed-on attributes name no region (it went to ct-liver by the old CT
    fallback): its pixels show a skull, so it is not routed, and the reason says so."""
    [(_, decision)] = explain_files(rules, [bundled("693_J2KI.dcm")])
    assert not decision.routed
    assert "body region HEAD (body region from pixels: head (closed bone ring" in decision.reason


# ------------------------------------------------------------------------------------ the header


def test_header_reads_only_routing_attributes():
    class Spy(Dataset):
        seen: list[str]

        def get(self, key: Any, default: Any = None) -> Any:
            self.seen.append(key)
            return super().get(key, default)

    ds = Spy()
    ds.seen = []
    for elem in make_ds("DX", BodyPartExamined="CHEST", Laterality="L", ViewPosition="PA"):
        ds.add(elem)
    header = route_header_from_dataset(ds)
    assert set(ds.seen) <= set(ROUTE_KEYWORDS)
    assert not any(f.name.startswith("patient") for f in dataclasses.fields(RouteHeader))
    assert header == RouteHeader(
        modality="DX",
        sop_class_uid=DigitalXRayImageStorageForPresentation,
        body_part="CHEST",
        view_position="PA",
        image_type=("ORIGINAL", "PRIMARY"),
        laterality="L",
        region=RegionEvidence(("CHEST",), "BodyPartExamined", "BodyPartExamined CHEST"),
    )


def test_header_laterality_prefers_image_laterality_and_drops_empty_values():
    header = route_header_from_dataset(
        make_ds(
            "MG",
            ImageLaterality="R",
            Laterality="L",
            ImageType=["ORIGINAL ", "PRIMARY", ""],
            SeriesDescription="  ",
        )
    )
    assert header.laterality == "R"
    assert header.image_type == ("ORIGINAL", "PRIMARY")
    assert header.series_description is None


def test_header_from_file_meta_when_sop_class_is_missing():
    ds = make_ds("CT", SOPClassUID=None)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    assert route_header_from_dataset(ds).sop_class_uid == CTImageStorage


# ---------------------------------------------------------------------------- condition language


def one_rule(match: dict[str, Any], **extra: Any) -> RuleSet:
    rule = {"name": "r", "match": match, "models": "m", "grouping": "series", **extra}
    return parse_rules({"rules": [rule]}, "test.yaml")


def matches(match: dict[str, Any], **header: Any) -> bool:
    return route(one_rule(match), RouteHeader(**header)).routed


def test_value_lists_mean_any_of_and_compare_case_insensitively():
    assert matches({"modality": ["CR", "DX"]}, modality="dx")
    assert matches({"modality": "ct"}, modality=" CT ")
    assert not matches({"modality": ["CR", "DX"]}, modality="CT")
    assert matches({"laterality": ["L", "R"]}, laterality="r")
    assert not matches({"laterality": "L"})  # missing never matches a value list


def test_image_type_values_must_all_be_present():
    assert matches({"image_type": ["derived", "SECONDARY"]}, image_type=("DERIVED", "SECONDARY", "OTHER"))
    assert not matches({"image_type": ["DERIVED", "SECONDARY"]}, image_type=("DERIVED", "PRIMARY"))
    assert matches({"image_type": "LOCALIZER"}, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))


def test_regular_expressions_search_case_insensitive_unless_asked():
    assert matches({"series_description": "chest"}, series_description="XR CHEST PA")
    assert matches({"protocol_name": ["knee", "^thorax"]}, protocol_name="Thorax 2 views")
    assert not matches({"study_description": "^chest$"}, study_description="XR CHEST")
    assert not matches({"series_description": "chest", "case_sensitive": True}, series_description="CHEST")
    assert matches({"series_description": "CHEST", "case_sensitive": True}, series_description="CHEST")
    assert not matches({"series_description": "chest"})  # absent text matches nothing


def test_any_description_looks_at_all_three():
    for field in ("series_description", "protocol_name", "study_description"):
        assert matches({"any_description": "brain"}, **{field: "MR Brain w/o"})
    assert not matches({"any_description": "brain"}, series_description="spine")


def test_missing_and_present():
    assert matches({"missing": ["body_part", "series_description"]}, modality="CT")
    assert not matches({"missing": "body_part"}, body_part="HEAD")
    assert matches({"present": "body_part"}, body_part="HEAD")
    assert not matches({"present": ["body_part", "image_type"]}, body_part="HEAD")
    assert matches({"missing": "image_type"}, image_type=())


def test_fields_of_one_condition_are_anded():
    match = {"modality": "CT", "body_part": "ABDOMEN"}
    assert matches(match, modality="CT", body_part="ABDOMEN")
    assert not matches(match, modality="CT", body_part="HEAD")
    assert not matches(match, modality="MR", body_part="ABDOMEN")


def test_all_any_not_combine():
    match = {
        "all": [
            {"modality": ["CT", "MR"]},
            {"any": [{"body_part": "LIVER"}, {"series_description": "hepat"}]},
        ],
        "not": {"any": [{"image_type": "LOCALIZER"}, {"series_description": "scout"}]},
    }
    assert matches(match, modality="CT", body_part="LIVER")
    assert matches(match, modality="MR", series_description="Hepatobiliary phase")
    assert not matches(match, modality="CT", body_part="LIVER", image_type=("ORIGINAL", "LOCALIZER"))
    assert not matches(match, modality="CT", body_part="LIVER", series_description="liver scout")
    assert not matches(match, modality="CT", body_part="KNEE")
    assert not matches(match, modality="US", body_part="LIVER")
    assert matches({"not": {"not": {"modality": "CT"}}}, modality="CT")


def test_first_matching_rule_wins_and_disabled_rules_are_skipped():
    rules = parse_rules(
        {
            "rules": [
                {
                    "name": "off",
                    "enabled": False,
                    "match": {"modality": "CT"},
                    "models": "a",
                    "grouping": "image",
                },
                {"name": "first", "match": {"modality": "CT"}, "models": ["b", "c"], "grouping": "series"},
                {"name": "second", "match": {"modality": "CT"}, "models": "d", "grouping": "study"},
            ]
        }
    )
    d = route(rules, RouteHeader(modality="CT"))
    assert routed_to(d) == ("first", ("b", "c"), "series")
    assert d.reason == "rule 'first': Modality CT in [CT]"
    assert d.trace == ("rule 'off': disabled", "rule 'first': matches (Modality CT in [CT])")


def test_match_reason_lists_what_held():
    rules = parse_rules(
        {
            "rules": [
                {
                    "name": "chest",
                    "match": {"modality": ["CR", "DX"], "body_part": "CHEST"},
                    "models": "cxr",
                    "grouping": "image",
                }
            ]
        }
    )
    d = route(rules, RouteHeader(modality="DX", body_part="CHEST"))
    assert d.reason == "rule 'chest': Modality DX in [CR, DX] and BodyPartExamined CHEST in [CHEST]"


def test_not_routed_reason_without_enabled_rules():
    rules = parse_rules(
        {
            "rules": [
                {
                    "name": "off",
                    "enabled": False,
                    "match": {"modality": "CT"},
                    "models": "a",
                    "grouping": "image",
                }
            ]
        }
    )
    assert route(rules, RouteHeader(modality="CT")).reason == "not routed: no routing rule is enabled"


# --------------------------------------------------------------------------------------- refusals


def refusal(text: str, tmp_path: Path) -> str:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_rules(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


RULE_OK = "  - name: {name}\n    match: {match}\n    models: {models}\n    grouping: {grouping}\n"


def rules_text(
    *, name: str = "chest", match: str = "{modality: DX}", models: str = "cxr", grouping: str = "image"
) -> str:
    other = RULE_OK.format(name="a", match="{modality: CT}", models="x", grouping="series")
    other += RULE_OK.format(name="b", match="{modality: MR}", models="y", grouping="series")
    return "rules:\n" + other + RULE_OK.format(name=name, match=match, models=models, grouping=grouping)


def test_bad_regex_names_file_rule_and_field(tmp_path):
    message = refusal(rules_text(match="{any: [{series_description: '('}]}"), tmp_path)
    assert message == (
        "rules.2 (chest): match.any.0.series_description: "
        "invalid regular expression '(' (missing ), unterminated subpattern)"
    )


def test_unknown_field_is_refused_with_the_allowed_ones(tmp_path):
    message = refusal(rules_text(match="{modality: DX, bodypart: CHEST}"), tmp_path)
    assert message.startswith("rules.2 (chest): match.bodypart: unknown field; allowed: modality, ")
    message = refusal(rules_text() + "    priority: 3\n", tmp_path)
    assert message.startswith("rules.2 (chest): priority: unknown field; allowed: name, description, enabled")
    assert refusal("rulez: []\n", tmp_path) == "rulez: unknown field; allowed: version, exclude, rules"


def test_bad_grouping_is_refused(tmp_path):
    assert refusal(rules_text(grouping="slice"), tmp_path) == (
        "rules.2 (chest): grouping: Input should be 'image', 'series' or 'study' (found 'slice')"
    )


def test_empty_models_and_bad_model_ids_are_refused(tmp_path):
    assert refusal(rules_text(models="[]"), tmp_path) == "rules.2 (chest): models: must not be empty"
    assert "rules.2 (chest): models.0: not a model id 'CXR'" in refusal(rules_text(models="[CXR]"), tmp_path)


def test_other_refusals(tmp_path):
    assert refusal(rules_text(match="{}"), tmp_path).startswith("rules.2 (chest): match: empty condition")
    assert refusal(rules_text(match="{missing: [bodypart]}"), tmp_path).startswith(
        "rules.2 (chest): match.missing.0: Input should be 'modality'"
    )
    assert refusal(rules_text(match="{modality: 3}"), tmp_path) == (
        "rules.2 (chest): match.modality: expected a text value or a list of them (found 3)"
    )
    assert refusal(rules_text(name="a"), tmp_path) == "rules.2 (a): name: duplicate of rules.0 (a)"
    assert refusal(rules_text(match="{not: {image_type: []}}"), tmp_path) == (
        "rules.2 (chest): match.not.image_type: must not be empty"
    )
    assert refusal("rules: [oops", tmp_path).startswith("not valid YAML")
    assert refusal("- 1\n", tmp_path) == "expected a mapping with 'exclude' and 'rules' at the top level"
    exclusion = "exclude:\n  - name: odd\n    match: {image_type: X}\n    models: [a]\n"
    assert refusal(exclusion, tmp_path).startswith("exclude.0 (odd): models: unknown field")


def test_missing_rules_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_rules(tmp_path / "nope.yaml")


def test_check_models_names_the_rule_with_an_unknown_model(rules):
    with pytest.raises(ConfigError) as info:
        check_models(rules, ["cxr", "ct-liver", "mr-brain", *COLOUR_MODELS])
    message = str(info.value)
    assert message.startswith(f"{SHIPPED}: rules.0 (mammo): models.0: unknown model id 'mammo'")
    assert message.endswith("(known models: ct-liver, cxr, derm-lesion, fundus-dr, mr-brain, smear-malaria)")


def test_check_models_ignores_disabled_rules():
    data = yaml.safe_load(RULE_OK.format(name="x", match="{modality: CT}", models="later", grouping="series"))
    data[0]["enabled"] = False
    check_models(parse_rules({"rules": data}), [])


# ------------------------------------------------------------------------------------ rule tester


def write_dicom(path: Path, ds: Dataset) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rule_tester_lines_and_exit_status(rules, tmp_path):
    chest = write_dicom(tmp_path / "chest.dcm", make_ds("DX", BodyPartExamined="CHEST"))
    (tmp_path / "notes.txt").write_text("not an image\n")
    (tmp_path / "empty.dcm").write_bytes(b"")
    lines, status = explain_report(
        rules, [chest, tmp_path / "notes.txt", tmp_path / "empty.dcm", tmp_path / "gone.dcm"]
    )
    assert status == 1
    assert lines[0] == (
        f"{chest}: routed to cxr (grouping image) by rule 'cxr': Modality DX in [CR, DX] and "
        "BodyPartExamined CHEST in [CHEST, THORAX, LUNG]"
    )
    assert lines[1] == (
        f"{tmp_path / 'notes.txt'}: not routed: not a DICOM file "
        "(no 'DICM' marker after the 128-byte preamble)"
    )
    assert lines[2].startswith(f"{tmp_path / 'empty.dcm'}: not routed: not a")
    assert lines[3] == f"{tmp_path / 'gone.dcm'}: not routed: no such file"
    assert explain_report(rules, [chest]) == ([lines[0]], 0)


def test_rule_tester_walks_folders_and_shows_the_trace(rules, tmp_path):
    write_dicom(tmp_path / "b.dcm", make_ds("CT", BodyPartExamined="HEAD"))
    write_dicom(tmp_path / "a.dcm", make_ds("OT", ImageType=["DERIVED", "SECONDARY"]))
    results = explain_files(rules, [tmp_path])
    assert [p.name for p, _ in results] == ["a.dcm", "b.dcm"]
    text = format_decision(results[1][0], results[1][1], verbose=True)
    first, *trace = text.splitlines()
    assert first.startswith(
        f"{tmp_path / 'b.dcm'}: not routed: rule 'ct-liver': BodyPartExamined HEAD not in"
    )
    assert trace[0] == (
        "    exclude 'derived-secondary': no "
        "(ImageType ORIGINAL\\PRIMARY does not contain DERIVED\\SECONDARY)"
    )
    assert trace[-1] == "    rule 'blood-smear': no (Modality CT not in [SM, GM])"
    assert len(trace) == len(rules.exclusions) + len(rules.rules)


def test_garbage_after_a_dicm_marker_is_a_line_not_a_traceback(rules, tmp_path):
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f" + b"1.2" * 5)
    [(_, decision)] = explain_files(rules, [bad])
    assert decision.reason.startswith("not routed: ") and not decision.routed


def test_route_command_explains_each_file(tmp_path):
    """`pacs-node route` is the rule tester IT runs: one line per file, exit 1 for unreadable."""
    import subprocess
    import sys

    ct, mr = get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    rules = Path(__file__).resolve().parents[2] / "config" / "routes.yaml"

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "node", "route", "--rules", str(rules), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    ok = cli(ct, mr)
    assert ok.returncode == 0, ok.stderr
    ct_line, mr_line = ok.stdout.strip().splitlines()
    # CT_small (no body part) is a chest slice by its pixels: not the liver model (issue 13)
    assert ct_line.endswith(
        "rule 'ct-liver-by-region': body region CHEST (body region from pixels: chest "
        "(lung air 20 % of body area)) not in [ABDOMEN]"
    ), ct_line
    assert "not routed" in mr_line and "DERIVED" in mr_line

    bad = cli(ct, str(junk))
    assert bad.returncode == 1
    assert "not a DICOM file" in bad.stdout.splitlines()[1]

    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [{name: x, models: [], match: {nonsense: 1}}]\n")
    refused = subprocess.run(
        [sys.executable, "-m", "node", "route", "--rules", str(broken), ct],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and str(broken) in refused.stderr
