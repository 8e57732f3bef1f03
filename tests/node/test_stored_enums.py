"""Output kinds, upload refusal reasons and preprocessing step ops are enums whose values are the
words stored in the database, returned by the API and written in manifests: unchanged."""

from __future__ import annotations

import pydantic
import pytest

from node.errors import RefusalReason, UploadRefused
from node.inference import manifest
from node.inference.manifest import StepOp
from node.types import JobOutput, OutputKind
from node.web.infer import _STATUS


def test_output_kinds_are_the_stored_words():
    assert [k.value for k in OutputKind] == ["sr", "sc", "pm", "gsps", "kos", "seg", "hl7", "fhir"]
    assert f"{OutputKind.SR}-1.2.dcm" == "sr-1.2.dcm"  # outbox file names
    assert JobOutput.model_validate({"kind": "gsps", "sop_instance_uid": "1"}).kind is OutputKind.GSPS


def test_every_refusal_reason_has_its_http_status():
    assert set(_STATUS) == set(RefusalReason)
    assert _STATUS[RefusalReason("unsupported_syntax")] == 415 and _STATUS[RefusalReason.TIMEOUT] == 504
    refused = UploadRefused(RefusalReason.NO_ROUTE, "no route")
    assert refused.reason == "no_route" and str(refused) == "no route"


def test_step_ops_are_the_manifest_words_and_errors_name_them_so():
    step = pydantic.TypeAdapter(manifest.Step)
    resize = step.validate_python({"op": "resize", "size": [8, 8]})
    assert resize.op is StepOp.RESIZE and resize.op == "resize"
    with pytest.raises(pydantic.ValidationError) as caught:
        step.validate_python({"op": "sharpen"})
    message = caught.value.errors()[0]["msg"]
    assert "'resize'" in message and "StepOp" not in message
    classes = manifest.Step.__origin__.__args__  # Annotated[Union[...], Field(discriminator="op")]
    literals = {c.model_fields["op"].annotation.__args__[0] for c in classes}
    assert literals == set(StepOp)
