"""/metrics: counters and histograms move after a phantom study goes through the node."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from node.store.tables import JobState
from node.synth import generate_study
from tests.helpers import REPO, StoreSCP, free_port, raw_store_file, wait_first_job_finished

pytestmark = pytest.mark.slow


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_after_a_study(make_node, tmp_path: Path) -> None:
    port = free_port()
    receiver = StoreSCP(tmp_path / "received", port)
    try:
        node = make_node(
            models={"directory": str(REPO / "models" / "onnx")},
            destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port}],
            outputs={"send_to": "all"},
        )
        client = TestClient(node.web_app())
        before = client.get("/metrics")
        assert before.status_code == 200
        assert before.headers["content-type"].startswith("text/plain")
        start = _samples(before.text)
        assert _value(start, "pacsnode_instances_received_total", calling_ae="RAWSCU", outcome="stored") == 0
        assert _value(start, "pacsnode_jobs", state="queued") == 0

        generate_study("cxr", tmp_path / "cxr", seed=5, scale=0.5)
        files = sorted((tmp_path / "cxr").glob("*.dcm"))
        for f in files:
            assert raw_store_file(node.scp.port, f) == 0
        assert raw_store_file(node.scp.port, files[0]) == 0  # a duplicate
        job = wait_first_job_finished(node)
        assert job.state == JobState.DONE, job.error
        after = _samples(client.get("/metrics").text)
    finally:
        receiver.stop()

    n = len(files)
    assert _value(after, "pacsnode_instances_received_total", calling_ae="RAWSCU", outcome="stored") == n
    assert _value(after, "pacsnode_instances_received_total", calling_ae="RAWSCU", outcome="duplicate") == 1
    stored_bytes = sum(f.stat().st_size for f in files)
    assert _value(after, "pacsnode_received_bytes_total", calling_ae="RAWSCU") >= 0.9 * stored_bytes
    assert _value(after, "pacsnode_cstore_responses_total", status="0x0000") == n + 1
    assert _value(after, "pacsnode_associations_total", calling_ae="RAWSCU", outcome="accepted") == n + 1
    model = job.model_id
    for stage in ("assemble_wait", "queued", "preprocessing", "inferring", "writing"):
        assert _value(after, "pacsnode_job_stage_seconds_count", model=model, stage=stage) == 1, stage
    assert _value(after, "pacsnode_job_stage_seconds_sum", model=model, stage="inferring") > 0
    assert _value(after, "pacsnode_jobs_finished_total", model=model, outcome="sending") == 1
    assert _value(after, "pacsnode_inference_batch_size_count", model=model) >= 1
    sent = _value(after, "pacsnode_outputs_sent_total", destination="pacs")
    assert sent >= 2 and sent == len(list((tmp_path / "received").iterdir()))
    assert _value(after, "pacsnode_send_seconds_count", destination="pacs") >= 1
    assert _value(after, "pacsnode_outbox_items", state="pending") == 0
    assert _value(after, "pacsnode_outbox_items", state="sent") == sent
    assert _value(after, "pacsnode_jobs", state="done") == 1
    loaded = [k for k, v in after.items() if k[0] == "pacsnode_model_loaded" and v == 1]
    assert any(dict(labels)["model"] == model for _, labels in loaded)


def test_send_failures_are_counted(make_node, tmp_path: Path) -> None:
    from node.send import OutgoingFile
    from node.send.cstore import CStoreDestination
    from node.settings import DestinationSettings

    node = make_node()
    settings = DestinationSettings(name="down", ae_title="DEST", host="127.0.0.1", port=free_port())
    dest = CStoreDestination(settings, calling_aet="PACSNODE", timeout_s=5, metrics=node.metrics)
    item = OutgoingFile(tmp_path / "x.dcm", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.1")
    assert not dest.send([item, item])[0].ok
    value = node.metrics.registry.get_sample_value
    assert value("pacsnode_send_failures_total", {"destination": "down", "reason": "association"}) == 2
