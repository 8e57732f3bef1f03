"""Output UIDs (same content -> same UIDs; another model version, model file or node -> others)
and the normal class of a multi-class model (Present when above its threshold, in the SR too)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from node.inference.manifest import load_manifest
from node.inference.postprocess import label_scores
from node.outputs.identity import node_device_uid
from node.outputs.pm import build_parametric_maps
from node.outputs.sc import build_heatmap_scs
from node.outputs.sr import build_sr
from node.types import AnalysisResult, OutputIdentity
from tests.outputs.conftest import Case
from tests.outputs.fabricate import IDENTITY
from tests.outputs.srtree import children, name_of

MANIFEST = Path(__file__).resolve().parents[2] / "models" / "onnx" / "mr-brain" / "manifest.yaml"


def all_uids(case: Case, result: AnalysisResult, identity: OutputIdentity = IDENTITY) -> list[str]:
    """Series and SOP Instance UIDs of every output of ``result``."""
    objects: list[Dataset] = [
        build_sr(result, case.sources, identity),
        *build_heatmap_scs(result, case.by_uid, identity),
        *build_parametric_maps(result, case.sources, identity),
    ]
    return [uid for ds in objects for uid in (str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))]


def test_same_result_same_uids(cases: dict[str, Case]) -> None:
    case = cases["ct"]
    assert all_uids(case, case.result) == all_uids(case, case.result)


@pytest.mark.parametrize("change", [{"version": "1.3.0"}, {"sha256": "cd" * 32}])
def test_another_model_version_or_file_gives_other_uids(
    cases: dict[str, Case], change: dict[str, str]
) -> None:
    case = cases["ct"]
    other = dataclasses.replace(case.result, algorithm=dataclasses.replace(case.result.algorithm, **change))
    before, after = all_uids(case, case.result), all_uids(case, other)
    assert len(before) == len(after)
    assert not set(before) & set(after)


@pytest.mark.parametrize("change", [{"uid_root": "1.2.826.0.1.3680043.8.499."}, {"device_name": "OTHERNODE"}])
def test_another_node_gives_other_uids(cases: dict[str, Case], change: dict[str, str]) -> None:
    case = cases["dx"]
    root = change.get("uid_root", IDENTITY.uid_root)
    name = change.get("device_name", IDENTITY.device_name)
    other = dataclasses.replace(
        IDENTITY, uid_root=root, device_name=name, device_uid=node_device_uid(root, name)
    )
    before, after = all_uids(case, case.result), all_uids(case, case.result, other)
    assert not set(before) & set(after)


def test_multi_class_normal_label_is_present_above_its_threshold(cases: dict[str, Case]) -> None:
    manifest = load_manifest(MANIFEST)
    normal = next(i for i, lb in enumerate(manifest.labels) if lb.normal)
    probs = np.full(len(manifest.labels), 0.00005 / max(len(manifest.labels) - 1, 1))
    probs[normal] = 0.99995
    scores = label_scores(manifest, probs)
    assert scores[normal].positive and not scores[normal].triage
    assert not any(s.positive for i, s in enumerate(scores) if i != normal)
    # and the SR says so: Normal: Present, the others Absent, no contradiction
    case = cases["mr"]
    result = dataclasses.replace(case.result, findings=tuple(scores))
    sr = build_sr(result, case.sources, IDENTITY)
    (container,) = children(sr, "C0034375", "UMLS")
    verdicts = {
        name_of(item): item.ConceptCodeSequence[0].CodeMeaning
        for item in container.ContentSequence
        if item.ValueType == "CODE"
    }
    code = manifest.labels[normal].code
    assert verdicts.pop((code.value, code.scheme_designator)) == "Present"
    assert set(verdicts.values()) == {"Absent"}
