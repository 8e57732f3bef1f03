"""The typed job result (node.types.JobResult, JobTimings) reads every form the runner has stored
on Job.result / Job.timings, and writes back the same JSON."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from node.types import Finding, JobOutput, JobResult, JobTimings, OutputKind, Segment

# what the runner wrote before the model (runner/__init__.py summary, json.dumps in jobs.finish)
CLASSIFIER = {
    "model": "cxr-demo",
    "version": "1.2.0",
    "images": 3,
    "frames": 3,
    "findings": [
        {"label": "pneumonia", "probability": 0.8123, "positive": True, "normal": False, "triage": True},
        {"label": "no_finding", "probability": 0.1, "positive": False, "normal": True, "triage": False},
    ],
    "outputs": [
        {"kind": "sr", "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1"},
        {"kind": "sc", "sop_instance_uid": "1.2.826.0.1.3680043.8.498.2"},
        {"kind": "kos", "sop_instance_uid": "1.2.826.0.1.3680043.8.498.3"},
    ],
}
SEGMENTATION = {
    **CLASSIFIER,
    "outputs": [
        {"kind": "seg", "sop_instance_uid": "1.2.3.4"},
        {"kind": "sr", "sop_instance_uid": "1.2.3.5"},
    ],
    "segments": [
        {"label": "liver", "pixels": 1200, "frames": 4, "area_mm2": 310.25, "volume_mm3": 1840.5},
        {"label": "lesion", "pixels": 0, "frames": 0, "area_mm2": None, "volume_mm3": None},
    ],
}


@pytest.mark.parametrize("stored", [CLASSIFIER, SEGMENTATION], ids=["classifier", "segmentation"])
def test_a_stored_result_round_trips_to_the_same_json(stored):
    text = json.dumps(stored)
    result = JobResult.model_validate_json(text)
    assert json.loads(result.to_json()) == stored
    assert result.images == 3 and result.version == "1.2.0"
    assert result.findings[0] == Finding(
        label="pneumonia", probability=0.8123, positive=True, normal=False, triage=True
    )


def test_segments_are_absent_for_a_classifier_and_typed_for_a_segmentation():
    assert "segments" not in json.loads(JobResult.model_validate_json(json.dumps(CLASSIFIER)).to_json())
    seg = JobResult.model_validate_json(json.dumps(SEGMENTATION))
    assert seg.segments is not None
    assert seg.segments[1] == Segment(label="lesion", pixels=0, frames=0)
    assert seg.output_uids(OutputKind.SEG) == ["1.2.3.4"]
    assert seg.outputs[0] == JobOutput(kind=OutputKind.SEG, sop_instance_uid="1.2.3.4")


def test_older_and_partial_rows_validate_with_the_defaults_readers_used():
    # older results: no frames, no normal/triage flags; a test fixture writes only findings
    old = JobResult.model_validate_json(
        '{"model": "m", "version": "1", "images": 2, "findings": '
        '[{"label": "x", "probability": 0.3, "positive": false}], "outputs": []}'
    )
    assert old.frames is None and old.findings[0].normal is False and old.findings[0].triage is False
    bare = JobResult.model_validate_json('{"findings": []}')
    assert bare.images is None and bare.version == "" and bare.outputs == []


def test_unknown_keys_are_kept_and_wrong_types_are_refused():
    extra = JobResult.model_validate_json(json.dumps({**CLASSIFIER, "added_later": {"a": 1}}))
    assert json.loads(extra.to_json())["added_later"] == {"a": 1}
    with pytest.raises(ValidationError, match="probability"):
        JobResult.model_validate_json(
            '{"findings": [{"label": "x", "probability": "high", "positive": true}]}'
        )
    with pytest.raises(ValidationError, match="kind"):
        JobResult.model_validate_json('{"outputs": [{"kind": "png", "sop_instance_uid": "1.2"}]}')


def test_timings_round_trip_and_are_rounded_like_the_runner_did():
    stored = '{"queued": 0.0123, "verifying": 0.001, "decoding": 0.25, "inferring": 1.5, "writing": 0.3}'
    timings = JobTimings.model_validate_json(stored)
    assert timings.root["inferring"] == 1.5
    assert json.loads(timings.model_dump_json()) == json.loads(stored)
    assert JobTimings.of({"queued": 0.123456789, "writing": 2.0}).root == {"queued": 0.1235, "writing": 2.0}
    assert JobTimings.model_validate_json("{}").root == {}


def test_none_fields_left_unset_are_not_written():
    """A field added later with a None default does not appear in results that lack it."""
    built = JobResult(model="m", version="1", images=1, frames=1, findings=[], outputs=[], segments=None)
    assert "segments" not in json.loads(built.to_json())
    older = JobResult.model_validate_json('{"model": "m", "images": 2, "findings": []}')
    assert "frames" not in json.loads(older.to_json())
    assert json.loads(older.to_json()) == {
        "model": "m",
        "version": "",
        "images": 2,
        "findings": [],
        "outputs": [],
    }
    seg = Segment(label="x", pixels=1, frames=1, area_mm2=None, volume_mm3=None)  # set: written as null
    assert json.loads(seg.model_dump_json()) == {
        "label": "x",
        "pixels": 1,
        "frames": 1,
        "area_mm2": None,
        "volume_mm3": None,
    }
