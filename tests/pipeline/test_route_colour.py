"""Routing of the colour photographic modalities (issue 20) with the shipped rules: fundus (OP),
dermoscopy (DMS, or XC described or coded as such), blood-smear microscopy (SM/GM with a
blood-smear description or coded anatomy); what is not one of them is not routed, with the reason;
and the ``anatomic_region`` condition."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.errors import ConfigError
from node.pipeline.route import (
    RuleSet,
    check_models,
    load_rules,
    parse_rules,
    route,
    route_header_from_dataset,
)
from tests.colour import _code, colour_dataset

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "routes.yaml"


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return load_rules(SHIPPED)


def decide(rules: RuleSet, kind: str, **attrs):
    return route(rules, route_header_from_dataset(colour_dataset(kind, **attrs)))


@pytest.mark.parametrize(
    ("kind", "rule", "model"),
    [
        ("fundus", "fundus", "fundus-dr"),
        ("derm", "dermoscopy", "derm-lesion"),
        ("smear", "blood-smear", "smear-malaria"),
    ],
)
def test_the_phantom_headers_go_to_their_models_per_image(rules, kind, rule, model):
    decision = decide(rules, kind)
    assert (decision.rule, decision.models, decision.grouping) == (rule, (model,), "image")


def test_the_shipped_rules_name_the_colour_models(rules):
    models = {m for r in rules.rules for m in r.models}
    assert {"fundus-dr", "derm-lesion", "smear-malaria"} <= models
    with pytest.raises(ConfigError, match=r"rules\.\d+ \(fundus\): models\.0: unknown model id 'fundus-dr'"):
        check_models(rules, ["mammo", "cxr", "ct-liver", "mr-brain"])


def test_fundus_is_routed_on_the_modality_alone(rules):
    decision = decide(rules, "fundus", SeriesDescription=None, AnatomicRegionSequence=None)
    assert decision.rule == "fundus" and "Modality OP in [OP]" in decision.reason


@pytest.mark.parametrize(
    ("attrs", "why"),
    [
        (
            {"Modality": "DMS", "SeriesDescription": None, "AnatomicRegionSequence": None},
            "Modality DMS in [DMS]",
        ),
        (
            {"SeriesDescription": "Dermatoscopy L forearm", "AnatomicRegionSequence": None},
            "matches 'Dermatoscop'",
        ),
        ({"SeriesDescription": "Clinical photo"}, "AnatomicRegionSequence has Skin (SCT 39937001)"),
        (
            {"SeriesDescription": None, "AnatomicRegionSequence": [_code("T-01000", "SRT", "Skin")]},
            "AnatomicRegionSequence has Skin (SRT T-01000)",
        ),
    ],
)
def test_dermoscopy_by_modality_description_or_code(rules, attrs, why):
    decision = decide(rules, "derm", **attrs)
    assert decision.rule == "dermoscopy" and decision.models == ("derm-lesion",), decision.reason
    assert why in decision.reason


def test_an_external_photograph_of_something_else_is_not_routed(rules):
    decision = decide(
        rules,
        "derm",
        SeriesDescription="Wound photo",
        AnatomicRegionSequence=[_code("76752008", "SCT", "Breast")],
    )
    assert not decision.routed
    assert (
        "AnatomicRegionSequence Breast (SCT 76752008) not in [SCT:39937001, SRT:T-01000]" in decision.reason
    )


@pytest.mark.parametrize(
    ("attrs", "routed"),
    [
        ({}, True),  # GM, "Thin blood smear, Giemsa"
        ({"Modality": "SM", "SeriesDescription": "Peripheral blood film"}, True),
        (
            {
                "Modality": "SM",
                "SeriesDescription": "Slide 3",
                "AnatomicRegionSequence": [_code("87612001", "SCT", "Blood")],
            },
            True,
        ),
        ({"Modality": "SM", "SeriesDescription": "Liver biopsy H&E"}, False),  # histology: not this model
        ({"SeriesDescription": None}, False),
    ],
)
def test_microscopy_needs_a_blood_smear(rules, attrs, routed):
    decision = decide(rules, "smear", **attrs)
    assert decision.routed is routed, decision.reason
    if routed:
        assert (decision.rule, decision.models, decision.grouping) == (
            "blood-smear",
            ("smear-malaria",),
            "image",
        )
    else:
        assert decision.reason.startswith("not routed: rule 'blood-smear': none of:")


def test_radiology_is_unchanged_by_the_colour_rules(rules):
    """A colour photograph's rules do not take a radiograph, nor a radiograph's rules a photograph."""
    assert decide(rules, "fundus", Modality="CR", BodyPartExamined="CHEST").rule == "cxr"
    assert decide(rules, "fundus", Modality="OT").reason == "not routed: no rule for modality OT"


def test_derived_photographs_are_excluded(rules):
    decision = decide(rules, "fundus", ImageType=["DERIVED", "SECONDARY"])
    assert not decision.routed and "excluded by 'derived-secondary'" in decision.reason


def test_anatomic_region_condition_refuses_a_malformed_code():
    with pytest.raises(ConfigError, match=r"rules\.0 \(x\): match\.anatomic_region\.0"):
        parse_rules(
            {
                "rules": [
                    {
                        "name": "x",
                        "match": {"anatomic_region": ["SCT 39937001"]},
                        "models": "m",
                        "grouping": "image",
                    }
                ]
            }
        )


def test_anatomic_region_condition_bare_value_and_missing():
    rules = parse_rules(
        {
            "rules": [
                {"name": "skin", "match": {"anatomic_region": "39937001"}, "models": "m", "grouping": "image"}
            ]
        }
    )
    assert route(rules, route_header_from_dataset(colour_dataset("derm"))).rule == "skin"
    missing = route(rules, route_header_from_dataset(colour_dataset("smear")))
    assert (
        missing.reason
        == "not routed: rule 'skin': AnatomicRegionSequence missing, expected one of [39937001]"
    )
